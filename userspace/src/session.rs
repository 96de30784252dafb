//! A collector session: probes attached to one target for as long as its client talks to us
//! over a Unix socket (`protocol.rs`). Every request is answered only after the ring has been
//! drained, so a client that asks after calling its function sees all that the call did.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libbpf_rs::RingBufferBuilder;
use psleak_ebpf::{Options, Probes};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::Error;
use crate::ledger::{Filter, Ledger, Mark, Memory, SiteTotals};
use crate::process::Process;
use crate::protocol::{Failure, Reply, Request, MAX_REQUEST_BYTES, VERSION};
use crate::report::{FdReport, ThreadReport};
use crate::sites::SiteNamer;
use crate::tracer::{self, Collector};
use crate::verdict::Measurement;

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
            let _ = send(&mut out, &Reply { ok: false, body: Failure { error: err.to_string() } });
            return Err(err);
        }
    };
    let ready = json!({
        "version": VERSION,
        "pid": pid,
        "probes": probes.attachments(),
        "libc": target.libc,
        "python": target.python,
    });
    send(&mut out, &Reply { ok: true, body: ready }).map_err(client_gone)?;

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
    let mut handler = Handler {
        probes: &probes,
        collector: &collector,
        sites: SiteNamer::new(&target),
        measurements: HashMap::new(),
        next_measurement: 1,
        detached: false,
    };
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
            Ok(Some(line)) => handler.handle(&line),
            Ok(None) => return Ok(()), // the client hung up
            Err(e) if e.kind() == io::ErrorKind::InvalidData => failure(e.to_string()),
            Err(e) => return Err(client_gone(e)),
        };
        out.write_all(reply.as_bytes()).map_err(client_gone)?;
        if handler.detached {
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

fn send<T: Serialize>(out: &mut UnixStream, reply: &Reply<T>) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    line.push('\n');
    out.write_all(line.as_bytes())
}

pub fn failure(error: String) -> String {
    let mut line = serde_json::to_string(&Reply { ok: false, body: Failure { error } }).expect("replies serialize");
    line.push('\n');
    line
}

/// One request line; an oversized one is consumed up to its end and refused.
pub fn read_request(reader: &mut BufReader<UnixStream>) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let read = reader.by_ref().take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() <= MAX_REQUEST_BYTES {
            return Ok(None); // the client hung up mid-line
        }
        let mut rest = Vec::new();
        reader.read_until(b'\n', &mut rest)?;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request longer than {MAX_REQUEST_BYTES} bytes refused"),
        ));
    }
    String::from_utf8(line).map(Some).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))
}

struct Handler<'a> {
    probes: &'a Probes<'a>,
    collector: &'a RefCell<Collector>,
    sites: SiteNamer,
    measurements: HashMap<u64, Measurement>,
    next_measurement: u64,
    /// The client asked to detach: the session ends after this reply.
    detached: bool,
}

