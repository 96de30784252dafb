//! A real `psleak daemon` on a socket of its own, clients that speak its protocol (from this
//! root test process, or as another user through python3), and the unprivileged users the
//! hostile tests act as.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// A daemon on a socket of its own, in a directory every user may enter. Its stderr is kept.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    log: Arc<Mutex<String>>,
}

/// A fresh directory under the system's temporary one, root's, mode `mode`.
pub fn fresh_dir(what: &str, mode: u32) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "psleak-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(&mut super::psleak(), &fresh_dir("daemon-test", 0o755).join("psleak.sock"), extra)
    }

    /// Starts `command` (psleak, or a wrapper of it) as `daemon --socket SOCKET EXTRA...`.
    pub fn start_with(command: &mut Command, socket: &Path, extra: &[&str]) -> Self {
        let (child, mut stderr) =
            super::start_psleak(command.args(["daemon", "--socket"]).arg(socket).args(extra), "daemon listening on");
        let log = Arc::new(Mutex::new(String::new()));
        let kept = Arc::clone(&log);
        // Its log goes on: kept, so that it never fills the pipe and tests may read it.
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                kept.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Self { child, socket: socket.to_path_buf(), log }
    }

    pub fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).expect("the daemon accepts");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::from_stream(stream)
    }

    pub fn status(&self) -> Value {
        let reply = self.connect().ask(&json!({"op": "status"}).to_string());
        assert_eq!(reply["ok"], true, "{reply}");
        reply
    }

    pub fn sessions(&self) -> usize {
        self.status()["sessions"].as_array().unwrap().len()
    }

    /// What the daemon has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon with SIGTERM, as a service manager does; its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.socket.parent().unwrap());
    }
}

pub struct Client {
    pub stream: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Client {
    pub fn from_stream(stream: UnixStream) -> Self {
        Self { replies: BufReader::new(stream.try_clone().unwrap()), stream }
    }

    /// The next reply, or None once the daemon has hung up (or the connection broke).
    pub fn next_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.replies.read_line(&mut line) {
            Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))),
            _ => None,
        }
    }

    /// Sends `line` as is (a newline added) and returns the reply.
    pub fn ask(&mut self, line: &str) -> Value {
        self.ask_bytes(format!("{line}\n").as_bytes())
    }

    pub fn ask_bytes(&mut self, bytes: &[u8]) -> Value {
        self.stream.write_all(bytes).unwrap();
        self.reply()
    }

    pub fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    pub fn request(&mut self, request: Value) -> Value {
        let reply = self.ask(&request.to_string());
        assert_eq!(reply["ok"], true, "{request} was refused: {reply}");
        reply
    }

    pub fn attach(daemon: &Daemon, pid: u32) -> Self {
        let mut client = daemon.connect();
        let ready = client.request(json!({"op": "attach", "pid": pid, "version": 1}));
        assert_eq!(ready["pid"], pid);
        client
    }

    /// Whether the daemon has hung up on us.
    pub fn is_closed(&mut self) -> bool {
        let mut line = String::new();
        self.replies.read_line(&mut line).is_ok_and(|n| n == 0)
    }
}

pub fn assert_error(reply: &Value, expected: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains(expected), "expected an error about {expected:?}, got {error:?}");
}

/// An unprivileged user of the tests' own, made on first use: (uid, gid).
pub fn test_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, name]).stderr(Stdio::null()).output().ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let status = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .status()
            .expect("useradd runs");
        // Another test binary may have made it meanwhile.
        assert!(status.success() || id("-u").is_some(), "useradd {name} failed");
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// A root-owned setuid copy of the leaky target, which any user may run (and become root).
pub fn setuid_leaky() -> PathBuf {
    let dir = fresh_dir("setuid", 0o755);
    let setuid = dir.join("leaky-setuid");
    std::fs::copy(super::leaky(), &setuid).unwrap();
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    setuid
}

/// The two users of the hostile tests: one attacks, the other is its victim.
pub fn user_a() -> (u32, u32) {
    test_user("psleak-test-a")
}

pub fn user_b() -> (u32, u32) {
    test_user("psleak-test-b")
}

/// `command` run as `user` (its uid and gid, no other groups), from `/`.
pub fn as_user(command: &mut Command, (uid, gid): (u32, u32)) -> &mut Command {
    command.uid(uid).gid(gid).current_dir("/")
}

