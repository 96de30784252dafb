//! `psleak daemon`: a privileged collector that serves unprivileged test processes over a Unix
//! socket. Each connection is one session (`session.rs`) for one target, authorized by the
//! peer's credentials: a client may trace only processes of its own uid (root: any).
//!
//! The accept loop and signals run on tokio; each session runs its own blocking loop on
//! tokio's blocking pool, so that one slow or hostile client never holds up another.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use psleak_ebpf::Options;
use serde_json::{json, Value};

use crate::answer;
use crate::error::Error;
use crate::protocol::{Opening, VERSION};
use crate::session::{self, Control};

/// Where the daemon listens, and where the Python package looks, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/psleak.sock";

/// How long a new connection may take to say what it wants.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection that has not attached yet looks whether the daemon is stopping.
const STOP_CHECK_PERIOD: Duration = Duration::from_millis(100);

pub struct DaemonArgs {
    pub socket: PathBuf,
    /// Permission bits of the socket: 0600 lets only root connect.
    pub mode: u32,
    /// Group that owns the socket (with mode 0660: the users allowed to connect).
    pub group: Option<String>,
    pub idle_limit: Duration,
    /// Sessions served at once, at most (each holds its own probes and event ring).
    pub max_sessions: usize,
    pub options: Options,
}

struct Session {
    uid: u32,
    client_pid: i32,
    pid: u32,
    started: Instant,
    control: Arc<Control>,
}

struct Daemon {
    sessions: Mutex<BTreeMap<u64, Session>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    started: Instant,
    args: DaemonArgs,
}

pub fn run(args: DaemonArgs) -> Result<(), Error> {
    crate::tracer::check_prerequisites(&args.options)?;
    let listener = listen(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("cannot start the runtime".into(), e))?;
    let socket = args.socket.clone();
    let daemon = Arc::new(Daemon {
        sessions: Mutex::default(),
        next_id: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        started: Instant::now(),
        args,
    });
    let result = runtime.block_on(accept_loop(listener, daemon));
    let _ = fs::remove_file(&socket);
    result
}

/// Binds the socket with its mode and group, replacing a stale one but never a live daemon's.
fn listen(args: &DaemonArgs) -> Result<std::os::unix::net::UnixListener, Error> {
    let path = &args.socket;
    let io_error = |what: &str, e| Error::Io(format!("{what} {}", path.display()), e);
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Io(
                format!("a psleak daemon already listens on {}", path.display()),
                io::Error::from(io::ErrorKind::AddrInUse),
            ));
        }
        fs::remove_file(path).map_err(|e| io_error("cannot remove the stale socket", e))?;
    }
    let gid =
        match &args.group {
            Some(group) => Some(group_id(group).ok_or_else(|| {
                Error::Io(format!("no group named {group}"), io::Error::from(io::ErrorKind::NotFound))
            })?),
            None => None,
        };
    // Nobody may connect before the mode is set: bind under a umask that admits the owner only.
    // SAFETY: umask(2) cannot fail; the daemon has no other thread yet.
    let umask = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    let listener = bound.map_err(|e| io_error("cannot listen on", e))?;
    let permitted =
        std::os::unix::fs::chown(path, None, gid).map_err(|e| io_error("cannot set the group of", e)).and_then(|()| {
            fs::set_permissions(path, fs::Permissions::from_mode(args.mode))
                .map_err(|e| io_error("cannot set the mode of", e))
        });
    if let Err(e) = permitted {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    listener.set_nonblocking(true).map_err(|e| io_error("cannot listen on", e))?;
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    fs::read_to_string("/etc/group").ok()?.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
    })
}

async fn accept_loop(listener: std::os::unix::net::UnixListener, daemon: Arc<Daemon>) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| Error::Io("cannot listen".into(), e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Io("cannot handle SIGTERM".into(), e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Io("cannot handle SIGINT".into(), e))?;
    eprintln!("psleak: daemon listening on {} (pid {})", daemon.args.socket.display(), std::process::id());
    notify_ready();
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(peer) = stream.peer_cred() else { continue };
                // tokio leaves it non-blocking; sessions read it blocking, with timeouts.
                let Ok(stream) = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { continue };
                let daemon = Arc::clone(&daemon);
                sessions.spawn_blocking(move || daemon.serve_client(stream, peer.uid(), peer.pid().unwrap_or(0)));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Graceful: no new clients, every session told to end, its probes detached before we exit.
    daemon.stop.store(true, Ordering::Relaxed);
    for session in daemon.sessions.lock().unwrap().values() {
        session.control.stop.store(true, Ordering::Relaxed);
    }
    while sessions.join_next().await.is_some() {}
    eprintln!("psleak: daemon stopped");
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
        eprintln!("psleak: could not notify the service manager: {e}");
    }
}