impl Handler<'_> {
    /// The reply line to one request line.
    fn handle(&mut self, line: &str) -> String {
        let request = match serde_json::from_str::<Request>(line) {
            Ok(request) => request,
            Err(e) => return failure(format!("bad request: {e}")),
        };
        match self.answer(request) {
            Ok(body) => {
                let mut line = serde_json::to_string(&Reply { ok: true, body }).expect("replies serialize");
                line.push('\n');
                line
            }
            Err(error) => failure(error),
        }
    }

    fn answer(&mut self, request: Request) -> Result<Value, String> {
        let mut c = self.collector.borrow_mut();
        // A library loaded since attach (the extension under test) must be known to name sites.
        let _ = c.decoder.process.refresh_mappings();
        let losses = self.probes.losses();
        let lost = json!({"ring_full": losses.ring_full, "no_stack": losses.no_stack, "corrupt": c.corrupt});
        Ok(match request {
            Request::Hello { version } if version == VERSION => json!({"version": VERSION}),
            Request::Hello { version } => {
                return Err(format!("protocol version {version} is not served (this collector speaks {VERSION})"))
            }
            Request::Mark => json!({"mark": c.ledger.mark()}),
            Request::Created { since } => {
                let process = &c.decoder.process;
                let fds: Vec<FdReport> = c
                    .ledger
                    .open_fds(since)
                    .map(|(fd, f)| {
                        let (site, stack) = self.sites.name(c.ledger.origin(f.site), self.probes, &c.decoder);
                        let target = process.fd_target(fd);
                        FdReport { fd, kind: f.kind.describe(), target, age_s: 0.0, site, stack }
                    })
                    .collect();
                let threads: Vec<ThreadReport> = c
                    .ledger
                    .live_threads(since)
                    .map(|(tid, t)| {
                        let (site, stack) = self.sites.name(c.ledger.origin(t.site), self.probes, &c.decoder);
                        ThreadReport { tid, name: process.thread_name(tid), age_s: 0.0, site, stack }
                    })
                    .collect();
                json!({"fds": fds, "threads": threads, "lost": lost})
            }
            Request::Begin => {
                let id = self.next_measurement;
                self.next_measurement += 1;
                self.measurements.insert(id, Measurement::default());
                json!({"measurement": id})
            }
            Request::Window { measurement } => {
                let m = self.measurements.get_mut(&measurement).ok_or(format!("no measurement {measurement}"))?;
                m.open_window = Some(c.ledger.mark());
                json!({})
            }
            Request::Batch { measurement, calls, tolerance, confirm, top } => {
                let m = self.measurements.get_mut(&measurement).ok_or(format!("no measurement {measurement}"))?;
                let since = m.open_window.take().ok_or("a batch must start with a window request")?;
                m.windows.push((since, c.ledger.mark()));
                let live = live_in_windows(&c.ledger, &m.windows);
                let (verdict, growth) = m.batch(&live, calls, &tolerance, confirm);
                let (mut heap_bytes, mut heap_blocks, mut mmap_bytes) = (0, 0, 0);
                for t in &live {
                    match t.memory {
                        Memory::Heap(_) => (heap_bytes, heap_blocks) = (heap_bytes + t.bytes, heap_blocks + t.count),
                        Memory::Mmap => mmap_bytes += t.bytes,
                    }
                }
                let sites: Vec<Value> = growth
                    .iter()
                    .take(top)
                    .map(|g| {
                        let (site, stack) = self.sites.name(c.ledger.origin(g.totals.site), self.probes, &c.decoder);
                        json!({
                            "memory": g.totals.memory,
                            "count": g.totals.count,
                            "bytes": g.totals.bytes,
                            "count_growth": g.count_growth,
                            "bytes_growth": g.bytes_growth,
                            "streak": g.streak,
                            "site": site,
                            "stack": stack,
                        })
                    })
                    .collect();
                json!({
                    "mark": c.ledger.mark(),
                    "verdict": verdict,
                    "growing_sites": growth.len(),
                    "sites": sites,
                    "live": {"heap_bytes": heap_bytes, "heap_blocks": heap_blocks, "mmap_bytes": mmap_bytes},
                    "lost": lost,
                })
            }
            Request::End { measurement } => {
                self.measurements.remove(&measurement).ok_or(format!("no measurement {measurement}"))?;
                json!({})
            }
            Request::Detach => {
                self.detached = true;
                json!({})
            }
        })
    }
}

/// Live memory created inside any of the windows, by site.
fn live_in_windows(ledger: &Ledger, windows: &[(Mark, Mark)]) -> Vec<SiteTotals> {
    let mut by_site: HashMap<(Memory, u32), SiteTotals> = HashMap::new();
    for &(since, until) in windows {
        for t in ledger.memory_by_site(&Filter { since, until: Some(until), ..Filter::default() }) {
            let total = by_site.entry((t.memory, t.site)).or_insert(SiteTotals { count: 0, bytes: 0, ..t });
            total.count += t.count;
            total.bytes += t.bytes;
        }
    }
    by_site.into_values().collect()
}
