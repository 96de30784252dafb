//! `psleak daemon`: a privileged collector that serves unprivileged test processes over a Unix
//! socket. Each connection is one session (`session.rs`) for one target, authorized by the
//! peer's credentials: a client may trace only processes that run as its uid (root: any).
//!
//! Every client is hostile until it has attached, and its session's client stays untrusted:
//! connections are accepted and read on tokio, without a thread each, and must send each
//! opening request whole within `FIRST_REQUEST_TIMEOUT`; a uid may hold only so many
//! connections and sessions (root, who may do anything anyway, only the daemon's); each session runs its own loop on tokio's blocking pool (bounded
//! by `--max-sessions`), so that one slow or hostile client never holds up another, and SIGTERM
//! ends them all within a turn of their loops.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use psleak_ebpf::{is_out_of_fds, Options, FD_ADVICE};
use serde_json::Value;

use crate::error::{say, Error};
use crate::process::{self, Credentials, Process};
use crate::serve::answer::{self, failure, reply_line};
use crate::serve::listen::{self, Listening};
use crate::serve::protocol::{Next, Opening, Reply, RequestReader, SessionStatus, Status, VERSION};
use crate::serve::session::{self, Client, Control, SessionConfig};

/// How long a connection may take to send each request before it has attached, whole.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections of all users at once, at most (each holds an fd and a few KiB until it ends).
const MAX_CONNECTIONS: usize = 4096;

/// How long SIGTERM waits for the sessions to detach their probes.
const STOP_LIMIT: Duration = Duration::from_secs(10);

pub struct DaemonArgs {
    pub socket: PathBuf,
    /// Permission bits of the socket: 0600 lets only root connect.
    pub mode: u32,
    /// Group that owns the socket (with mode 0660: the users allowed to connect).
    pub group: Option<String>,
    pub idle_limit: Duration,
    /// Sessions served at once, at most (each holds its own probes and event ring).
    pub max_sessions: usize,
    /// Sessions and connections (sessions included) one uid may hold at once.
    pub max_user_sessions: usize,
    pub max_user_connections: usize,
    /// Heap blocks and mappings each session's ledger keeps at most.
    pub ledger_room: usize,
    pub options: Options,
}

struct Session {
    uid: u32,
    client_pid: u32,
    pid: u32,
    started: Instant,
    control: Arc<Control>,
}

#[derive(Default)]
struct State {
    sessions: BTreeMap<u64, Session>,
    /// Open connections by uid, sessions included.
    connections: HashMap<u32, usize>,
    stopping: bool,
}

struct Daemon {
    state: Mutex<State>,
    next_id: AtomicU64,
    started: Instant,
    args: DaemonArgs,
}

/// Who is at the other end of a connection (SO_PEERCRED, the pid as our namespace numbers it).
#[derive(Clone, Copy)]
struct Peer {
    uid: u32,
    pid: u32,
}

pub fn run(args: DaemonArgs) -> Result<(), Error> {
    crate::backends::ebpf::tracer::check_prerequisites(&args.options)?;
    // One malloc arena for every thread: glibc gives each session's thread an arena of its
    // own, and malloc_trim leaves ~6 MiB in each once the session is over (measured: 93 MiB
    // resident after 20 sessions had ended, 12 MiB with one arena, from 8 at start).
    // SAFETY: mallopt has no preconditions; no other thread allocates yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let gid = args.group.as_deref().map(listen::group_id).transpose().map_err(Error::Refused)?;
    let listening = listen::listen(&args.socket, args.mode, gid)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("cannot start the runtime".into(), e))?;
    let daemon =
        Arc::new(Daemon { state: Mutex::default(), next_id: AtomicU64::new(1), started: Instant::now(), args });
    let result = runtime.block_on(accept_loop(&listening, Arc::clone(&daemon)));
    listening.remove();
    // The sessions have ended (or were given up on after STOP_LIMIT): nothing is left to wait for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn accept_loop(listening: &Listening, daemon: Arc<Daemon>) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let std_listener = listening.listener.try_clone().map_err(|e| Error::Io("cannot listen".into(), e))?;
    std_listener.set_nonblocking(true).map_err(|e| Error::Io("cannot listen".into(), e))?;
    let listener =
        tokio::net::UnixListener::from_std(std_listener).map_err(|e| Error::Io("cannot listen".into(), e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Io("cannot handle SIGTERM".into(), e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Io("cannot handle SIGINT".into(), e))?;
    say(&format!("psleak: daemon listening on {} (pid {})", listening.path.display(), std::process::id()));
    notify_ready();
    let mut openings = tokio::task::JoinSet::new();
    let mut last_complaint: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some(opening) = Arc::clone(&daemon).accepted(stream) {
                        openings.spawn(opening);
                    }
                }
                Err(e) => {
                    // Out of fds, say: back off rather than spin on a listener that stays ready.
                    if last_complaint.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        let why = match e.raw_os_error() {
                            Some(errno) if is_out_of_fds(errno) => format!("too many open files{FD_ADVICE}"),
                            _ => e.to_string(),
                        };
                        say(&format!("psleak: cannot accept a connection: {why}"));
                        last_complaint = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = openings.join_next(), if !openings.is_empty() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Graceful: no new clients, every session told to end, its probes detached before we exit.
    openings.shutdown().await;
    daemon.stop_sessions().await;
    say("psleak: daemon stopped");
    Ok(())
}

/// systemd's `Type=notify`: tell the service manager we are ready, when it asked to be told.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(b"READY=1", &addr)),
        None => socket.send_to(b"READY=1", Path::new(&path)),
    };
    if let Err(e) = sent {
        say(&format!("psleak: could not notify the service manager: {e}"));
    }
}

