//! A collector session: probes attached to one target for as long as its client talks to us
//! over a Unix socket (`protocol.rs`). Every request is answered only after the ring has been
//! drained up to the request, so a client that asks after calling its function sees all that
//! the call did.
//!
//! The client is untrusted (the daemon serves other users): its socket is read without ever
//! blocking, at most a line's cap held; a reply it does not read for `REPLY_LIMIT` ends the
//! session; and nothing it does keeps the session from seeing `Control::stop` within a turn
//! of the loop.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use psleak_ebpf::Options;

use crate::backends::ebpf::live::{monotonic_ns, wait_readable, Live, DRAIN_PERIOD};
use crate::error::Error;
use crate::model::ledger::Ledger;
use crate::model::lost::Lost;
use crate::process::{Credentials, Process};
use crate::report::{Reporter, Selection, StoppedBy};
use crate::serve::answer::{failure, json_line, reply_line, Answerer, Moment};
use crate::serve::protocol::{self, Next, Ready, Reply, RequestReader, VERSION};

/// How long a client may leave a reply unread before the session gives up on it.
const REPLY_LIMIT: Duration = Duration::from_secs(10);

/// How often a session blocked on its client looks at `Control::stop`.
const STOP_CHECK_PERIOD: Duration = Duration::from_millis(100);

/// How often a session tells its owner its events and losses (`psleak daemon --status`): the
/// losses are read from the kernel, and a flood's reader turns thousands of times a second
/// (each turn reading them made a daemon's session cost 3x the CPU per event of psleak trace).
const PROGRESS_PERIOD: Duration = Duration::from_millis(100);

/// Heap blocks and mappings a session's ledger keeps at most, unless told otherwise.
pub const DEFAULT_LEDGER_ROOM: usize = 2_000_000;

/// What the owner of a session (the daemon) sees of it and may ask of it.
#[derive(Default)]
pub struct Control {
    /// Set to end the session (the daemon is shutting down).
    pub stop: AtomicBool,
    /// The session ends when its client has asked nothing for this long.
    pub idle_limit: Option<Duration>,
    /// Events received so far, and what was lost.
    pub events: AtomicU64,
    lost: Mutex<Lost>,
}

impl Control {
    /// The control of a session that ends after `idle_limit` without a request.
    pub fn idle_after(idle_limit: Duration) -> Self {
        Self { idle_limit: Some(idle_limit), ..Self::default() }
    }

    pub fn lost(&self) -> Lost {
        *self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a session is run.
pub struct SessionConfig<'a> {
    pub options: &'a Options,
    pub control: &'a Control,
    /// Whom the session acts for: after the target execs, it goes on only while this client
    /// may still trace it (a setuid program may have made it root).
    pub client: Credentials,
    pub ledger_room: usize,
    /// The client is a tracer, not the target: it is served reports, and once the target exits
    /// the session waits for it to ask for the last one.
    pub final_report: bool,
}

/// The client's end: a non-blocking socket, its requests read a chunk at a time.
pub struct Client {
    stream: UnixStream,
    requests: RequestReader,
}

impl Client {
    /// `requests` may hold what was read of the stream already.
    pub fn new(stream: UnixStream, requests: RequestReader) -> Result<Self, Error> {
        stream.set_nonblocking(true).map_err(client_gone)?;
        Ok(Self { stream, requests })
    }

    fn next(&mut self) -> Result<Next, Error> {
        let stream = &mut self.stream;
        self.requests.next(|buf| stream.read(buf)).map_err(client_gone)
    }

    /// Sends `line`, waiting for the client to read it at most `REPLY_LIMIT`, and never past a
    /// stop.
    fn send(&mut self, line: &str, stop: &AtomicBool) -> Result<(), Error> {
        let mut rest = line.as_bytes();
        let deadline = Instant::now() + REPLY_LIMIT;
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return Err(client_gone(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "it does not read its replies",
                        )));
                    }
                    let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut fd, 1, STOP_CHECK_PERIOD.as_millis() as i32) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(client_gone(e)),
            }
        }
        Ok(())
    }
}

