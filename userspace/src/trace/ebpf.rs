//! `psleak trace --pid PID` (or `-- CMD ARGS...`): attach to a running process (or one started
//! for it) and report, every interval, what it created since attach and still holds, until the
//! duration ends, Ctrl-C, or the target exits.

use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backends::ebpf::live::{monotonic_ns, Live, DRAIN_PERIOD};
use crate::error::{say, Error};
use crate::model::ledger::Ledger;
use crate::process::{Credentials, Pidfd, Process};
use crate::report::{self, Selection, StoppedBy};
use crate::serve::protocol::DEFAULT_SOCKET;
use crate::trace::launch::{self, Launched};
use crate::trace::through_daemon::Remote;
use crate::trace::Output;

/// What to trace: a running process, or a command started for it.
#[derive(Debug, Clone)]
pub enum Target {
    Pid(u32),
    Command(Vec<OsString>),
}

#[derive(Debug, Clone)]
pub struct TraceArgs {
    pub target: Target,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub selection: Selection,
    pub options: psleak_ebpf::Options,
    /// Heap blocks and mappings the ledger keeps at most.
    pub ledger_room: usize,
    /// The daemon to trace through (`--socket`, `PSLEAK_SOCKET`), if one was named.
    pub socket: Option<PathBuf>,
    /// The options given that only psleak's own probes take (`--btf`, `--ring-mib`...): a
    /// daemon's sessions have the daemon's.
    pub own_probe_options: Vec<&'static str>,
}

/// Whose probes a trace runs on.
enum Route {
    Own,
    Daemon(PathBuf),
}

/// The daemon when one is named; psleak's own probes when it may load them; else the daemon on
/// the default socket, if there is one (as the Python package chooses).
fn route(args: &TraceArgs) -> Result<Route, Error> {
    let daemon = |socket: &Path| match args.own_probe_options.as_slice() {
        [] => Ok(Route::Daemon(socket.to_path_buf())),
        given => Err(Error::Refused(format!(
            "{} set up psleak's own probes, and this trace goes through the daemon on {}, which has its own: \
             leave them out, or run the trace as root without --socket or PSLEAK_SOCKET",
            given.join(", "),
            socket.display()
        ))),
    };
    if let Some(socket) = &args.socket {
        return daemon(socket);
    }
    match crate::backends::ebpf::tracer::check_prerequisites(&args.options) {
        Ok(()) => Ok(Route::Own),
        Err(Error::NotPrivileged) if Path::new(DEFAULT_SOCKET).exists() => daemon(Path::new(DEFAULT_SOCKET)),
        Err(Error::NotPrivileged) => Err(Error::Refused(format!(
            "{}, or have root run `psleak daemon` and trace through it (at {DEFAULT_SOCKET}, or --socket PATH)",
            Error::NotPrivileged
        ))),
        Err(e) => Err(e),
    }
}

pub fn run(args: &TraceArgs, output: Output) -> Result<(), Error> {
    if let Target::Pid(pid) = args.target {
        // A pid that is not there is said so first, to anyone: whose probes would trace it is moot.
        Pidfd::open(pid)?;
    }
    let route = route(args)?;
    keep_up_with_busy_targets();
    let mut launched = match &args.target {
        Target::Pid(_) => None,
        Target::Command(command) => Some(launch::launch(command)?),
    };
    let pid = match (&args.target, &launched) {
        (_, Some(launched)) => launched.pid(),
        (Target::Pid(pid), None) => *pid,
        (Target::Command(_), None) => unreachable!("a command is launched"),
    };
    let started = Instant::now();
    let for_it = if launched.is_some() { ", started for it" } else { "" };
    let traced = match route {
        Route::Own => {
            let process = Process::open(pid)?;
            let name = process.name();
            let mut storage = MaybeUninit::uninit();
            let live = Live::attach(&mut storage, process, &args.options, args.ledger_room)?;
            // Checked again once the probes count execs: one during the attach may have made the
            // target a setuid program's.
            live.collector().decoder.process.check_traceable_by(&Credentials::own())?;
            let target = &live.target;
            let attached = format!(
                "psleak: tracing pid {pid} ({name}{for_it}): {} probes on {}{}, attached in {:.2}s",
                live.probes.attachments(),
                target.libc.display(),
                target.python.as_ref().map_or(String::new(), |p| format!(" and {}", p.display())),
                started.elapsed().as_secs_f64(),
            );
            let reports = report::Reporter::new(pid, args.selection);
            let mut own = Own { live, output, reports, more: false };
            // Only once the probes are in does a launched command run its own first instruction.
            release(&mut launched)?;
            watch(args, &mut own, &attached, launched.as_mut())
        }
        Route::Daemon(socket) => {
            let (mut remote, ready) = Remote::attach(&socket, pid, &args.options, output, args.selection)?;
            let attached = format!(
                "psleak: tracing pid {pid} ({}{for_it}) through the psleak daemon on {}: {ready}, attached in {:.2}s",
                remote.name,
                socket.display(),
                started.elapsed().as_secs_f64(),
            );
            release(&mut launched)?;
            watch(args, &mut remote, &attached, launched.as_mut())
        }
    };
    if let Some(launched) = launched {
        say_how_it_ended(launched);
    }
    traced
}

