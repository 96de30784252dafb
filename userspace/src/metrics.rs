//! The classic metrics of a process, read from procfs: the numbers polling leak tools compare
//! before and after, shown beside the exact ledger as a second opinion.

use std::fs;
use std::io::{self, Read};

use serde::Serialize;

/// Sizes in bytes, counts as counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Resident set size.
    pub rss: u64,
    /// Virtual memory size.
    pub vms: u64,
    /// Unique set size: private pages, what the process would give back if it ended.
    pub uss: u64,
    pub fds: u64,
    pub threads: u64,
}

/// How much each metric changed (negative when it shrank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsChange {
    pub rss: i64,
    pub vms: i64,
    pub uss: i64,
    pub fds: i64,
    pub threads: i64,
}

impl Metrics {
    /// The metrics of `pid` now.
    pub fn of(pid: u32) -> io::Result<Self> {
        let proc = format!("/proc/{pid}");
        let MemoryUse { rss, vms, uss } = MemoryUse::read(&proc)?;
        let fds = fs::read_dir(format!("{proc}/fd"))?.count() as u64;
        let threads = kib_fields(&fs::read_to_string(format!("{proc}/status"))?, &["Threads:"]);
        Ok(Self { rss, vms, uss, fds, threads })
    }

    /// What changed from `before` to `self`.
    pub fn since(&self, before: &Metrics) -> MetricsChange {
        let d = |now: u64, then: u64| now as i64 - then as i64;
        MetricsChange {
            rss: d(self.rss, before.rss),
            vms: d(self.vms, before.vms),
            uss: d(self.uss, before.uss),
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

impl MemoryUse {
    /// The calling process's, read without allocating: glibc counts the freed small blocks it
    /// keeps in its per-thread cache as used, so a reader that allocates moves the heap figure
    /// read beside it, by up to kilobytes, enough to fail a clean test.
    pub fn own() -> io::Result<Self> {
        Self::read("/proc/self")
    }

    /// From `proc`, the process's /proc directory.
    fn read(proc: &str) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let mut buf = [0u8; 4096];
        let mut pages =
            read_on_stack(proc, "statm", &mut buf)?.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let vms = pages.next().unwrap_or(0) * page;
        let rss = pages.next().unwrap_or(0) * page;
        let rollup = read_on_stack(proc, "smaps_rollup", &mut buf)?;
        let uss = kib_fields(rollup, &["Private_Clean:", "Private_Dirty:"]) * 1024;
        Ok(Self { rss, vms, uss })
    }
}

/// The text of the small file `proc`/`name`, read into `buf`. The path is put together on the
/// stack too (std opens paths shorter than a few hundred bytes without allocating).
fn read_on_stack<'b>(proc: &str, name: &str, buf: &'b mut [u8]) -> io::Result<&'b str> {
    let mut path = [0u8; 64];
    let len = proc.len() + 1 + name.len();
    if len > path.len() {
        return Err(io::Error::other("/proc path too long"));
    }
    path[..proc.len()].copy_from_slice(proc.as_bytes());
    path[proc.len()] = b'/';
    path[proc.len() + 1..len].copy_from_slice(name.as_bytes());
    let path = std::str::from_utf8(&path[..len]).map_err(io::Error::other)?;
    let mut file = fs::File::open(path)?;
    let mut filled = 0;
    loop {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
        if filled == buf.len() {
            return Err(io::Error::other(format!("{path} is longer than {} bytes", buf.len())));
        }
    }
    std::str::from_utf8(&buf[..filled]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The sum of the numbers after the given `Name:` labels ("Private_Dirty:   12 kB").
fn kib_fields(text: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let label = labels.iter().find(|l| line.starts_with(**l))?;
            line[label.len()..].split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_labelled_fields() {
        let rollup = "Rss:  100 kB\nPrivate_Clean:   8 kB\nPrivate_Dirty:  24 kB\nPrivate_Hugetlb: 0 kB\n";
        assert_eq!(kib_fields(rollup, &["Private_Clean:", "Private_Dirty:"]), 32);
        assert_eq!(kib_fields("Name:\tx\nThreads:\t7\n", &["Threads:"]), 7);
    }

    #[test]
    fn counts_fds_and_threads_exactly() {
        // Two sleeping children, one holding three more fds (non-CLOEXEC, kept across exec).
        let spawn = |script: &str| std::process::Command::new("sh").args(["-c", script]).spawn().unwrap();
        let mut plain = spawn("exec sleep 30");
        let mut more = spawn("exec 3</dev/null 4</dev/null 5</dev/null; exec sleep 30");
        std::thread::sleep(std::time::Duration::from_millis(200)); // both have exec'd sleep
        let (a, b) = (Metrics::of(plain.id()).unwrap(), Metrics::of(more.id()).unwrap());
        for child in [&mut plain, &mut more] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(b.since(&a).fds, 3, "{a:?} {b:?}");
        assert_eq!((a.threads, b.threads), (1, 1));
        assert!(a.rss > 0 && a.vms >= a.rss && a.uss <= a.rss, "{a:?}");
    }

    #[test]
    fn follows_memory_this_process_touches() {
        let me = std::process::id();
        let before = Metrics::of(me).unwrap();
        let touched = vec![1u8; 32 << 20];
        let change = Metrics::of(me).unwrap().since(&before);
        assert!(change.rss >= 16 << 20 && change.uss >= 16 << 20, "32 MiB were touched: {change:?}");
        drop(touched);
    }
}
