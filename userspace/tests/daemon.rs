//! `psleak daemon`: a root daemon serving clients over its socket. Clients of another uid
//! (`nobody`, through python3 run with that uid) are refused what they do not own; hostile
//! input is answered while another session goes on; no probe outlives its session, however
//! the session ends (bpftool). The tests take turns, since they count every psleak program.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::daemon::{assert_error, Client, Daemon};
use common::{assert_no_probes_remain, psleak_programs_loaded, Target, PROGRAMS};
use serde_json::{json, Value};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const NOBODY: u32 = 65534;

/// One batch of one measurement: `calls` calls of `command` in the target; the reply.
fn measure(client: &mut Client, target: &mut Target, command: &str, calls: u64) -> Value {
    let measurement = client.request(json!({"op": "begin"}))["measurement"].clone();
    client.request(json!({"op": "window", "measurement": measurement}));
    target.run(command);
    let batch = client.request(json!({"op": "batch", "measurement": measurement, "calls": calls, "confirm": 1}));
    client.request(json!({"op": "end", "measurement": measurement}));
    batch
}

fn site_of<'a>(batch: &'a Value, function: &str) -> &'a Value {
    let sites = batch["sites"].as_array().unwrap();
    sites.iter().find(|s| s["site"]["function"] == function).unwrap_or_else(|| panic!("no {function} in {batch}"))
}

#[test]
fn a_session_through_the_daemon_measures_exactly_and_detaches() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let mut target = Target::leaky();
    let mut client = Client::attach(&daemon, target.pid());
    client.request(json!({"op": "hello", "version": 1}));
    let batch = measure(&mut client, &mut target, "malloc 5 100", 5);
    let leak = site_of(&batch, "leak_malloc");
    assert_eq!((leak["count"].as_u64(), leak["bytes"].as_u64()), (Some(5), Some(500)), "{batch}");
    assert!(psleak_programs_loaded() >= PROGRAMS.len());

    let status = daemon.status();
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{status}");
    assert_eq!(sessions[0]["pid"], target.pid());
    assert_eq!(sessions[0]["uid"], 0);
    assert!(sessions[0]["events"].as_u64().unwrap() >= 5, "{status}");
    assert!(status["resident_bytes"].as_u64().unwrap() > 0, "{status}");

    client.request(json!({"op": "detach"}));
    assert!(client.is_closed(), "the session ends after detach");
    assert_no_probes_remain();
    assert!(daemon.status()["sessions"].as_array().unwrap().is_empty());
}

#[test]
fn a_session_that_asks_for_no_allocator_probes_gets_none() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let mut target = Target::leaky();
    let mut client = daemon.connect();
    let ask = |allocators| json!({"op": "attach", "pid": target.pid(), "version": 1, "allocators": allocators});
    let ready = client.request(ask("none"));
    assert_eq!(ready["allocators"], "none", "{ready}");
    let mut all = daemon.connect();
    let all_ready = all.request(ask("all"));
    assert!(ready["probes"].as_u64() < all_ready["probes"].as_u64(), "{ready} {all_ready}");
    drop(all);
    client.request(json!({"op": "hello", "version": 1}));
    let batch = measure(&mut client, &mut target, "malloc 5 100", 5);
    assert!(batch["sites"].as_array().unwrap().is_empty(), "no malloc is seen: {batch}");
}