impl Daemon {
    /// One connection: its first request says what it wants; errors are answered, never fatal.
    fn serve_client(&self, stream: UnixStream, uid: u32, client_pid: i32) {
        let Ok(mut out) = stream.try_clone() else { return };
        // A client that stops mid-line cannot hold its thread for longer than this.
        let _ = stream.set_read_timeout(Some(FIRST_REQUEST_TIMEOUT));
        let mut requests = BufReader::new(stream);
        while self.wait_for_request(&requests, Instant::now() + FIRST_REQUEST_TIMEOUT) {
            let reply = match answer::read_request(&mut requests) {
                Ok(Some(line)) => match serde_json::from_str::<Opening>(&line) {
                    Ok(Opening::Status) => ok_line(self.status(uid)),
                    Ok(Opening::Attach { version, .. }) if version != VERSION => answer::failure(format!(
                        "protocol version {version} is not served (this daemon speaks {VERSION})"
                    )),
                    Ok(Opening::Attach { pid, .. }) => match self.admit(uid, client_pid, pid) {
                        Ok((id, control)) => {
                            let _ = requests.get_ref().set_read_timeout(None);
                            self.run_session(id, requests, out, pid, &control);
                            return;
                        }
                        Err(why) => answer::failure(why),
                    },
                    Err(e) => answer::failure(format!("bad request: {e} (a connection starts with attach or status)")),
                },
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => answer::failure(e.to_string()),
                Err(_) => return, // stalled mid-line, or gone
            };
            if out.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Waits until the client has sent something, up to `deadline`, or until the daemon stops.
    fn wait_for_request(&self, requests: &BufReader<UnixStream>, deadline: Instant) -> bool {
        while !self.stop.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if !requests.buffer().is_empty() {
                return true;
            }
            if left.is_zero() {
                return false;
            }
            let mut fd = libc::pollfd { fd: requests.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut fd, 1, left.min(STOP_CHECK_PERIOD).as_millis() as i32) };
            if ready > 0 {
                return true;
            }
            if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
        }
        false
    }

    /// Registers a session of `uid` on `pid`, if `uid` may trace it and there is room.
    fn admit(&self, uid: u32, client_pid: i32, pid: u32) -> Result<(u64, Arc<Control>), String> {
        authorize(uid, pid)?;
        let mut sessions = self.sessions.lock().unwrap();
        if self.stop.load(Ordering::Relaxed) {
            return Err("the daemon is shutting down".into());
        }
        if sessions.len() >= self.args.max_sessions {
            return Err(format!(
                "the daemon serves {} sessions already, its limit (psleak daemon --max-sessions)",
                sessions.len()
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(Control { idle_limit: Some(self.args.idle_limit), ..Control::default() });
        sessions.insert(id, Session { uid, client_pid, pid, started: Instant::now(), control: Arc::clone(&control) });
        eprintln!("psleak: session {id}: uid {uid} (client pid {client_pid}) traces pid {pid}");
        Ok((id, control))
    }

    fn run_session(&self, id: u64, requests: BufReader<UnixStream>, out: UnixStream, pid: u32, control: &Control) {
        let ended = session::serve_requests(requests, out, pid, &self.args.options, control);
        self.sessions.lock().unwrap().remove(&id);
        let counts = format!(
            "{} events, {} lost to a full ring, {} without a stack",
            control.events.load(Ordering::Relaxed),
            control.lost_ring_full.load(Ordering::Relaxed),
            control.lost_no_stack.load(Ordering::Relaxed)
        );
        match ended {
            Ok(()) => eprintln!("psleak: session {id} ended ({counts})"),
            Err(e) => eprintln!("psleak: session {id} ended ({counts}): {e}"),
        }
    }

    /// The sessions of `uid` (all of them for root), with rates, losses and the daemon's memory.
    fn status(&self, uid: u32) -> Value {
        let sessions: Vec<Value> = self
            .sessions
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| uid == 0 || s.uid == uid)
            .map(|(id, s)| {
                let seconds = s.started.elapsed().as_secs_f64();
                let events = s.control.events.load(Ordering::Relaxed);
                json!({
                    "id": id,
                    "uid": s.uid,
                    "client_pid": s.client_pid,
                    "pid": s.pid,
                    "seconds": seconds,
                    "events": events,
                    "events_per_second": events as f64 / seconds.max(1e-3),
                    "lost": {
                        "ring_full": s.control.lost_ring_full.load(Ordering::Relaxed),
                        "no_stack": s.control.lost_no_stack.load(Ordering::Relaxed),
                    },
                })
            })
            .collect();
        json!({
            "version": VERSION,
            "daemon_pid": std::process::id(),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "resident_bytes": resident_bytes(),
            "sessions": sessions,
        })
    }
}

/// A client may trace the processes of its own uid; root, any.
fn authorize(client_uid: u32, pid: u32) -> Result<(), String> {
    let owner = fs::metadata(format!("/proc/{pid}")).map_err(|_| format!("no process with pid {pid}"))?.uid();
    if client_uid != 0 && owner != client_uid {
        return Err(format!(
            "pid {pid} belongs to uid {owner}, and you are uid {client_uid}: psleak's daemon traces only your own processes"
        ));
    }
    Ok(())
}

fn ok_line(body: Value) -> String {
    let mut body = body;
    body["ok"] = true.into();
    let mut line = body.to_string();
    line.push('\n');
    line
}

fn resident_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// `psleak daemon --status`: asks a running daemon and prints its answer as JSON.
pub fn print_status(socket: &Path) -> Result<(), Error> {
    let gone = |e| Error::Io(format!("no psleak daemon answers on {}", socket.display()), e);
    let mut stream = UnixStream::connect(socket).map_err(gone)?;
    stream.write_all(b"{\"op\":\"status\"}\n").map_err(gone)?;
    let mut reader = BufReader::new(stream);
    let line = answer::read_request(&mut reader).map_err(gone)?.unwrap_or_default();
    let reply: Value = serde_json::from_str(&line)
        .map_err(|e| Error::Io("the daemon's answer is not JSON".into(), io::Error::other(e)))?;
    if reply["ok"] != true {
        return Err(Error::Io(format!("the daemon refused: {}", reply["error"]), io::Error::other("refused")));
    }
    println!("{}", serde_json::to_string_pretty(&reply).expect("JSON prints"));
    Ok(())
}