/// The private collector: attaches to `pid` and serves `stream` until the client hangs up or
/// the target exits, its ledger keeping at most `ledger_room` blocks and mappings. The first
/// line sent is the outcome of the attach: ready, or its error.
pub fn serve(stream: UnixStream, pid: u32, options: &Options, ledger_room: usize) -> Result<(), Error> {
    let mut client = Client::new(stream, RequestReader::default())?;
    let control = Control::default();
    let process = match Process::open(pid) {
        Ok(process) => process,
        Err(err) => {
            let _ = client.send(&failure(err.to_string()), &control.stop);
            return Err(err);
        }
    };
    let config =
        SessionConfig { options, control: &control, client: Credentials::own(), ledger_room, final_report: false };
    serve_process(client, process, pid, &config)
}

/// Attaches to `process` (which the client calls `pid`) and serves `client` until it hangs
/// up, the target exits, or `config.control` ends the session.
pub fn serve_process(mut client: Client, process: Process, pid: u32, config: &SessionConfig<'_>) -> Result<(), Error> {
    let control = config.control;
    let mut storage = MaybeUninit::uninit();
    // Checked again once the probes count execs: one in between (the attach takes a while)
    // may have made the target a setuid program's.
    let attached = Live::attach(&mut storage, process, config.options, config.ledger_room).and_then(|live| {
        live.collector().decoder.process.check_traceable_by(&config.client)?;
        Ok(live)
    });
    let mut live = match attached {
        Ok(live) => live,
        Err(err) => {
            let _ = client.send(&failure(err.to_string()), &control.stop);
            return Err(err);
        }
    };
    let ready = Ready {
        version: VERSION,
        pid,
        backend: "eBPF",
        probes: live.probes.attachments(),
        allocators: config.options.allocators.name(),
        libc: Some(live.target.libc.clone()),
        python: live.target.python.clone(),
        missing: vec![],
    };
    client.send(&reply_line(&Reply { ok: true, body: ready }), &control.stop)?;

    // Only a tracer asks for reports: a test's session does not read the target's counters for
    // a baseline it would never use (smaps_rollup may take up to 250 ms of a busy target).
    let reporter = config
        .final_report
        .then(|| Reporter::new(live.collector().decoder.process.pid(), Selection::default()).shown_as(pid));
    let mut answerer = Answerer::new(reporter);
    let mut last_request = Instant::now();
    let mut more = false;
    // When the target exited, or became someone the client may not trace, while its client
    // makes reports (a tracer, not the target): the client has REPLY_LIMIT to ask for the last.
    let mut over: Option<Ended> = None;
    let mut progress_told = Instant::now();
    // What a censored session's last report shows of the target: nothing.
    let nothing = Ledger::new();
    loop {
        if control.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if control.idle_limit.is_some_and(|limit| last_request.elapsed() > limit) {
            let _ = client.send(&failure("session ended: idle for too long".into()), &control.stop);
            return Ok(());
        }
        match &over {
            Some(over) if over.at.elapsed() > REPLY_LIMIT => return over.ended(),
            // What the client sends: nothing else is waited for any more (a failed wait is seen
            // by the read that follows).
            Some(_) => {
                let _ = wait_readable(&[client.stream.as_raw_fd()], DRAIN_PERIOD);
            }
            None => {
                if !more && !client.requests.has_unread() {
                    live.wait(&[client.stream.as_raw_fd()], DRAIN_PERIOD)?;
                }
                more = live.drain_some()?;
                if progress_told.elapsed() >= PROGRESS_PERIOD {
                    report_progress(&live, control);
                    progress_told = Instant::now();
                }
                match after_drain(&mut live, &mut client, config)? {
                    Drained::GoOn => {}
                    Drained::End => return Ok(()),
                    Drained::Ended(ended) => over = Some(ended),
                }
            }
        }
        let line = match client.next()? {
            Next::Line(line) => line,
            Next::Pending => continue,
            Next::Closed => return Ok(()), // the client hung up
        };
        last_request = Instant::now();
        let reply = match line {
            Ok(line) => {
                if over.is_none() {
                    live.drain_to_now(None)?;
                    match after_drain(&mut live, &mut client, config)? {
                        Drained::GoOn => {}
                        Drained::End => return Ok(()),
                        Drained::Ended(ended) => over = Some(ended),
                    }
                }
                let lost = live.lost();
                let censored = over.as_ref().is_some_and(|over| over.censored.is_some());
                live.with_sites(|collector, described| {
                    let alive = || !censored && collector.decoder.process.is_alive();
                    let ledger = if censored { &nothing } else { &collector.ledger };
                    let now = Moment { lost, alive: &alive, clock_ns: monotonic_ns(), censored };
                    answerer.handle(&line, ledger, described, &now)
                })
            }
            Err(why) => failure(why),
        };
        client.send(&reply, &control.stop)?;
        // What was answered, the owner's status shows at once.
        report_progress(&live, control);
        progress_told = Instant::now();
        if answerer.detached {
            return over.map_or(Ok(()), |over| over.ended());
        }
    }
}

