//! `psleak daemon` against hostile users: the attacks a hostile run found, each replayed
//! against the real daemon (run as root) by real processes of two unprivileged users made for
//! the tests (`psleak-test-a`, `psleak-test-b`). Each test fails against a daemon from before
//! its fix (`PSLEAK_TEST_BINARY=old/psleak cargo test --test daemon_hostile`).

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{as_user, assert_error, connections_as, fresh_dir, user_a, user_b, Client, Daemon, UserClient};
use common::{assert_no_probes_remain, run_psleak, wait_until, Killed, Target};
use serde_json::{json, Value};

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
            assert_eq!(mode_and_owner(&secret), (0o600, 0), "dir mode {mode:o}, round {round}: root's file was changed");
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
    let mut child = common::psleak()
        .args(["daemon", "--socket"])
        .arg(socket)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    for option in ["--idle-timeout"] {
        let (code, stderr) = run_psleak(&["daemon", option, "1e300"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("seconds is longer than psleak waits"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
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
