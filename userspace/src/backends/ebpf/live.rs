//! One live eBPF session: probes attached to a process, the ring their events arrive in, and
//! the ledger those feed. The private collector, the daemon's sessions and `psleak trace` each
//! run one, in one loop of the same shape: [`Live::wait`] for the ring, the target's exit or
//! the caller's own fds (a client's socket, signals), [`Live::drain_some`], then what the
//! caller does with its fds, until it is done.
//!
//! Draining is bounded: a target whose threads fill the ring faster than the collector reads it
//! (a flood) must not hold up timers, signals or other clients. What the kernel could not put
//! in a full ring is counted as lost and reported, never silently missing.

use std::cell::{Ref, RefCell, RefMut};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use libbpf_rs::{AsRawLibbpf, RingBuffer, RingBufferBuilder};
use psleak_ebpf::{OpenObject, Options, Probes, Target};

use crate::backends::ebpf::naming::{Described, SiteNamer};
use crate::backends::ebpf::python::PythonStacks;
use crate::backends::ebpf::tracer::{self, Collector};
use crate::error::Error;
use crate::model::lost::Lost;
use crate::process::Process;

/// Records read at most per `drain_some`: ~10 ms of decoding, so that a flood leaves the
/// caller's loop turning.
const DRAIN_BATCH: usize = 16 * 1024;

/// How often the ring is drained while nothing else happens (the probes wake us only for bursts).
pub const DRAIN_PERIOD: Duration = Duration::from_millis(20);

/// How long `drain_to_now` waits for records that probes reserved but have not committed yet
/// (they do so within microseconds: this bounds it against the unforeseen).
const COMMIT_WAIT: Duration = Duration::from_secs(1);

pub struct Live<'obj> {
    // Declared first, dropped first: the ring's callback holds the collector.
    ring: RingBuffer<'static>,
    collector: Rc<RefCell<Collector>>,
    pub probes: Probes<'obj>,
    pub target: Target,
    sites: SiteNamer,
    execs_told: u64,
}

