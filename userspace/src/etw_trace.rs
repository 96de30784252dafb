//! `psleak trace --pid PID` on Windows: the ETW sessions of `psleak-etw` feed the ledger through
//! [`Translation`], and the reports are the eBPF backend's. Type-checked in CI, never run (see
//! the README); what it is made of is tested on Linux (`etw`, `report`).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use psleak_etw::session::{Observed, Sessions};
use windows_sys::Win32::Foundation::FILETIME;
use windows_sys::Win32::System::Console::SetConsoleCtrlHandler;
use windows_sys::Win32::System::SystemInformation::GetSystemTimePreciseAsFileTime;

use crate::etw::Translation;
use crate::ledger::Ledger;
use crate::poll;
use crate::report::{Lost, Reporter, Selection};

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
    json: bool,
    selection: Selection,
) -> Result<(), String> {
    if !poll::is_running(pid) {
        return Err(format!("no running process has pid {pid}"));
    }
    let (observed, events) = mpsc::channel::<Observed>();
    let sink = observed.clone();
    let sessions = match Sessions::start(pid, move |o| {
        let _ = sink.send(o);
    }) {
        Ok(sessions) => {
            eprintln!("psleak: tracing pid {pid} with ETW (heap blocks only if it opted in to heap tracing before it started)");
            if let Some(why) = &sessions.handles_unavailable {
                eprintln!("psleak: no handle events: {why}");
            }
            Some(sessions)
        }
        Err(e) => {
            // The reports then carry the process's counters only: handles, threads, memory.
            eprintln!("psleak: {e}; polling pid {pid} instead");
            None
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe { SetConsoleCtrlHandler(Some(on_ctrl), 1) };

    let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
    let mut reporter = Reporter::new(pid, selection);
    let started = Instant::now();
    let mut next_report = started + interval;
    let apply = |o: Observed, ledger: &mut Ledger, translation: &mut Translation| {
        for event in translation.events(&o.record, o.timestamp as u64 * 100, o.tid, &o.stack) {
            ledger.apply(&event);
        }
    };
    let mut emit = |ledger: &Ledger, translation: &mut Translation, stopped_by| {
        let report = reporter.report(ledger, translation, now_ns(), poll::is_running(pid), Lost::default(), stopped_by);
        let text =
            if json { serde_json::to_string(&report).expect("reports serialize") + "\n" } else { report.to_text() };
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| format!("cannot write the report: {e}"))
    };
    let stopped_by = loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break "interrupted";
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break "the duration ended";
        }
        if !poll::is_running(pid) {
            break "the target exited";
        }
        let wait = next_report.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        match events.recv_timeout(wait) {
            Ok(o) => apply(o, &mut ledger, &mut translation),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break "the ETW sessions ended",
        }
        if Instant::now() >= next_report {
            emit(&ledger, &mut translation, None)?;
            next_report += interval;
        }
    };
    drop((sessions, observed));
    while let Ok(o) = events.try_recv() {
        apply(o, &mut ledger, &mut translation);
    }
    emit(&ledger, &mut translation, Some(stopped_by))
}

/// Now, on the clock of ETW's timestamps (FILETIME), in nanoseconds.
fn now_ns() -> u64 {
    let mut now = FILETIME { dwLowDateTime: 0, dwHighDateTime: 0 };
    // SAFETY: writes one FILETIME.
    unsafe { GetSystemTimePreciseAsFileTime(&mut now) };
    ((u64::from(now.dwHighDateTime) << 32) | u64::from(now.dwLowDateTime)) * 100
}