fn release(launched: &mut Option<Launched>) -> Result<(), Error> {
    launched.as_mut().map_or(Ok(()), Launched::release)
}

/// What became of a command psleak started: its exit status, or that it runs on.
fn say_how_it_ended(mut launched: Launched) {
    launched.let_go();
    match launched.status() {
        Some(status) => say(&format!("psleak: {} ended ({status})", launched.name)),
        None => say(&format!("psleak: {} (pid {}) runs on", launched.name, launched.pid())),
    }
}

/// A target whose threads keep every CPU busy would starve its tracer: events pile up and are
/// lost, and a SIGTERM takes seconds to be served (5.8 s against 1.0 s at nice -10, with 200
/// allocating threads on two cores). psleak trace, a tool its user is waiting on, runs at nice
/// -10 when it may (root or CAP_SYS_NICE); it only uses CPU for the events the target makes.
/// Set on this thread before any other starts: Linux threads inherit it.
fn keep_up_with_busy_targets() {
    // SAFETY: setpriority has no preconditions; a refusal leaves the priority as it was.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
}

/// A session `watch` runs: on psleak's own probes, or a daemon's.
pub trait Traced {
    /// Waits at most `timeout` for something to take in, or for `signals` to be readable.
    fn wait(&mut self, signals: RawFd, timeout: Duration) -> Result<(), Error>;
    /// Takes in what came; why the session ends now, if it does.
    fn take_in(&mut self) -> Result<Option<StoppedBy>, Error>;
    /// Takes in everything the target did until now, while it is held at its exit: the
    /// session names it while the target's memory is there; why the session ends, if it does.
    fn catch_up(&mut self) -> Result<Option<StoppedBy>, Error>;
    /// Emits the report of now; the session's last if `stopped_by`.
    fn report(&mut self, stopped_by: Option<StoppedBy>) -> Result<(), Error>;
}

/// Reports every interval until the session ends, and once more then. A command psleak started
/// is held at its exit until the session has caught up with it.
fn watch(
    args: &TraceArgs,
    session: &mut impl Traced,
    attached: &str,
    mut launched: Option<&mut Launched>,
) -> Result<(), Error> {
    // Only now does Ctrl-C end the session with a final report.
    let signals = Signals::take()?;
    say(attached);
    let started = Instant::now();
    let ends_at = args.duration.map(|d| started + d);
    let mut next_report = started + args.interval;
    // The command psleak started may have stopped before SIGCHLD was ours to read.
    let mut child_stopped = true;
    let stopped_by = loop {
        let now = Instant::now();
        if ends_at.is_some_and(|end| now >= end) {
            break StoppedBy::DurationEnded;
        }
        if now >= next_report {
            // A report right before the end would repeat the final one.
            if ends_at.is_none_or(|end| end.duration_since(now) > args.interval / 2) {
                session.report(None)?;
            }
            // A report late by more than an interval (a slow terminal) is not made up for.
            next_report = (next_report + args.interval).max(Instant::now());
        }
        // The probes wake us only when much is waiting (common.bpf.h): drain the rest regularly.
        let until_timer = next_report.min(ends_at.unwrap_or(next_report)).saturating_duration_since(Instant::now());
        session.wait(signals.fd.as_raw_fd(), until_timer.min(DRAIN_PERIOD))?;
        match signals.pending() {
            Some(libc::SIGINT) => break StoppedBy::Interrupted,
            Some(libc::SIGTERM) => break StoppedBy::Terminated,
            Some(_) => child_stopped = true, // SIGCHLD
            None => {}
        }
        if std::mem::take(&mut child_stopped) {
            if let Some(command) = launched.as_deref_mut() {
                if command.at_exit() {
                    let caught_up = session.catch_up();
                    command.let_go();
                    if let Some(stopped_by) = caught_up? {
                        break stopped_by;
                    }
                }
            }
        }
        if let Some(stopped_by) = session.take_in()? {
            break stopped_by;
        }
    };
    session.report(Some(stopped_by))
}

