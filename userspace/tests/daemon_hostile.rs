//! `psleak daemon` against hostile users: the attacks a hostile run found, each replayed
//! against the real daemon (run as root) by real processes of two unprivileged users made for
//! the tests (`psleak-test-a`, `psleak-test-b`). Each test fails against a daemon from before
//! its fix (`PSLEAK_TEST_BINARY=old/psleak cargo test --test daemon_hostile`).

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{
    as_user, assert_error, connections_as, fresh_dir, setuid_leaky, user_a, user_b, Client, Daemon, UserClient,
};
use common::{assert_no_probes_remain, run_psleak, wait_until, Killed, Target};
use serde_json::json;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A refusal to start: exit status 2 and one `psleak:` line that says `expected`.
fn assert_refused(args: &[&str], expected: &str) {
    let (code, stderr) = run_psleak(args);
    assert_eq!(code, 2, "exit status for {args:?}; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line for {args:?}: {stderr}");
    assert!(stderr.starts_with("psleak: ") && stderr.contains(expected), "for {args:?}: {stderr}");
}

fn mode_and_owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid())
}

#[test]
fn no_user_can_make_root_chmod_a_file_through_the_socket_path() {
    let _turn = one_at_a_time();
    let a = user_a();
    let secret = fresh_dir("victim", 0o700).join("secret");
    std::fs::write(&secret, "root's").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A directory others may write to: they could swap the socket for a symlink between two of
    // root's calls; the daemon refuses it. One that is sticky (/tmp): they cannot touch root's
    // entries there; what they put at the path once it is free is refused.
    let sticky_refusal = "is a symbolic link (to ";
    for (mode, refusal) in [(0o777, "is writable by others"), (0o1777, sticky_refusal)] {
        let dir = fresh_dir("race", mode);
        let socket = dir.join("psleak.sock");
        // User A replaces the socket with a symlink to root's secret as soon as it appears,
        // hoping root sets the mode and group through it.
        let racer = format!(
            "import os, stat\nwhile True:\n    try:\n        if stat.S_ISSOCK(os.lstat({0:?}).st_mode):\n            os.symlink({1:?}, {0:?} + '.x')\n            os.rename({0:?} + '.x', {0:?})\n    except OSError: pass\n",
            socket.display().to_string(),
            secret.display().to_string()
        );
        let racer = Killed(as_user(Command::new("python3").args(["-c", &racer]), a).spawn().unwrap());
        let mut outcomes = std::collections::BTreeSet::new();
        for round in 0..100 {
            let started = start_daemon(&socket, &["--socket-mode", "666", "--socket-group", &a.1.to_string()]);
            assert_eq!(
                mode_and_owner(&secret),
                (0o600, 0),
                "dir mode {mode:o}, round {round}: root's file was changed"
            );
            match started {
                Err(stderr) => {
                    assert!(stderr.contains(refusal), "dir mode {mode:o}: {stderr}");
                    outcomes.insert("refused");
                }
                Ok(mut daemon) => {
                    outcomes.insert("served");
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
                    daemon.0.wait().unwrap();
                }
            }
        }
        drop(racer);
        let expected = if refusal == sticky_refusal { "served" } else { "refused" };
        assert!(outcomes.contains(expected), "dir mode {mode:o}: {outcomes:?}");
        if expected == "refused" {
            assert_eq!(outcomes.len(), 1, "a directory others may write to is never served");
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Starts `psleak daemon --socket SOCKET EXTRA...`: once it listens, the daemon (killed when
/// dropped); if it refused to start, its stderr.
fn start_daemon(socket: &Path, extra: &[&str]) -> Result<Killed, String> {
    let mut child =
        common::psleak().args(["daemon", "--socket"]).arg(socket).args(extra).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let child = Killed(child);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first).unwrap();
    if first.contains("daemon listening on") {
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        return Ok(child);
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    Err(first + &rest)
}

#[test]
fn only_a_stale_socket_of_its_own_is_replaced() {
    let _turn = one_at_a_time();
    let dir = fresh_dir("socket-path", 0o755);
    let path = dir.join("psleak.sock");
    let socket = path.to_str().unwrap();
    let refused = "psleak daemon replaces only a stale socket of its own";

    std::fs::write(&path, "root's data").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_refused(&["daemon", "--socket", socket], &format!("{socket} is a regular file: {refused}"));
    assert_eq!((std::fs::read_to_string(&path).unwrap(), mode_and_owner(&path)), ("root's data".into(), (0o640, 0)));

    let file = dir.join("file");
    std::fs::rename(&path, &file).unwrap();
    std::os::unix::fs::symlink(&file, &path).unwrap();
    assert_refused(&["daemon", "--socket", socket], &format!("is a symbolic link (to {})", file.display()));
    assert_eq!(std::fs::read_link(&path).unwrap(), file, "the symlink is left alone");
    std::fs::remove_file(&path).unwrap();

    std::os::unix::fs::symlink("/nonexistent/psleak.sock", &path).unwrap();
    assert_refused(&["daemon", "--socket", socket], "is a symbolic link (to /nonexistent/psleak.sock)");
    std::fs::remove_file(&path).unwrap();

    std::fs::create_dir(&path).unwrap();
    assert_refused(&["daemon", "--socket", socket], "is a directory");
    std::fs::remove_dir(&path).unwrap();

    // A socket of another user's, in a sticky directory where it may make one.
    let sticky = fresh_dir("socket-path-sticky", 0o1777);
    let theirs = sticky.join("psleak.sock");
    let bind = format!("import socket; socket.socket(socket.AF_UNIX).bind({:?})", theirs.display().to_string());
    assert!(as_user(Command::new("python3").args(["-c", &bind]), user_a()).status().unwrap().success());
    assert_refused(&["daemon", "--socket", theirs.to_str().unwrap()], &format!("is a socket of uid {}", user_a().0));
    assert!(theirs.exists());
    let _ = std::fs::remove_dir_all(&sticky);

    // A stale socket of root's own (a daemon that was killed): replaced.
    drop(UnixListener::bind(&path).unwrap());
    let daemon = Daemon::start_with(&mut common::psleak(), &path, &[]);
    assert_eq!(daemon.status()["ok"], true);
    assert!(daemon.terminate().success());
    assert!(!path.exists(), "its socket is removed at exit");

    assert_refused(&["daemon", "--socket", socket, "--socket-group", "4000000000"], "no group has gid 4000000000");
    assert_refused(&["daemon", "--socket", socket, "--socket-group", "no-such-group"], "no group named no-such-group");
    assert!(!path.exists(), "nothing is left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn huge_durations_are_refused_in_a_line() {
    let _turn = one_at_a_time(); // it forks: not while the pid-reuse race runs
    let (code, stderr) = run_psleak(&["daemon", "--idle-timeout", "1e300"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("seconds is longer than psleak waits"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Rounds of the pid-reuse race, each replacing the process under the pid 0-585 µs after the
/// attach request: a daemon that checked the pid before holding it failed within 1-121 rounds
/// (4 runs).
const REUSE_ROUNDS: u32 = 400;

#[test]
fn a_pid_that_changes_hands_during_the_attach_is_never_traced_for_the_wrong_user() {
    let _turn = one_at_a_time();
    let (a, b) = (user_a(), user_b());
    let daemon = Daemon::start(&["--socket-mode", "666"]);
    let mut connections = Vec::new();
    let mut landed = 0;
    for round in 0..REUSE_ROUNDS {
        if connections.is_empty() {
            // Fewer than the connections a uid may hold (32): the spent ones are closed by then.
            connections = connections_as(a, &daemon.socket, 25);
        }
        let mut stream = connections.pop().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut mine = Killed(as_user(&mut Command::new("sleep"), a).arg("1000").spawn().unwrap());
        let pid = mine.0.id();
        // A asks for its own process; meanwhile that process dies and the pid goes to B's.
        stream.write_all(format!("{}\n", json!({"op": "attach", "pid": pid, "version": 1})).as_bytes()).unwrap();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros(u64::from(round % 40) * 15) {}
        mine.0.kill().unwrap();
        mine.0.wait().unwrap();
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let theirs = Killed(as_user(&mut Command::new("sleep"), b).arg("1000").spawn().unwrap());
        landed += u32::from(theirs.0.id() == pid);
        let mut client = Client::from_stream(stream);
        if client.reply()["ok"] == true {
            // The session holds what its pidfd names: A's process, dead. It must end, never
            // answer from B's.
            let _ = client.stream.write_all(b"{\"op\":\"created\",\"since\":0}\n");
            let answer = client.next_reply();
            assert!(
                answer.as_ref().is_none_or(|a| a["ok"] != true),
                "round {round}: a session of uid {} answered for pid {pid}, now uid {}'s: {answer:?}",
                a.0,
                b.0
            );
        }
        drop(theirs);
    }
    assert!(landed > REUSE_ROUNDS / 2, "the other user's process took the freed pid in {landed} rounds only");
    drop(daemon);
    assert_no_probes_remain();
}

fn effective_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    uids.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_session_goes_on_across_an_exec_and_ends_when_the_target_becomes_root() {
    let _turn = one_at_a_time();
    let a = user_a();
    let setuid = setuid_leaky();
    let daemon = Daemon::start(&["--socket-mode", "666"]);
    let mut target = Target::start(as_user(&mut Command::new(common::leaky()), a));
    let pid = target.pid();
    let mut client = UserClient::start(&daemon.socket, a);
    assert_eq!(client.attach("s", pid)["ok"], true);
    let since = client.ask("s", json!({"op": "mark"}))["mark"].clone();
    target.run("file 2");
    let created = |client: &mut UserClient| client.ask("s", json!({"op": "created", "since": since}));
    assert_eq!(created(&mut client)["fds"].as_array().unwrap().len(), 2);

    // A program that runs as A still: what the old one made is gone, the new one is traced.
    target.exec(common::leaky());
    target.run("file 1");
    let after_exec = created(&mut client);
    assert_eq!(after_exec["ok"], true, "{after_exec}");
    assert_eq!(after_exec["fds"].as_array().unwrap().len(), 1, "only the new program's fd: {after_exec}");

    // A setuid program: the target runs as root now, which A may not see.
    target.exec(&setuid);
    assert_eq!(effective_uid(pid), 0, "the setuid exec made the target root");
    target.run("file 3");
    let reply = created(&mut client);
    assert_error(&reply, "session ended: the target exec'd, and it runs a setuid or setgid program");
    let after = client.recv("s");
    assert!(
        after == json!({"closed": true}) || after["error"] == "Connection reset by peer",
        "the session is over: {after}"
    );
    assert!(wait_until(Duration::from_secs(5), || daemon.sessions() == 0));
    assert!(daemon.log().contains("the target exec'd, and it runs a setuid"), "{}", daemon.log());
    let _ = std::fs::remove_dir_all(setuid.parent().unwrap());
}

#[test]
fn each_user_has_its_limits_and_others_are_still_served() {
    let _turn = one_at_a_time();
    let (a, b) = (user_a(), user_b());
    let daemon =
        Daemon::start(&["--socket-mode", "666", "--max-sessions-per-user", "2", "--max-connections-per-user", "4"]);
    let targets = [Target::start(as_user(&mut Command::new(common::leaky()), a)), Target::leaky()];
    let mut greedy = UserClient::start(&daemon.socket, a);
    let pid = targets[0].pid();
    assert_eq!(greedy.attach("1", pid)["ok"], true);
    assert_eq!(greedy.attach("2", pid)["ok"], true);
    assert_error(&greedy.attach("3", pid), &format!("uid {} has 2 sessions already, its limit", a.0));
    assert_eq!(greedy.connect("4"), json!({"connected": true}), "a fourth connection is within its limit");
    assert_eq!(greedy.connect("5"), json!({"connected": true}), "the kernel accepts it; the daemon refuses it:");
    assert_error(&greedy.recv("5"), &format!("uid {} holds 4 connections to the daemon already, its limit", a.0));
    assert_eq!(greedy.recv("5"), json!({"closed": true}));

    let mut other = UserClient::start(&daemon.socket, b);
    let theirs = Target::start(as_user(&mut Command::new(common::leaky()), b));
    assert_eq!(other.attach("1", theirs.pid())["ok"], true, "another user is served");
    // Root is bound by the daemon's limits only.
    let _root = [
        Client::attach(&daemon, targets[1].pid()),
        Client::attach(&daemon, targets[1].pid()),
        Client::attach(&daemon, targets[1].pid()),
    ];
    assert_eq!(daemon.sessions(), 6);
}

#[test]
fn a_session_keeps_at_most_its_ledger_room_and_says_what_it_dropped() {
    let _turn = one_at_a_time();
    let daemon = Daemon::start(&["--max-live", "100"]);
    let mut target = Target::leaky();
    let mut client = Client::attach(&daemon, target.pid());
    let measurement = client.request(json!({"op": "begin"}))["measurement"].clone();
    client.request(json!({"op": "window", "measurement": measurement}));
    target.run("malloc 1000 8");
    let batch = client.request(json!({"op": "batch", "measurement": measurement, "calls": 1, "confirm": 1}));
    assert_eq!(batch["live"]["heap_blocks"], 100, "{batch}");
    assert_eq!(batch["lost_in_batch"]["ledger_full"], 900, "{batch}");
    let status = daemon.status();
    assert_eq!(status["sessions"][0]["lost"]["ledger_full"], 900, "{status}");
}

/// Lets this test process hold many connections at once (its soft limit up to the hard one).
fn raise_own_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer, then the same struct back.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// One batch of one measurement: `n` leaks of `command` in the target, judged; the leak site's
/// (count, bytes).
fn measured_leak(client: &mut Client, target: &mut Target, n: u64) -> (u64, u64) {
    let measurement = client.request(json!({"op": "begin"}))["measurement"].clone();
    client.request(json!({"op": "window", "measurement": measurement}));
    target.run(&format!("calloc {n} 64"));
    let batch = client.request(json!({"op": "batch", "measurement": measurement, "calls": n, "confirm": 1}));
    client.request(json!({"op": "end", "measurement": measurement}));
    let site = batch["sites"].as_array().unwrap().iter().find(|s| s["site"]["function"] == "leak_calloc");
    site.map_or((0, 0), |s| (s["count"].as_u64().unwrap(), s["bytes"].as_u64().unwrap()))
}

#[test]
fn idle_dripping_half_line_and_endless_clients_starve_no_one_and_sigterm_ends_it_all() {
    let _turn = one_at_a_time();
    raise_own_fd_limit();
    let b = user_b();
    let daemon = Daemon::start(&["--socket-mode", "666", "--max-connections-per-user", "1000"]);
    // 600 connections of B that say nothing: more than tokio's 512 blocking threads.
    let mut idle = connections_as(b, &daemon.socket, 600);
    // 20 of them drip a request a byte at a time, each byte well within any per-read limit.
    let drippers: Vec<UnixStream> = idle.drain(..20).collect();
    // One of B's sessions stops halfway through a line.
    let own = Killed(as_user(&mut Command::new("sleep"), b).arg("1000").spawn().unwrap());
    let mut half = UserClient::start(&daemon.socket, b);
    assert_eq!(half.attach("s", own.0.id())["ok"], true);
    half.send("s", "{\"op\":\"ma");
    // And another sends a line that never ends.
    let mut endless = Client::from_stream(connections_as(b, &daemon.socket, 1).pop().unwrap());
    assert_eq!(endless.ask(&json!({"op": "attach", "pid": own.0.id(), "version": 1}).to_string())["ok"], true);
    let mut endless = endless.stream;

    // Meanwhile a well-behaved client attaches and measures, exactly.
    let mut target = Target::leaky();
    let mut good = Client::attach(&daemon, target.pid());
    let memory_before = daemon.status()["resident_bytes"].as_u64().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..200 {
                if endless.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        scope.spawn(|| {
            let request = br#"{"op":"status"}"#;
            for (i, &byte) in request.iter().cycle().take(24).enumerate() {
                for mut dripper in &drippers {
                    if dripper.write_all(&[byte]).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(if i < 20 { 500 } else { 1000 }));
            }
        });
        for n in 1..=20 {
            assert_eq!(measured_leak(&mut good, &mut target, n), (n, 64 * n), "batch {n} of the good client");
        }
    });
    let memory_after = daemon.status()["resident_bytes"].as_u64().unwrap();
    assert!(
        memory_after < memory_before + (64 << 20),
        "200 MiB without a newline: the daemon went from {} to {} MiB",
        memory_before >> 20,
        memory_after >> 20
    );
    // The drippers sent their request a byte at a time, never whole in 10 s: cut off.
    for mut dripper in &drippers {
        dripper.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut said = String::new();
        let _ = dripper.read_to_string(&mut said);
        assert!(said.contains("no whole request within 10s"), "a dripper was told {said:?}");
    }
    endless.write_all(b"\n").unwrap();
    let mut endless = Client::from_stream(endless);
    assert_error(&endless.reply(), "longer than 65536 bytes refused");
    assert_eq!(good.request(json!({"op": "mark"}))["ok"], true);

    // SIGTERM ends everything, the half line and 580 silent connections included, in seconds.
    let stopping = Instant::now();
    assert!(daemon.terminate().success());
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    assert!(good.is_closed());
    assert_eq!(half.recv("s"), json!({"closed": true}));
    assert_no_probes_remain();
    drop(idle);
}

/// The daemon under `prlimit --nofile=SOFT:HARD`, as a service manager could start it.
fn daemon_with_fd_limit(soft: u32, hard: u32) -> Daemon {
    let socket = fresh_dir("daemon-test", 0o755).join("psleak.sock");
    let psleak = common::psleak().get_program().to_owned();
    Daemon::start_with(
        Command::new("prlimit").arg(format!("--nofile={soft}:{hard}")).arg("--").arg(psleak),
        &socket,
        &[],
    )
}

/// User and system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<u64> =
        stat.rsplit_once(')').unwrap().1.split_whitespace().skip(11).take(2).map(|f| f.parse().unwrap()).collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks)
}

#[test]
fn a_low_open_files_limit_is_raised_and_running_out_is_said_in_words() {
    let _turn = one_at_a_time();
    raise_own_fd_limit();
    let target = Target::leaky();
    // Soft 64, hard 4096 (a service gets 1024:524288 by default): a session holds ~27 fds, so
    // ten need the hard limit, which the daemon takes.
    let daemon = daemon_with_fd_limit(64, 4096);
    let sessions: Vec<Client> = (0..10).map(|_| Client::attach(&daemon, target.pid())).collect();
    drop(sessions);
    assert!(wait_until(Duration::from_secs(10), || daemon.sessions() == 0));
    drop(daemon);

    // Hard 100: the session that finds no fd left says so, whatever call ran out.
    let daemon = daemon_with_fd_limit(100, 100);
    let mut sessions = Vec::new();
    let refusal = loop {
        let mut client = daemon.connect();
        let ready = client.ask(&json!({"op": "attach", "pid": target.pid(), "version": 1}).to_string());
        if ready["ok"] != true {
            break ready;
        }
        sessions.push(client);
        assert!(sessions.len() < 10, "100 fds cannot hold 10 sessions");
    };
    assert_error(&refusal, "too many open files (raise the limit");
    // Connections past the limit cannot even be accepted: the daemon waits for fds rather than
    // spin on a listener that stays ready.
    let waiting: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(&daemon.socket).unwrap()).collect();
    let spent = cpu_time(daemon.pid());
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_time(daemon.pid()) - spent;
    assert!(busy < Duration::from_millis(500), "the daemon spent {busy:?} of CPU in 2 s with no fd to accept with");
    assert!(daemon.log().contains("cannot accept a connection: too many open files"), "{}", daemon.log());
    drop(waiting);
    drop(sessions);
    assert!(wait_until(Duration::from_secs(10), || daemon.sessions() == 0));
    assert_eq!(Client::attach(&daemon, target.pid()).request(json!({"op": "mark"}))["ok"], true, "served again");
}

#[test]
fn memory_is_given_back_when_sessions_end() {
    let _turn = one_at_a_time();
    let daemon = Daemon::start(&[]);
    let resident = || daemon.status()["resident_bytes"].as_u64().unwrap() >> 20;
    // A first session loads what every later one shares (symbolizers, the runtime's threads).
    let mut first = Target::leaky();
    let mut client = Client::attach(&daemon, first.pid());
    first.run("malloc 1000 16");
    client.request(json!({"op": "mark"}));
    drop(client);
    assert!(wait_until(Duration::from_secs(10), || daemon.sessions() == 0));
    let start = resident();

    let mut targets: Vec<Target> = (0..20).map(|_| Target::leaky()).collect();
    let mut clients: Vec<Client> = targets.iter().map(|t| Client::attach(&daemon, t.pid())).collect();
    for (target, client) in targets.iter_mut().zip(&mut clients) {
        target.run("malloc 50000 16");
        client.request(json!({"op": "mark"}));
    }
    let peak = resident();
    drop(clients);
    assert!(wait_until(Duration::from_secs(10), || daemon.sessions() == 0));
    let after = resident();
    assert!(after < start + 24, "resident: {start} MiB, {peak} MiB with 20 sessions, {after} MiB after them");
}

#[test]
fn a_client_in_a_pid_namespace_is_served_the_process_it_names() {
    let _turn = one_at_a_time();
    let a = user_a();
    let daemon = Daemon::start(&["--socket-mode", "666"]);
    // A rootless container: a user namespace of A's, and in it a pid namespace where A's client
    // is pid 1 (the daemon's pid 1 is init, root's).
    let mut unshare = Command::new("unshare");
    unshare.args(["--user", "--map-root-user", "--fork", "--pid", "--mount-proc", "--kill-child"]);
    let mut client = UserClient::start_with(unshare.args(UserClient::command_line(&daemon.socket)), a);
    assert_eq!(client.pid(), 1);
    let ready = client.attach("s", 1);
    assert_eq!(ready["ok"], true, "{ready}");
    let since = client.ask("s", json!({"op": "mark"}))["mark"].clone();
    let fd = client.tell(json!({"do": "open"}))["fd"].clone();
    let created = client.ask("s", json!({"op": "created", "since": since}));
    let fds = created["fds"].as_array().unwrap();
    assert!(
        fds.iter().any(|f| f["fd"] == fd && f["target"] == "/dev/null"),
        "fd {fd} of pid 1 in its namespace: {created}"
    );
}

#[test]
fn a_process_holding_capabilities_its_user_lacks_is_refused() {
    let _turn = one_at_a_time();
    let a = user_a();
    let daemon = Daemon::start(&["--socket-mode", "666"]);
    // Root starts a process of A's with an ambient capability: A may not look inside it.
    let mut privileged = Command::new("setpriv");
    privileged
        .args([format!("--reuid={}", a.0), format!("--regid={}", a.1)])
        .args(["--clear-groups", "--inh-caps=+net_raw", "--ambient-caps=+net_raw"])
        .arg(common::leaky());
    let target = Target::start(&mut privileged);
    let mut client = UserClient::start(&daemon.socket, a);
    assert_error(&client.attach("s", target.pid()), "it holds capabilities (0x2000) that uid");
    let plain = Target::start(as_user(&mut Command::new(common::leaky()), a));
    assert_eq!(client.attach("t", plain.pid())["ok"], true, "its plain processes are served");
}
