//! A collector session: probes attached to one target for as long as its client talks to us
//! over a Unix socket (`protocol.rs`). Every request is answered only after the ring has been
//! drained, so a client that asks after calling its function sees all that the call did.

use std::cell::RefCell;
use std::io::{self, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libbpf_rs::RingBufferBuilder;
use psleak_ebpf::{Options, Probes};
use serde_json::json;

use crate::answer::{failure, read_request, reply_line, Answerer};
use crate::error::Error;
use crate::process::Process;
use crate::protocol::{Reply, VERSION};
use crate::report::Lost;
use crate::sites::{Described, SiteNamer};
use crate::tracer::{self, Collector};

/// How often the ring is drained while the client is quiet (probes wake us only for bursts).
const DRAIN_PERIOD: Duration = Duration::from_millis(20);

/// What the owner of a session (the daemon) sees of it and may ask of it.
#[derive(Default)]
pub struct Control {
    /// Set to end the session (the daemon is shutting down).
    pub stop: AtomicBool,
    /// The session ends when its client has asked nothing for this long.
    pub idle_limit: Option<Duration>,
    /// Events received so far, and lost: to a full ring, or without their stack.
    pub events: AtomicU64,
    pub lost_ring_full: AtomicU64,
    pub lost_no_stack: AtomicU64,
}

/// Attaches to `pid` and serves `stream` until the client hangs up or the target exits. The
/// first line sent is the outcome of the attach: ready, or the error that prevented it.
pub fn serve(stream: UnixStream, pid: u32, options: &Options) -> Result<(), Error> {
    let requests = BufReader::new(stream.try_clone().map_err(|e| Error::Io("cannot use the client socket".into(), e))?);
    serve_requests(requests, stream, pid, options, &Control::default())
}

/// `serve`, reading requests from `requests` (which may hold lines already read) and under `control`.
pub fn serve_requests(
    mut requests: BufReader<UnixStream>,
    mut out: UnixStream,
    pid: u32,
    options: &Options,
    control: &Control,
) -> Result<(), Error> {
    let mut storage = MaybeUninit::uninit();
    let (process, target, probes) = match attach_to(&mut storage, pid, options) {
        Ok(attached) => attached,
        Err(err) => {
            let _ = out.write_all(failure(err.to_string()).as_bytes());
            return Err(err);
        }
    };
    let ready = json!({
        "version": VERSION,
        "pid": pid,
        "backend": "eBPF",
        "probes": probes.attachments(),
        "libc": target.libc,
        "python": target.python,
    });
    out.write_all(reply_line(&Reply { ok: true, body: ready }).as_bytes()).map_err(client_gone)?;

    let collector = RefCell::new(Collector::new(process));
    let ring_error = |e: libbpf_rs::Error| Error::Io("cannot read the event ring".into(), io::Error::other(e));
    let mut builder = RingBufferBuilder::new();
    builder
        .add(probes.events(), |record: &[u8]| {
            collector.borrow_mut().ingest(record);
            control.events.fetch_add(1, Ordering::Relaxed);
            0
        })
        .map_err(ring_error)?;
    let ring = builder.build().map_err(ring_error)?;
    let drain = || ring.consume().and_then(|()| ring.poll(Duration::ZERO)).map_err(ring_error);
    let mut sites = SiteNamer::new(&target);
    let mut answerer = Answerer::new();
    let exit_fd = collector.borrow().decoder.process.exit_fd();
    let mut last_request = Instant::now();
    loop {
        if control.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if control.idle_limit.is_some_and(|limit| last_request.elapsed() > limit) {
            let _ = out.write_all(failure("session ended: idle for too long".into()).as_bytes());
            return Ok(());
        }
        let mut fds = [
            libc::pollfd { fd: requests.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: ring.epoll_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: exit_fd, events: libc::POLLIN, revents: 0 },
        ];
        if requests.buffer().is_empty() {
            // SAFETY: three valid pollfds, owned above for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, DRAIN_PERIOD.as_millis() as i32) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(Error::Io("cannot wait for requests".into(), io::Error::last_os_error()));
            }
        } else {
            fds[0].revents = libc::POLLIN;
        }
        drain()?;
        let losses = probes.losses();
        control.lost_ring_full.store(losses.ring_full, Ordering::Relaxed);
        control.lost_no_stack.store(losses.no_stack, Ordering::Relaxed);
        if fds[2].revents != 0 {
            return Ok(()); // the target exited: nobody is left to ask
        }
        if fds[0].revents == 0 {
            continue;
        }
        last_request = Instant::now();
        let reply = match read_request(&mut requests) {
            Ok(Some(line)) => {
                let mut c = collector.borrow_mut();
                // A library loaded since attach (the extension under test) must be known to name sites.
                let _ = c.decoder.process.refresh_mappings();
                let lost = Lost { ring_full: losses.ring_full, no_stack: losses.no_stack, corrupt: c.corrupt };
                let mut described = Described { sites: &mut sites, probes: &probes, collector: &c };
                answerer.handle(&line, &c.ledger, &mut described, lost)
            }
            Ok(None) => return Ok(()), // the client hung up
            Err(e) if e.kind() == io::ErrorKind::InvalidData => failure(e.to_string()),
            Err(e) => return Err(client_gone(e)),
        };
        out.write_all(reply.as_bytes()).map_err(client_gone)?;
        if answerer.detached {
            return Ok(());
        }
    }
}

fn attach_to<'obj>(
    storage: &'obj mut MaybeUninit<psleak_ebpf::OpenObject>,
    pid: u32,
    options: &Options,
) -> Result<(Process, psleak_ebpf::Target, Probes<'obj>), Error> {
    tracer::check_prerequisites(options)?;
    let mut process = Process::open(pid)?;
    let target = tracer::target_of(&mut process)?;
    let probes = tracer::attach(storage, &process, &target, options)?;
    Ok((process, target, probes))
}

fn client_gone(e: io::Error) -> Error {
    Error::Io("the client went away".into(), e)
}
