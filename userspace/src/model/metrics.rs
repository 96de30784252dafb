//! The classic metrics of a process: the numbers polling leak tools compare before and after,
//! shown beside the exact ledger as a second opinion. Each platform reads them its own way
//! (`backends::poll`); Linux is the tested reference.

use serde::Serialize;

/// Sizes in bytes, counts as counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Resident set size.
    pub rss: u64,
    /// Virtual memory size.
    pub vms: u64,
    /// Unique set size: private pages, what the process would give back if it ended. None
    /// when it could not be read in time (Linux: its memory map stayed locked).
    pub uss: Option<u64>,
    pub fds: u64,
    pub threads: u64,
}

/// What `Metrics::fds` counts: a Windows process's open objects are its handles.
pub const OPEN_OBJECTS: &str = if cfg!(windows) { "handles" } else { "fds" };

/// Why a uss is None, to say where it is shown.
pub const USS_UNKNOWN: &str = if cfg!(target_os = "freebsd") {
    "FreeBSD does not tell"
} else {
    "not read in time: its memory map stayed locked"
};

/// How much each metric changed (negative when it shrank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsChange {
    pub rss: i64,
    pub vms: i64,
    pub uss: Option<i64>,
    pub fds: i64,
    pub threads: i64,
}

impl Metrics {
    /// What changed from `before` to `self`.
    pub fn since(&self, before: &Metrics) -> MetricsChange {
        let d = |now: u64, then: u64| now as i64 - then as i64;
        MetricsChange {
            rss: d(self.rss, before.rss),
            vms: d(self.vms, before.vms),
            uss: self.uss.zip(before.uss).map(|(now, then)| d(now, then)),
            fds: d(self.fds, before.fds),
            threads: d(self.threads, before.threads),
        }
    }
}

/// The memory metrics of a process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    pub rss: u64,
    pub vms: u64,
    pub uss: u64,
}