/// A connection's place in the per-uid count, given back when the connection ends.
struct Held {
    daemon: Arc<Daemon>,
    uid: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = self.daemon.lock();
        if let Some(n) = state.connections.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                state.connections.remove(&self.uid);
            }
        }
    }
}

impl Daemon {
    /// The state, even after a panic elsewhere held its lock: a long-lived daemon must not go
    /// down with one session.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: counted against its uid's limits, then served, or refused in a line.
    fn accepted(self: Arc<Self>, stream: tokio::net::UnixStream) -> Option<impl std::future::Future<Output = ()>> {
        let cred = stream.peer_cred().ok()?;
        let peer = Peer { uid: cred.uid(), pid: cred.pid().map_or(0, |p| p.max(0) as u32) };
        let refusal = {
            let mut state = self.lock();
            let total: usize = state.connections.values().sum();
            let mine = state.connections.get(&peer.uid).copied().unwrap_or(0);
            if total >= MAX_CONNECTIONS {
                Some(format!("the daemon holds {total} connections, its limit: try again later"))
            } else if peer.uid != 0 && mine >= self.args.max_user_connections {
                Some(format!(
                    "uid {} holds {mine} connections to the daemon already, its limit (psleak daemon --max-connections-per-user)",
                    peer.uid
                ))
            } else {
                *state.connections.entry(peer.uid).or_default() += 1;
                None
            }
        };
        if let Some(why) = refusal {
            // A new socket's buffer takes a line; a client that is not listening loses nothing.
            let _ = stream.try_write(failure(why).as_bytes());
            return None;
        }
        let held = Held { daemon: Arc::clone(&self), uid: peer.uid };
        Some(self.opening(stream, peer, held))
    }