impl<'obj> Live<'obj> {
    /// Attaches the probes to `process`, whose ledger keeps at most `ledger_room` blocks and
    /// mappings. `storage` holds libbpf's object and must outlive the session.
    pub fn attach(
        storage: &'obj mut MaybeUninit<OpenObject>,
        mut process: Process,
        options: &Options,
        ledger_room: usize,
    ) -> Result<Self, Error> {
        tracer::check_prerequisites(options)?;
        let mut target = tracer::target_of(&mut process)?;
        let python = target.python.as_deref().and_then(|p| PythonStacks::of(p, &target.python_code, &target.libc));
        target.python_stack = python.as_ref().map(PythonStacks::probes);
        let probes = tracer::attach(storage, &process, &target, options)?;
        let collector = Rc::new(RefCell::new(Collector::new(process, ledger_room, python)));
        let ring_error = |e: libbpf_rs::Error| Error::Io("cannot read the event ring".into(), io::Error::other(e));
        let mut builder = RingBufferBuilder::new();
        let fed = Rc::clone(&collector);
        builder
            .add(probes.events(), move |record: &[u8]| {
                // A panic must not cross libbpf's C frames (it would abort the daemon, every
                // user's session with it): a record that makes the decoding panic is corrupt.
                let ingested =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fed.borrow_mut().ingest(record)));
                if ingested.is_err() {
                    fed.borrow_mut().corrupt += 1;
                }
                0
            })
            .map_err(ring_error)?;
        let ring = builder.build().map_err(ring_error)?;
        let sites = SiteNamer::new(&target);
        Ok(Self { ring, collector, probes, target, sites, execs_told: 0 })
    }

    /// Waits at most `timeout` for the probes to wake us (much is waiting in the ring), the
    /// target to exit, or one of `also` to be readable; the caller then looks at each.
    pub fn wait(&self, also: &[RawFd], timeout: Duration) -> Result<(), Error> {
        let fds: Vec<RawFd> = [self.ring.epoll_fd(), self.exit_fd()].into_iter().chain(also.iter().copied()).collect();
        wait_readable(&fds, timeout).map_err(|e| Error::Io("cannot wait for the event ring".into(), e))
    }

    pub fn collector(&self) -> Ref<'_, Collector> {
        self.collector.borrow()
    }

    pub fn collector_mut(&self) -> RefMut<'_, Collector> {
        self.collector.borrow_mut()
    }

    /// Reads at most `DRAIN_BATCH` records; whether it read that many (a backlog: call again at
    /// once). Fewer means no more was committed: what the probes write next comes with their
    /// wake-up or the next `DRAIN_PERIOD`. (Asking whether the probes had written more by the end
    /// made a flood's reader spin, a few records a turn: 3x the CPU per event in a daemon's
    /// session, whose turn asks more of the kernel.)
    pub fn drain_some(&self) -> Result<bool, Error> {
        let read = self.ring.consume_raw_n(DRAIN_BATCH);
        if read < 0 {
            return Err(Error::Io("cannot read the event ring".into(), io::Error::from_raw_os_error(-read)));
        }
        Ok(read as usize >= DRAIN_BATCH)
    }

    /// Reads every record the ring held when called (what an answer must include), and no
    /// more: in a flood, new ones keep coming. Bounded by the ring's size, and by `deadline`.
    /// Returns how many bytes of those records were left unread (the deadline came first).
    pub fn drain_to_now(&self, deadline: Option<Instant>) -> Result<u64, Error> {
        let (_, until) = self.positions();
        let started = Instant::now();
        loop {
            let more = self.drain_some()?;
            let (consumed, _) = self.positions();
            let late = deadline.is_some_and(|d| Instant::now() > d);
            if consumed >= until || late || !more && started.elapsed() > COMMIT_WAIT {
                return Ok(until.saturating_sub(consumed));
            }
            if !more {
                // A record reserved before `until` is still being written by its probe.
                std::thread::yield_now();
            }
        }
    }

    /// The ring's consumer and producer positions, in bytes since it was created.
    fn positions(&self) -> (u64, u64) {
        // SAFETY: the ring buffer manager is valid for as long as `self.ring`; it holds one
        // ring (index 0), whose positions libbpf reads from the mapped ring with acquire loads.
        unsafe {
            let ring = libbpf_rs::libbpf_sys::ring_buffer__ring(self.ring.as_libbpf_object().as_ptr(), 0);
            (
                libbpf_rs::libbpf_sys::ring__consumer_pos(ring) as u64,
                libbpf_rs::libbpf_sys::ring__producer_pos(ring) as u64,
            )
        }
    }

    /// Whether the target still runs; `false` from its exit on (its pidfd is readable). A pid
    /// only changes hands after that, so events drained before a `true` are the target's.
    pub fn target_alive(&self) -> bool {
        self.collector().decoder.process.is_alive()
    }

    fn exit_fd(&self) -> RawFd {
        self.collector().decoder.process.exit_fd()
    }

    /// Everything the session could not account for, as of now.
    pub fn lost(&self) -> Lost {
        let losses = self.probes.losses();
        let collector = self.collector();
        Lost {
            ring_full: losses.ring_full,
            no_stack: losses.no_stack,
            untracked_calls: losses.untracked_calls,
            ledger_full: collector.ledger.dropped_for_room,
            corrupt: collector.corrupt,
        }
    }

    /// Calls `f` with what the collector holds and a namer of its sites. The target's code
    /// mappings are brought up to date first: a library loaded since attach (the extension
    /// under test) must be known to name its sites; an exited target keeps those last seen.
    pub fn with_sites<R>(&mut self, f: impl FnOnce(&Collector, &mut Described<'_>) -> R) -> R {
        let _ = self.collector.borrow_mut().decoder.process.refresh_mappings();
        let collector = self.collector.borrow();
        let mut described = Described { sites: &mut self.sites, collector: &collector };
        f(&collector, &mut described)
    }

    /// Execs of the target since the last call, as the kernel counts them (a full ring may
    /// have dropped their events, not these): each may have changed whom the target runs as.
    pub fn new_execs(&mut self) -> u64 {
        let execs = self.probes.execs();
        let new = execs - self.execs_told;
        self.execs_told = execs;
        new
    }
}

/// Waits at most `timeout` for one of `fds` (open for the call) to be readable, or hung up; a
/// signal ends the wait early, which is no error.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<()> {
    let mut polled: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: valid pollfds, their fds open for the duration of the call (the caller's promise).
    let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout.as_millis() as i32) };
    match io::Error::last_os_error() {
        e if n < 0 && e.kind() != io::ErrorKind::Interrupted => Err(e),
        _ => Ok(()),
    }
}

/// Whether `fd` is readable (or hung up) now, without waiting.
pub fn readable_now(fd: RawFd) -> bool {
    let mut polled = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, its fd open for the call (the caller's promise); no wait.
    unsafe { libc::poll(&mut polled, 1, 0) == 1 }
}

/// Now, on CLOCK_MONOTONIC: the clock of the probes' timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