/// A trace on psleak's own probes: events drained into its own ledger.
struct Own<'obj> {
    live: Live<'obj>,
    output: Output,
    reports: report::Reporter,
    /// Records were left after a bounded drain: they are read on at once, the timers and
    /// signals looked at between turns.
    more: bool,
}

impl Traced for Own<'_> {
    fn wait(&mut self, signals: RawFd, timeout: Duration) -> Result<(), Error> {
        self.live.wait(&[signals], if self.more { Duration::ZERO } else { timeout })
    }

    fn take_in(&mut self) -> Result<Option<StoppedBy>, Error> {
        if !self.live.target_alive() {
            return Ok(Some(StoppedBy::TargetExited));
        }
        self.more = self.live.drain_some()?;
        // After what was drained, before anything is shown: the target may have become root.
        Ok((!still_traceable(&mut self.live)?).then_some(StoppedBy::TargetChangedUser))
    }

    fn catch_up(&mut self) -> Result<Option<StoppedBy>, Error> {
        self.live.drain_to_now(None)?;
        Ok((!still_traceable(&mut self.live)?).then_some(StoppedBy::TargetChangedUser))
    }

    fn report(&mut self, stopped_by: Option<StoppedBy>) -> Result<(), Error> {
        // A target that became someone else's by its end (its exec unchecked when it exited,
        // say) is shown as one that did: censored.
        let stopped_by = match stopped_by {
            Some(stopped_by) if !drain_final(&mut self.live, stopped_by)? => Some(StoppedBy::TargetChangedUser),
            other => other,
        };
        let live = &mut self.live;
        let lost = live.lost();
        // Once the target runs as someone we may not trace, nothing of what it does is shown:
        // neither its ledger (all made since the exec) nor its counters.
        let censored = stopped_by == Some(StoppedBy::TargetChangedUser);
        let nothing = Ledger::new();
        let reports = &mut self.reports;
        let report = live.with_sites(|collector, described| {
            let ledger = if censored { &nothing } else { &collector.ledger };
            let alive = || collector.decoder.process.is_alive() && !censored;
            reports.report(ledger, described, monotonic_ns(), &alive, lost, stopped_by)
        });
        self.output.emit(&report)
    }
}

/// SIGINT and SIGTERM, blocked and read from a signalfd: they end the trace with a final report
/// instead of killing it; SIGCHLD, which says that a command psleak started stopped. (psleak
/// trace has no other thread the signals could go to.)
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    fn take() -> Result<Self, Error> {
        let failed = || Error::Io("cannot handle SIGINT, SIGTERM and SIGCHLD".into(), io::Error::last_os_error());
        // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initializes it;
        // the other calls take valid pointers to it, and a null old mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(failed());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(failed());
            }
            Ok(Self { fd: OwnedFd::from_raw_fd(fd) })
        }
    }

    /// The signal that came, if one did.
    fn pending(&self) -> Option<i32> {
        let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which has room for them.
        let read = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        // SAFETY: a read of the whole struct initialized it.
        (read == size as isize).then(|| unsafe { info.assume_init() }.ssi_signo as i32)
    }
}

/// The last drain: what the ring holds, unless the target now runs as someone we may not see;
/// whether what the ledger holds may be shown. Asked to stop, the user gets at most
/// `SIGNALLED_DRAIN` of it (in a flood, a full ring takes a while to read).
fn drain_final(live: &mut Live<'_>, stopped_by: StoppedBy) -> Result<bool, Error> {
    if stopped_by == StoppedBy::TargetChangedUser || !still_traceable(live)? {
        return Ok(false);
    }
    let signalled = [StoppedBy::Interrupted, StoppedBy::Terminated].contains(&stopped_by);
    let unread = live.drain_to_now(signalled.then(|| Instant::now() + SIGNALLED_DRAIN))?;
    if unread > 0 {
        say(&format!(
            "psleak: stopped with {} KiB of events still unread in the ring; the last report misses them",
            unread.div_ceil(1024)
        ));
    }
    Ok(true)
}

/// How long the final drain may take once a signal asked psleak to stop.
const SIGNALLED_DRAIN: Duration = Duration::from_secs(1);

/// After an exec, whether the target still runs as someone psleak's user may trace (a setuid
/// program may have made it root): checked on what the kernel counts, which no full ring hides.
fn still_traceable(live: &mut Live<'_>) -> Result<bool, Error> {
    if live.new_execs() == 0 {
        return Ok(true);
    }
    match live.collector().decoder.process.exec_refusal(&Credentials::own()) {
        None => Ok(true),
        Some(why) => {
            say(&format!("psleak: {why}"));
            Ok(false)
        }
    }
}
