//! The errors a user can meet, each one line that says what is wrong and what to do.

use std::fmt;
use std::io;

use psleak_ebpf::{describe_io, AttachError};

#[derive(Debug)]
pub enum Error {
    NoSuchProcess(u32),
    NotTraceable(u32, String),
    NoDynamicLibc(u32),
    NotPrivileged,
    NoBtf(String),
    Attach(AttachError),
    Io(String, io::Error),
    /// Something psleak will not do, and why, in words that say what to do instead.
    Refused(String),
    /// Whoever read the reports went away (a closed pipe): the session ends, and that is fine.
    OutputClosed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchProcess(pid) => write!(f, "no process with pid {pid}: check the pid with `ps -p {pid}`"),
            Self::NotTraceable(pid, why) => write!(f, "cannot trace pid {pid}: {why}"),
            Self::NoDynamicLibc(pid) => write!(
                f,
                "pid {pid} has no shared libc mapped (statically linked?): psleak probes the allocator in libc.so; \
                 link the program dynamically to trace it"
            ),
            Self::NotPrivileged => write!(
                f,
                "loading eBPF probes needs root (CAP_SYS_ADMIN; the kernel refuses uprobes to CAP_BPF and CAP_PERFMON alone): rerun with sudo"
            ),
            Self::NoBtf(what) => write!(
                f,
                "{what}: psleak relocates its probes with the kernel's BTF; use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y, or pass its BTF file with --btf"
            ),
            Self::Attach(err) => err.fmt(f),
            Self::Io(what, err) => write!(f, "{what}: {}", describe_io(err)),
            Self::Refused(why) => f.write_str(why),
            Self::OutputClosed => write!(f, "the reports' reader went away"),
        }
    }
}

impl std::error::Error for Error {}

/// Writes a line to stderr. Unlike `eprintln!`, which panics when stderr is a pipe nobody
/// reads any more, a log that went away is no reason for the daemon or the tracer to stop.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "{line}");
}

impl From<AttachError> for Error {
    fn from(err: AttachError) -> Self {
        Self::Attach(err)
    }
}
