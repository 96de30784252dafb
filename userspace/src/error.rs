//! The errors a user can meet, each one line that says what is wrong and what to do; one type
//! for every platform, and one exit status for them ([`exit_status`]).

use std::fmt;
use std::io;

#[cfg(target_os = "linux")]
use psleak_ebpf::{describe_io, AttachError};

#[derive(Debug)]
pub enum Error {
    NoSuchProcess(u32),
    NotTraceable(u32, String),
    NoDynamicLibc(u32),
    NotPrivileged,
    NoBtf(String),
    #[cfg(target_os = "linux")]
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
            Self::NoSuchProcess(pid) => write!(f, "no process with pid {pid}: check the pid with {}", ps(*pid)),
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
            #[cfg(target_os = "linux")]
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

/// How to look a pid up on this platform.
fn ps(pid: u32) -> String {
    if cfg!(windows) {
        format!("`tasklist /FI \"PID eq {pid}\"`")
    } else {
        format!("`ps -p {pid}`")
    }
}

/// What an I/O error says, with what to do when it is one the user can fix.
#[cfg(not(target_os = "linux"))]
fn describe_io(err: &io::Error) -> String {
    err.to_string()
}

/// The exit status of a command that ended with `result`: 0, or 2 after one line on stderr
/// saying what went wrong. A reader that went away (`psleak trace | head`) is no failure.
pub fn exit_status(result: Result<(), Error>) -> u8 {
    match result {
        Ok(()) | Err(Error::OutputClosed) => 0,
        Err(err) => {
            say(&format!("psleak: {err}"));
            2
        }
    }
}

#[cfg(target_os = "linux")]
impl From<AttachError> for Error {
    fn from(err: AttachError) -> Self {
        Self::Attach(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one exit rule, on every platform: a closed reader is a normal end, any error is 2.
    #[test]
    fn exit_statuses() {
        let cases: [(&str, Result<(), Error>, u8); 4] = [
            ("done", Ok(()), 0),
            ("the reports' reader went away", Err(Error::OutputClosed), 0),
            ("a dead pid", Err(Error::NoSuchProcess(u32::MAX)), 2),
            ("an I/O error", Err(Error::Io("cannot write the report".into(), io::Error::other("disk full"))), 2),
        ];
        for (case, result, status) in cases {
            assert_eq!(exit_status(result), status, "{case}");
        }
    }
}