#[test]
fn garbage_and_oversized_messages_get_errors_while_another_session_goes_on() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let mut target = Target::leaky();
    let mut good = Client::attach(&daemon, target.pid());
    let pid = target.pid();

    std::thread::scope(|scope| {
        let hostile = scope.spawn(|| {
            // Slow clients: lines that arrive in pieces are read whole, whatever their size.
            let mut slow = daemon.connect();
            let pause = || std::thread::sleep(Duration::from_millis(100));
            for (head, tail, expected) in [
                (&br#"{"op":"sta"#[..], &b"tus\"}\n"[..], None),
                (&[b'x'; 70 << 10][..], &b"xxxx\n"[..], Some("longer than")),
            ] {
                slow.stream.write_all(head).unwrap();
                pause();
                let reply = slow.ask_bytes(tail);
                match expected {
                    None => assert_eq!(reply["ok"], true, "{reply}"),
                    Some(error) => assert_error(&reply, error),
                }
            }
            let mut rude = Client::attach(&daemon, pid);
            rude.stream.write_all(&[b'{'; 70 << 10]).unwrap();
            pause();
            assert_error(&rude.ask_bytes(b"}\n"), "longer than");
            rude.stream.write_all(br#"{"op":"#).unwrap();
            pause();
            let reply = rude.ask(r#""mark"}"#);
            assert_eq!(reply["ok"], true, "{reply}");
            for _ in 0..20 {
                let mut bad = daemon.connect();
                assert_error(&bad.ask("hello there"), "bad request");
                assert_error(&bad.ask(&"x".repeat(200 << 10)), "longer than");
                assert_error(&bad.ask_bytes(b"\xff\xfe{\"op\"\n"), "not UTF-8");
                assert_error(&bad.ask(r#"{"op":"batch","measurement":1,"calls":1,"confirm":1}"#), "starts with attach");
                assert_error(&bad.ask(r#"{"op":"attach","pid":1}"#), "missing field `version`");
                assert_error(&bad.ask(r#"{"op":"attach","pid":1,"version":99}"#), "protocol version 99");
                assert_error(&bad.ask(r#"{"op":"attach","pid":1,"version":1,"allocators":"heap"}"#), "unknown variant");
                assert_error(&bad.ask(r#"{"op":"attach","pid":4194304,"version":1}"#), "no process with pid");
                assert_eq!(bad.ask(r#"{"op":"status"}"#)["ok"], true, "the connection is still served");
                // Half a line, then gone.
                daemon.connect().stream.write_all(b"{\"op\":\"att").unwrap();

                // Out of order within a session of its own, on the same target.
                let mut rude = Client::attach(&daemon, pid);
                assert_error(&rude.ask(r#"{"op":"batch","measurement":7,"calls":1,"confirm":1}"#), "no measurement 7");
                let m = rude.request(json!({"op": "begin"}))["measurement"].clone();
                let early = json!({"op": "batch", "measurement": m, "calls": 1, "confirm": 1}).to_string();
                assert_error(&rude.ask(&early), "must start with a window");
                assert_error(&rude.ask(r#"{"op":"status"}"#), "unknown variant `status`");
                assert_error(&rude.ask(&"{".repeat(100 << 10)), "longer than");
                rude.request(json!({"op": "mark"}));
            }
        });
        // Meanwhile the well-behaved session measures, batch after batch.
        for n in 1..=10u64 {
            let batch = measure(&mut good, &mut target, &format!("calloc {n} 64"), n);
            let leak = site_of(&batch, "leak_calloc");
            assert_eq!((leak["count"].as_u64(), leak["bytes"].as_u64()), (Some(n), Some(64 * n)), "{batch}");
            assert_eq!(batch["lost"]["ring_full"], 0);
        }
        hostile.join().unwrap();
    });
    let only_good_left = || daemon.status()["sessions"].as_array().unwrap().len() == 1;
    assert!(common::wait_until(Duration::from_secs(5), only_good_left), "the hostile sessions end, the good one stays");
    good.request(json!({"op": "mark"}));
    drop(good);
    assert_no_probes_remain();
}

/// python3 as `nobody`, speaking to the daemon: prints each reply on a line of its own.
fn nobody_client(socket: &Path, root_pid: u32) -> Vec<Value> {
    let script = r#"
import json, os, socket, sys
def connect():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print(json.dumps({"connect": e.strerror}))
        sys.exit()
    return s, s.makefile("rb")
def ask(conn, **request):
    conn[0].sendall(json.dumps(request).encode() + b"\n")
    print(json.dumps(json.loads(conn[1].readline())), flush=True)
session = connect()
ask(session, op="attach", pid=int(sys.argv[2]), version=1)
ask(session, op="attach", pid=os.getpid(), version=1)
ask(connect(), op="status")
ask(session, op="mark")
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .arg(root_pid.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_client_of_another_uid_is_refused_what_it_does_not_own() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target = Target::leaky();

    // By default the socket admits root only.
    let private = Daemon::start(&[]);
    let replies = nobody_client(&private.socket, target.pid());
    assert_eq!(replies, [json!({"connect": "Permission denied"})]);
    drop(private);

    let open = Daemon::start(&["--socket-mode", "666"]);
    let _root_session = Client::attach(&open, target.pid());
    let replies = nobody_client(&open.socket, target.pid());
    assert_error(
        &replies[0],
        &format!("cannot trace pid {}: it belongs to uid 0, and you are uid {NOBODY}", target.pid()),
    );
    assert_eq!(replies[1]["ok"], true, "its own process is traced: {}", replies[1]);
    // Its status shows its own session, not root's.
    let seen: Vec<&Value> = replies[2]["sessions"].as_array().unwrap().iter().collect();
    assert_eq!(seen.len(), 1, "{}", replies[2]);
    assert_eq!(seen[0]["uid"], NOBODY);
    assert_eq!(replies[3]["ok"], true);
    // Root sees both while they last; the nobody session ended with its process.
    assert!(common::wait_until(Duration::from_secs(5), || open.status()["sessions"].as_array().unwrap().len() == 1));
}

#[test]
fn a_client_killed_with_sigkill_leaves_no_probe() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let mut target = Target::leaky();
    let script = r#"
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"op": "attach", "pid": int(sys.argv[2]), "version": 1}).encode() + b"\n")
print(s.makefile("rb").readline().decode(), end="", flush=True)
time.sleep(3600)
"#;
    let mut client = Command::new("python3")
        .args(["-c", script])
        .arg(&daemon.socket)
        .arg(target.pid().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut ready = String::new();
    BufReader::new(client.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert!(ready.contains("\"ok\":true"), "{ready}");
    target.run("malloc 10 10");
    assert!(psleak_programs_loaded() >= PROGRAMS.len(), "the probes are loaded while the client lives");

    client.kill().unwrap();
    client.wait().unwrap();
    assert_no_probes_remain();
    target.run("malloc 1 1"); // the target lives on, untouched
    assert!(daemon.status()["sessions"].as_array().unwrap().is_empty());
}

#[test]
fn sigterm_detaches_everything_and_removes_the_socket() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let targets = [Target::leaky(), Target::leaky()];
    let mut clients: Vec<Client> = targets.iter().map(|t| Client::attach(&daemon, t.pid())).collect();
    let mut silent = daemon.connect(); // connected, has not asked anything yet
    let socket = daemon.socket.clone();
    assert!(psleak_programs_loaded() >= 2 * PROGRAMS.len());

    let status = daemon.terminate();
    assert!(status.success(), "the daemon exits cleanly: {status}");
    assert!(!socket.exists(), "the socket is removed");
    assert_no_probes_remain();
    for client in &mut clients {
        assert!(client.is_closed());
    }
    assert!(silent.is_closed());
}

#[test]
fn idle_sessions_end_and_the_session_limit_is_kept() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&["--idle-timeout", "0.5", "--max-sessions", "1"]);
    let target = Target::leaky();
    let mut first = Client::attach(&daemon, target.pid());
    let mut second = daemon.connect();
    assert_error(
        &second.ask(&json!({"op": "attach", "pid": target.pid(), "version": 1}).to_string()),
        "--max-sessions",
    );
    assert_error(&first.reply(), "idle for too long");
    assert!(first.is_closed());
    assert_no_probes_remain();
    let _third = Client::attach(&daemon, target.pid()); // room again
}

#[test]
fn a_service_manager_is_told_when_the_daemon_is_ready() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let socket = dir.join("psleak.sock");
    let mut daemon = common::psleak()
        .args(["daemon", "--socket"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", dir.join("notify"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut message = [0u8; 64];
    let received = notify.recv(&mut message);
    let listening = UnixStream::connect(&socket).is_ok();
    let _ = daemon.kill();
    daemon.wait().unwrap();
    assert_eq!(&message[..received.expect("READY=1 within 10 s")], b"READY=1");
    assert!(listening, "ready means listening");
}

#[test]
fn bad_daemon_arguments_get_one_line_errors() {
    let refused = |args: &[&str], expected: &str| {
        let (code, stderr) = common::run_psleak(args);
        assert_eq!(code, 2, "exit status for {args:?}; stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line for {args:?}: {stderr}");
        assert!(stderr.starts_with("psleak: ") && stderr.contains(expected), "for {args:?}: {stderr}");
    };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket.to_str().unwrap();
    refused(&["daemon", "--socket", socket], "a psleak daemon already listens on");
    assert_eq!(daemon.status()["ok"], true, "the running daemon is untouched");
    refused(&["daemon", "--socket", "/nonexistent/dir/psleak.sock", "--status"], "no psleak daemon answers");
    refused(&["daemon", "--socket", "/nonexistent/dir/psleak.sock"], "cannot listen on");
    let elsewhere = daemon.socket.with_file_name("other.sock");
    let elsewhere = elsewhere.to_str().unwrap();
    refused(&["daemon", "--socket", elsewhere, "--socket-group", "no-such-group"], "no group named no-such-group");
    assert!(!Path::new(elsewhere).exists(), "no socket is left behind");
}