/// What a session does once it has drained the ring.
enum Drained {
    GoOn,
    /// The target exited, and nobody is left to ask (its client was the target).
    End,
    /// The client, a tracer, may ask for the last report.
    Ended(Ended),
}

/// A tracer's session whose target is gone, or no longer its client's to see.
struct Ended {
    /// When: the client has REPLY_LIMIT from then to ask for the last report.
    at: Instant,
    /// Why the target is no longer the client's to see, if it is not: its last report then
    /// shows nothing of it, and says why (as psleak trace's own probes do).
    censored: Option<String>,
}

impl Ended {
    /// How the session ends: a censored one with its reason, for the daemon's log.
    fn ended(&self) -> Result<(), Error> {
        self.censored.as_ref().map_or(Ok(()), |why| Err(Error::Refused(why.clone())))
    }
}

/// After a drain: what was drained is the target's only if it is still the target (alive), and
/// the client's to see only if the target still runs as the client. A refusal is told a test's
/// client and is the session's error; a tracer is told at once that its session is over, and
/// gets a last report that shows nothing.
fn after_drain(live: &mut Live<'_>, client: &mut Client, config: &SessionConfig<'_>) -> Result<Drained, Error> {
    if let Some(why) = lost_authorization(live, &config.client) {
        if !config.final_report {
            return Err(end_refused(client, why, config.control));
        }
        return censored(client, why, config.control);
    }
    if live.target_alive() {
        return Ok(Drained::GoOn);
    }
    if !config.final_report {
        return Ok(Drained::End);
    }
    // What it did until its exit is read, and nothing after: its pid may come to another
    // process once the kernel's cyclic pid allocation has gone round all of pid_max, which
    // takes far longer than the read. An exec among it cannot be checked any more.
    live.drain_to_now(None)?;
    match lost_authorization(live, &config.client) {
        Some(why) => censored(client, why, config.control),
        None => Ok(Drained::Ended(Ended { at: Instant::now(), censored: None })),
    }
}

/// Tells a tracer at once that its target is no longer its to see (`protocol::Over`): its
/// session is over, and its last report shows nothing.
fn censored(client: &mut Client, why: String, control: &Control) -> Result<Drained, Error> {
    let notice = protocol::Over { over: StoppedBy::TargetChangedUser, why: why.clone() };
    client.send(&json_line(&notice), &control.stop)?;
    Ok(Drained::Ended(Ended { at: Instant::now(), censored: Some(why) }))
}

fn report_progress(live: &Live<'_>, control: &Control) {
    control.events.store(live.collector().ledger.events(), Ordering::Relaxed);
    *control.lost.lock().unwrap_or_else(|e| e.into_inner()) = live.lost();
}

/// Why the session may not go on, if the target exec'd a program that `client` may not
/// trace. Read from what the kernel counts, after the events drained: any event of the new
/// program that was drained came after its exec was counted.
fn lost_authorization(live: &mut Live<'_>, client: &Credentials) -> Option<String> {
    if live.new_execs() == 0 {
        return None;
    }
    live.collector().decoder.process.exec_refusal(client)
}

/// Tells the client why its session ends, and returns that as the session's error.
fn end_refused(client: &mut Client, why: String, control: &Control) -> Error {
    let _ = client.send(&failure(format!("session ended: {why}")), &control.stop);
    Error::Refused(why)
}

fn client_gone(e: io::Error) -> Error {
    Error::Io("the client went away".into(), e)
}