/// A python3 process of another user that speaks to the daemon as told, one JSON command per
/// line on its stdin, one JSON answer per line on its stdout:
///   {"do":"connect","conn":"a"}       -> {"connected":true} or {"error":"Permission denied"}
///   {"do":"send","conn":"a","text":T} -> {"sent":true} (T sent as is, no newline added)
///   {"do":"recv","conn":"a"}          -> the reply line, or {"closed":true}
///   {"do":"pid"}                      -> {"pid":P}
///   {"do":"open"}                     -> {"fd":N} (a /dev/null kept open)
pub struct UserClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const USER_CLIENT: &str = r#"
import json, os, socket, sys
conns, kept = {}, []
for line in sys.stdin:
    c = json.loads(line)
    out = {}
    try:
        if c["do"] == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(60)
            s.connect(sys.argv[1])
            conns[c["conn"]] = (s, s.makefile("rb"))
            out = {"connected": True}
        elif c["do"] == "send":
            conns[c["conn"]][0].sendall(c["text"].encode())
            out = {"sent": True}
        elif c["do"] == "recv":
            reply = conns[c["conn"]][1].readline()
            out = json.loads(reply) if reply else {"closed": True}
        elif c["do"] == "pid":
            out = {"pid": os.getpid()}
        elif c["do"] == "open":
            kept.append(open("/dev/null"))
            out = {"fd": kept[-1].fileno()}
    except OSError as e:
        out = {"error": e.strerror or str(e)}
    print(json.dumps(out), flush=True)
"#;

impl UserClient {
    pub fn start(socket: &Path, user: (u32, u32)) -> Self {
        Self::start_with(Command::new("python3").args(["-c", USER_CLIENT]).arg(socket), user)
    }

    /// The client run by `command` (python3 -c USER_CLIENT SOCKET, maybe wrapped).
    pub fn start_with(command: &mut Command, user: (u32, u32)) -> Self {
        let mut child =
            as_user(command, user).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, stdout }
    }

    pub fn command_line(socket: &Path) -> Vec<String> {
        vec!["python3".into(), "-c".into(), USER_CLIENT.into(), socket.display().to_string()]
    }

    pub fn tell(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    pub fn connect(&mut self, conn: &str) -> Value {
        self.tell(json!({"do": "connect", "conn": conn}))
    }

    pub fn send(&mut self, conn: &str, text: &str) {
        assert_eq!(self.tell(json!({"do": "send", "conn": conn, "text": text})), json!({"sent": true}));
    }

    pub fn recv(&mut self, conn: &str) -> Value {
        self.tell(json!({"do": "recv", "conn": conn}))
    }

    /// A request line on `conn`, and its reply.
    pub fn ask(&mut self, conn: &str, request: Value) -> Value {
        self.send(conn, &format!("{request}\n"));
        self.recv(conn)
    }

    /// A new connection that attaches to `pid`: its ready line (or refusal).
    pub fn attach(&mut self, conn: &str, pid: u32) -> Value {
        assert_eq!(self.connect(conn), json!({"connected": true}));
        self.ask(conn, json!({"op": "attach", "pid": pid, "version": 1}))
    }

    pub fn pid(&mut self) -> u32 {
        self.tell(json!({"do": "pid"}))["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for UserClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` connections to the daemon made by a process of `user` (whose credentials the daemon
/// sees), taken over by this test with pidfd_getfd: to be driven with this process's timing.
pub fn connections_as(user: (u32, u32), socket: &Path, n: usize) -> Vec<UnixStream> {
    use std::os::fd::FromRawFd;
    let script = r#"
import socket, sys, time
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    conns.append(s)
print(" ".join(str(s.fileno()) for s in conns), flush=True)
time.sleep(3600)
"#;
    let mut helper = as_user(Command::new("python3").args(["-c", script]).arg(socket).arg(n.to_string()), user)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(helper.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // SAFETY: plain syscalls on our own child; results checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, helper.id() as libc::pid_t, 0) } as i32;
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    let streams = line
        .split_whitespace()
        .map(|fd| {
            // SAFETY: as above; the new fd is ours alone.
            let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd.parse::<i32>().unwrap(), 0) } as i32;
            assert!(ours >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
            // SAFETY: a new fd that nothing else owns.
            unsafe { UnixStream::from_raw_fd(ours) }
        })
        .collect();
    // SAFETY: closes the pidfd opened above.
    unsafe { libc::close(pidfd) };
    let _ = helper.kill();
    let _ = helper.wait();
    streams
}