    /// A connection before it attaches: status requests and refusals, each request whole within
    /// FIRST_REQUEST_TIMEOUT, then the session on a blocking thread of its own.
    async fn opening(self: Arc<Self>, stream: tokio::net::UnixStream, peer: Peer, held: Held) {
        let mut requests = RequestReader::default();
        loop {
            let line = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, next_line(&stream, &mut requests)).await {
                Ok(Ok(Some(line))) => line,
                Ok(Ok(None) | Err(_)) => return, // gone
                Err(_) => {
                    let why =
                        format!("no whole request within {}s: connection closed", FIRST_REQUEST_TIMEOUT.as_secs());
                    let _ = stream.try_write(failure(why).as_bytes());
                    return;
                }
            };
            let reply = match line.map(|line| serde_json::from_str::<Opening>(&line)) {
                Err(why) => failure(why),
                Ok(Ok(Opening::Status)) => reply_line(&Reply { ok: true, body: self.status(peer.uid) }),
                Ok(Ok(Opening::Attach { version, .. })) if version != VERSION => {
                    failure(format!("protocol version {version} is not served (this daemon speaks {VERSION})"))
                }
                Ok(Ok(Opening::Attach { pid, allocators, stack_bytes, python_frames, final_report, .. })) => {
                    let defaults = &self.args.options;
                    let options = stack_bytes.map_or(Ok(defaults.stack_bytes), psleak_ebpf::check_stack_bytes).map(
                        |stack_bytes| Options {
                            allocators,
                            stack_bytes,
                            python_frames: python_frames.unwrap_or(defaults.python_frames),
                            ..defaults.clone()
                        },
                    );
                    match options {
                        Err(why) => failure(format!("bad attach: {why}")),
                        Ok(options) => match self.admit_off_the_loop(peer, pid).await {
                            Ok(mut admitted) => {
                                admitted.options = options;
                                admitted.final_report = final_report;
                                self.start_session(stream, requests, admitted, held);
                                return;
                            }
                            Err(why) => failure(why),
                        },
                    }
                }
                Ok(Err(e)) => failure(format!("bad request: {e} (a connection starts with attach or status)")),
            };
            let sent = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, write_all(&stream, reply.as_bytes())).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
    }

    /// `admit`, on the blocking pool: it reads the target's /proc files, which a process of the
    /// client's can keep from answering (a reader waits behind a writer of the target's
    /// mmap_lock, which userfaultfd can stall), and the accept loop must not wait with it.
    async fn admit_off_the_loop(self: &Arc<Self>, peer: Peer, pid: u32) -> Result<Admitted, String> {
        let daemon = Arc::clone(self);
        tokio::task::spawn_blocking(move || daemon.admit(peer, pid))
            .await
            .unwrap_or_else(|e| Err(format!("the daemon failed to attach: {e}")))
    }

    /// Registers a session of `peer` on the process it calls `pid`, if it may trace it and
    /// there is room.
    fn admit(&self, peer: Peer, pid: u32) -> Result<Admitted, String> {
        let ours = process::pid_seen_by(peer.pid, pid)?;
        // The process is held (pidfd) before it is checked: a pid that changes hands meanwhile
        // is seen exited, never taken for the next process that gets the number.
        let client = Credentials::of_peer(peer.uid, peer.pid);
        // What keeps root from opening it (pid 1 with capabilities beyond the daemon's, say) is
        // not the reason to give a client that may not trace it anyway.
        let process =
            Process::open(ours).map_err(|e| process::check_traceable(ours, &client).err().unwrap_or(e).to_string())?;
        process.check_traceable_by(&client).map_err(|e| e.to_string())?;
        if !process.is_alive() {
            return Err(format!("pid {pid} exited while the daemon attached to it"));
        }
        let mut state = self.lock();
        if state.stopping {
            return Err("the daemon is shutting down".into());
        }
        if state.sessions.len() >= self.args.max_sessions {
            return Err(format!(
                "the daemon serves {} sessions already, its limit (psleak daemon --max-sessions)",
                state.sessions.len()
            ));
        }
        let mine = state.sessions.values().filter(|s| s.uid == peer.uid).count();
        if peer.uid != 0 && mine >= self.args.max_user_sessions {
            return Err(format!(
                "uid {} has {mine} sessions already, its limit (psleak daemon --max-sessions-per-user)",
                peer.uid
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(Control::idle_after(self.args.idle_limit));
        let session = Session {
            uid: peer.uid,
            client_pid: peer.pid,
            pid: ours,
            started: Instant::now(),
            control: Arc::clone(&control),
        };
        state.sessions.insert(id, session);
        say(&format!("psleak: session {id}: uid {} (client pid {}) traces pid {ours}", peer.uid, peer.pid));
        Ok(Admitted { id, process, pid, client, control, options: self.args.options.clone(), final_report: false })
    }

    /// Runs an admitted session on the blocking pool; the connection's place is held until it ends.
    fn start_session(
        self: Arc<Self>,
        stream: tokio::net::UnixStream,
        requests: RequestReader,
        a: Admitted,
        held: Held,
    ) {
        tokio::task::spawn_blocking(move || {
            // Unregistered however the session ends, a panic included: a session left in the
            // table would hold a place of --max-sessions for good.
            let registered = Registered { daemon: &self, id: a.id, _held: held };
            let ended = stream
                .into_std()
                .map_err(|e| Error::Io("the client went away".into(), e))
                .and_then(|stream| Client::new(stream, requests))
                .and_then(|client| {
                    let config = SessionConfig {
                        options: &a.options,
                        control: &a.control,
                        client: a.client,
                        ledger_room: self.args.ledger_room,
                        final_report: a.final_report,
                    };
                    session::serve_process(client, a.process, a.pid, &config)
                });
            let lost = a.control.lost();
            let counts = format!("{} events{}", a.control.events.load(Ordering::Relaxed), lost.describe());
            match ended {
                Ok(()) => say(&format!("psleak: session {} ended ({counts})", a.id)),
                Err(e) => say(&format!("psleak: session {} ended ({counts}): {e}", a.id)),
            }
            // After its end is logged: a session --status no longer lists has its line in the log.
            drop(registered);
            // The session's ledger, ring and symbols are freed: give the memory back.
            crate::backends::poll::trim_own_heap();
        });
    }

    /// SIGTERM: every session told to end; returns once all have (their probes are detached)
    /// or after STOP_LIMIT.
    async fn stop_sessions(&self) {
        {
            let mut state = self.lock();
            state.stopping = true;
            for session in state.sessions.values() {
                session.control.stop.store(true, Ordering::Relaxed);
            }
        }
        let started = Instant::now();
        while !self.lock().sessions.is_empty() && started.elapsed() < STOP_LIMIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sessions of `uid` (all of them for root), with rates, losses and the daemon's memory.
    fn status(&self, uid: u32) -> Status {
        let state = self.lock();
        let sessions = state
            .sessions
            .iter()
            .filter(|(_, s)| uid == 0 || s.uid == uid)
            .map(|(&id, s)| {
                let seconds = s.started.elapsed().as_secs_f64();
                let events = s.control.events.load(Ordering::Relaxed);
                SessionStatus {
                    id,
                    uid: s.uid,
                    client_pid: s.client_pid,
                    pid: s.pid,
                    seconds,
                    events,
                    events_per_second: events as f64 / seconds.max(1e-3),
                    lost: s.control.lost(),
                }
            })
            .collect();
        Status {
            version: VERSION,
            daemon_pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            resident_bytes: resident_bytes(),
            sessions,
            open_fds: (uid == 0).then(open_fds),
            connections: (uid == 0).then(|| state.connections.values().sum()),
        }
    }
}

/// A session's place in the table and its connection's in the per-uid count, given back when
/// this goes.
struct Registered<'d> {
    daemon: &'d Daemon,
    id: u64,
    _held: Held,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.daemon.lock().sessions.remove(&self.id);
    }
}

/// A session the daemon has admitted: its id, the process (held by pidfd) that the client
/// calls `pid`, and for whom.
struct Admitted {
    id: u64,
    process: Process,
    pid: u32,
    client: Credentials,
    control: Arc<Control>,
    /// The daemon's, with what the client asked for: the allocator families probed, the stack
    /// depth, Python frames.
    options: Options,
    /// The client is a tracer: it gets a last report once the target has exited.
    final_report: bool,
}

/// The next request line of a connection that has not attached; `None` when it hung up.
async fn next_line(
    stream: &tokio::net::UnixStream,
    requests: &mut RequestReader,
) -> io::Result<Option<Result<String, String>>> {
    loop {
        match requests.next(|buf| stream.try_read(buf))? {
            Next::Line(line) => return Ok(Some(line)),
            Next::Closed => return Ok(None),
            Next::Pending => stream.readable().await?,
        }
    }
}

async fn write_all(stream: &tokio::net::UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// `psleak daemon --status`: asks a running daemon and prints its answer as JSON.
pub fn print_status(socket: &Path) -> Result<(), Error> {
    let gone = |e| Error::Io(format!("no psleak daemon answers on {}", socket.display()), e);
    let mut stream = UnixStream::connect(socket).map_err(gone)?;
    stream.set_read_timeout(Some(FIRST_REQUEST_TIMEOUT)).map_err(gone)?;
    io::Write::write_all(&mut stream, b"{\"op\":\"status\"}\n").map_err(gone)?;
    let mut reader = io::BufReader::new(stream);
    let line = answer::read_request(&mut reader).map_err(gone)?.unwrap_or_default();
    let reply: Value = serde_json::from_str(&line)
        .map_err(|e| Error::Io("the daemon's answer is not JSON".into(), io::Error::other(e)))?;
    if reply["ok"] != true {
        let why = reply["error"].as_str().unwrap_or("no reason given");
        return Err(Error::Refused(format!("the daemon refused: {why}")));
    }
    println!("{}", serde_json::to_string_pretty(&reply).expect("JSON prints"));
    Ok(())
}
