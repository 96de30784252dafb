//! `psleak trace --pid PID` on Windows: the process followed through ETW ([`Followed`]), and
//! the reports are the eBPF backend's. Type-checked in CI, never run (see
//! the README); what it is made of is tested on Linux (`etw`, `report`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::FILETIME;
use windows_sys::Win32::System::Console::SetConsoleCtrlHandler;
use windows_sys::Win32::System::SystemInformation::GetSystemTimePreciseAsFileTime;

use crate::backends::etw::follow::Follow;
use crate::backends::etw::target::Followed;
use crate::backends::poll;
use crate::error::Error;
use crate::model::lost::Lost;
use crate::report::{Reporter, Selection, StoppedBy};
use crate::trace::Output;

/// Set by Ctrl-C or Ctrl-Break: the sessions must be stopped, or they outlive psleak.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

unsafe extern "system" fn on_ctrl(_: u32) -> i32 {
    INTERRUPTED.store(true, Ordering::SeqCst);
    1
}

/// Traces `pid` until `duration` ends, Ctrl-C, or the target exits; a report every `interval`.
pub fn run(
    pid: u32,
    interval: Duration,
    duration: Option<Duration>,
    mut output: Output,
    selection: Selection,
) -> Result<(), Error> {
    if !poll::is_running(pid) {
        return Err(Error::NoSuchProcess(pid));
    }
    let (mut followed, failure) = Followed::start(pid);
    let mut reporter = Reporter::new(pid, selection);
    match failure {
        // The reports then carry the process's counters only: handles, threads, memory.
        Some(e) => {
            eprintln!("psleak: {e}; polling pid {pid} instead");
            reporter.untraced = Some("no ETW events (the kernel session could not be started)".into());
        }
        None => {
            eprintln!("psleak: tracing pid {pid} with ETW (heap blocks only if it opted in to heap tracing before it started)");
            for what in followed.missing() {
                eprintln!("psleak: {what}");
            }
        }
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe { SetConsoleCtrlHandler(Some(on_ctrl), 1) };

    let started = Instant::now();
    let mut next_report = started + interval;
    let mut emit = |followed: &mut Followed, stopped_by| {
        let alive = || poll::is_running(pid);
        let (ledger, mut sites) = followed.ledger_and_sites();
        let report = reporter.report(ledger, &mut sites, now_ns(), &alive, Lost::default(), stopped_by);
        output.emit(&report)
    };
    let stopped_by = loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break StoppedBy::Interrupted;
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break StoppedBy::DurationEnded;
        }
        if !poll::is_running(pid) {
            break StoppedBy::TargetExited;
        }
        let wait = next_report.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        if followed.next(wait).is_some() {
            // What else came is applied at once: the checks above are per batch, not per event.
            while Instant::now() < next_report && followed.next(Duration::ZERO).is_some() {}
        }
        if Instant::now() >= next_report {
            emit(&mut followed, None)?;
            next_report += interval;
        }
    };
    followed.stop();
    emit(&mut followed, Some(stopped_by))
}

/// Now, on the clock of ETW's timestamps (FILETIME), in nanoseconds.
fn now_ns() -> u64 {
    let mut now = FILETIME { dwLowDateTime: 0, dwHighDateTime: 0 };
    // SAFETY: writes one FILETIME.
    unsafe { GetSystemTimePreciseAsFileTime(&mut now) };
    ((u64::from(now.dwHighDateTime) << 32) | u64::from(now.dwLowDateTime)) * 100
}
