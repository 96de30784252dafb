//! `psleak trace --pid PID`: attach to a running process and report, every interval, what it
//! created since attach and still holds, until the duration ends, Ctrl-C, or the target exits.

use std::cell::RefCell;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use libbpf_rs::RingBufferBuilder;
use psleak_ebpf::{Probes, Target};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};

use crate::error::Error;
use crate::process::Process;
use crate::report::{self, Lost, Selection};
use crate::sites::{Described, SiteNamer};
use crate::tracer::{self, Collector};

#[derive(Debug, Clone)]
pub struct TraceArgs {
    pub pid: u32,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub json: bool,
    pub selection: Selection,
    pub options: psleak_ebpf::Options,
}

/// A raw fd for tokio to poll (the ring's epoll fd, the target's pidfd); owned elsewhere.
struct Pollable(RawFd);

impl AsRawFd for Pollable {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub fn run(args: &TraceArgs) -> Result<(), Error> {
    tracer::check_prerequisites(&args.options)?;
    let mut process = Process::open(args.pid)?;
    let target = tracer::target_of(&mut process)?;
    let started = Instant::now();
    let mut storage = MaybeUninit::uninit();
    let probes = tracer::attach(&mut storage, &process, &target, &args.options)?;
    let attached = format!(
        "psleak: tracing pid {} ({}): {} probes on {}{}, attached in {:.2}s",
        process.pid(),
        process.name(),
        probes.attachments(),
        target.libc.display(),
        target.python.as_ref().map_or(String::new(), |p| format!(" and {}", p.display())),
        started.elapsed().as_secs_f64(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("cannot start the event loop".into(), e))?;
    let reporter = Reporter::new(args, &probes, &target, process.pid());
    let collector = RefCell::new(Collector::new(process));
    runtime.block_on(watch(args, &probes, &collector, reporter, &attached))
}

/// Consumes events as they arrive and reports every interval until the session ends.
async fn watch(
    args: &TraceArgs,
    probes: &Probes<'_>,
    collector: &RefCell<Collector>,
    mut reporter: Reporter<'_>,
    attached: &str,
) -> Result<(), Error> {
    let io_error = |what: &str| {
        let what = what.to_string();
        move |e| Error::Io(what, e)
    };
    let ring_error = |e: libbpf_rs::Error| Error::Io("cannot read the event ring".into(), io::Error::other(e));
    let mut builder = RingBufferBuilder::new();
    builder
        .add(probes.events(), |record: &[u8]| {
            collector.borrow_mut().ingest(record);
            0
        })
        .map_err(ring_error)?;
    let ring = builder.build().map_err(ring_error)?;
    // SAFETY: the ring's epoll fd and the process's pidfd stay open for as long as these
    // registrations, which are dropped first (declared after `ring`; `collector` outlives us).
    let ring_ready = unsafe { AsyncFd::register_with_interest(Pollable(ring.epoll_fd()), Interest::READABLE) }
        .map_err(|e| io_error("cannot poll the event ring")(e.into()))?;
    let target_exit = unsafe {
        AsyncFd::register_with_interest(Pollable(collector.borrow().decoder.process.exit_fd()), Interest::READABLE)
    }
    .map_err(|e| io_error("cannot watch the target")(e.into()))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io_error("cannot handle SIGINT"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io_error("cannot handle SIGTERM"))?;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    let ends_at = args.duration.map(|d| tokio::time::Instant::now() + d);
    let deadline = tokio::time::sleep_until(ends_at.unwrap_or_else(far_future));
    tokio::pin!(deadline);
    // Only now does Ctrl-C end the session with a final report.
    eprintln!("{attached}");

    // consume() reads every record, whether or not the probes woke us for it; poll(0) then
    // empties the ready list of libbpf's epoll fd, whose edges are what wake us up (left set,
    // no edge would ever come again).
    let drain = || ring.consume().and_then(|()| ring.poll(Duration::ZERO)).map_err(ring_error);
    // The probes wake us only when much is waiting (common.bpf.h): drain the rest regularly.
    let mut drain_ticks = tokio::time::interval(DRAIN_PERIOD);
    drain_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped_by = loop {
        tokio::select! {
            ready = ring_ready.readable() => {
                let mut guard = ready.map_err(io_error("cannot poll the event ring"))?;
                drain()?;
                guard.clear_ready();
            }
            _ = drain_ticks.tick() => drain()?,
            _ = ticks.tick() => {
                // A tick right before the end would repeat the final report.
                if ends_at.is_none_or(|end| end.duration_since(tokio::time::Instant::now()) > args.interval / 2) {
                    drain()?;
                    report(&mut reporter, collector, None)?;
                }
            }
            _ = target_exit.readable() => break "the target exited",
            _ = interrupt.recv() => break "interrupted",
            _ = terminate.recv() => break "terminated",
            _ = &mut deadline => break "the duration ended",
        }
    };
    drain()?;
    report(&mut reporter, collector, Some(stopped_by))
}

/// Emits a report, with the target's code mappings brought up to date first (a library
/// loaded since attach must be known to name its sites, even after the target exits).
fn report(
    reporter: &mut Reporter<'_>,
    collector: &RefCell<Collector>,
    stopped_by: Option<&'static str>,
) -> Result<(), Error> {
    // A target that has just exited keeps the mappings last seen.
    let _ = collector.borrow_mut().decoder.process.refresh_mappings();
    reporter.emit(&collector.borrow(), stopped_by)
}

/// Emits the reports of one session: the ledger's, with sites symbolized from the target's ELF
/// files, as text or JSON lines on stdout.
struct Reporter<'a> {
    json: bool,
    probes: &'a Probes<'a>,
    sites: SiteNamer,
    reports: report::Reporter,
}

impl<'a> Reporter<'a> {
    fn new(args: &TraceArgs, probes: &'a Probes<'a>, target: &Target, pid: u32) -> Self {
        let reports = report::Reporter::new(pid, args.selection);
        Self { json: args.json, probes, sites: SiteNamer::new(target), reports }
    }

    fn emit(&mut self, collector: &Collector, stopped_by: Option<&'static str>) -> Result<(), Error> {
        let losses = self.probes.losses();
        let lost = Lost { ring_full: losses.ring_full, no_stack: losses.no_stack, corrupt: collector.corrupt };
        let alive = collector.decoder.process.is_alive();
        let mut described = Described { sites: &mut self.sites, probes: self.probes, collector };
        let report = self.reports.report(&collector.ledger, &mut described, monotonic_ns(), alive, lost, stopped_by);
        let text = if self.json {
            let mut line = serde_json::to_string(&report).expect("reports serialize");
            line.push('\n');
            line
        } else {
            report.to_text()
        };
        let mut out = io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            // `psleak trace ... | head`: the reader is gone, and so is the point of tracing.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::OutputClosed),
            result => result.map_err(|e| Error::Io("cannot write the report".into(), e)),
        }
    }
}

const DRAIN_PERIOD: Duration = Duration::from_millis(20);

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// CLOCK_MONOTONIC, the clock of the probes' timestamps.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
