//! `psleak trace` through a `psleak daemon`, run as an unprivileged user would: the daemon's
//! probes on the user's own process, the reports written by the user's psleak; every refusal
//! with the reason the daemon gives the user's tests. And the `report` request it rests on,
//! sent by a hostile client.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{as_user, assert_error, setuid_leaky, user_a, Client, Daemon};
use common::{build_target, leaky, line_of, psleak, start_psleak, suspects_at, Target, Tracer};
use serde_json::{json, Value};

/// `psleak trace ARGS` as user A, through the daemon on `socket`.
fn trace_as_user(socket: &Path, args: &[&str]) -> Command {
    let mut command = psleak();
    as_user(&mut command, user_a()).arg("trace").arg("--socket").arg(socket).args(args);
    command
}

/// Runs it to its end: exit code, stdout, stderr.
fn run(mut command: Command) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = command.output().unwrap();
    (status.code(), String::from_utf8(stdout).unwrap(), String::from_utf8(stderr).unwrap())
}

fn last_report(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().expect("a report")).unwrap()
}

/// The daemon every user may connect to.
fn open_daemon() -> Daemon {
    Daemon::start(&["--socket-mode", "666"])
}

#[test]
fn a_user_without_privileges_traces_its_own_process_through_the_daemon() {
    let daemon = open_daemon();
    let mut target = Target::start(as_user(&mut Command::new(leaky()), user_a()));
    let pid = target.pid().to_string();
    let mut command = trace_as_user(&daemon.socket, &["--json", "--pid", &pid, "--interval", "3600"]);
    let (child, _) = start_psleak(command.stdout(Stdio::piped()), "through the psleak daemon on");
    let tracer = Tracer::from_child(child);
    target.run("malloc 3 100");
    target.run("file 1");
    let report = tracer.finish();
    let leak = suspects_at(&report, "leak_malloc");
    assert_eq!(leak.len(), 1, "{report:#}");
    assert_eq!((leak[0]["count"].as_u64(), leak[0]["bytes"].as_u64()), (Some(3), Some(300)));
    assert_eq!(report["fds"][0]["site"]["function"], "leak_file", "{report:#}");
    assert_eq!((&report["pid"], &report["stopped_by"]), (&target.pid().into(), &"interrupted".into()));
    assert!(report["process"]["now"]["rss"].as_u64() > Some(0), "the target's counters too: {report:#}");
    let (uid, _) = user_a();
    assert!(daemon.log().contains(&format!("uid {uid} (client pid ")), "{}", daemon.log());
}

#[test]
fn a_command_started_through_the_daemon_is_followed_from_its_first_instruction_to_its_exit() {
    let daemon = open_daemon();
    let program = build_target("leaks_at_start", false);
    let (code, stdout, stderr) = run(trace_as_user(&daemon.socket, &["--json", "--", program.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{stderr}");
    let report = last_report(&stdout);
    assert_eq!((&report["final"], &report["stopped_by"]), (&true.into(), &"target_exited".into()), "{report:#}");
    let leak = &report["suspects"][0];
    let line = line_of("leaks_at_start", "LEAK_LINE");
    assert_eq!((&leak["site"]["function"], &leak["site"]["line"]), (&"main".into(), &line.into()), "{report:#}");
    assert_eq!((leak["count"].as_u64(), leak["bytes"].as_u64()), (Some(5), Some(5000)), "every block, the first too");
    assert!(stderr.contains(", started for it) through the psleak daemon on "), "{stderr}");
    assert!(stderr.trim_end().ends_with("ended (exit status: 3)"), "{stderr}");

    // The text, coloured when asked: made by the daemon in this output's colours.
    let (code, text, stderr) =
        run(trace_as_user(&daemon.socket, &["--color", "always", "--", program.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.contains("\x1b[33mmain (leaks_at_start.c:"), "{text}");
    assert!(text.contains("psleak: stopped (the target exited)"), "{text}");
}

#[test]
fn through_the_daemon_what_a_command_does_just_before_it_exits_is_named() {
    // The daemon reads the command's last events while it is held at its exit (a mark).
    let daemon = open_daemon();
    let (program, library) = common::loads_late();
    let (code, stdout, stderr) =
        run(trace_as_user(&daemon.socket, &["--json", "--", program.to_str().unwrap(), library.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{stderr}");
    common::assert_the_late_library_is_named(&last_report(&stdout));
}

#[test]
fn the_stack_depth_asked_through_the_daemon_is_the_one_its_probes_copy() {
    let daemon = open_daemon();
    let program = build_target("deep_leak", false);
    let frames = |depth: &str| {
        let (code, stdout, stderr) =
            run(trace_as_user(&daemon.socket, &["--json", "--stack-depth", depth, "--", program.to_str().unwrap()]));
        assert_eq!(code, Some(0), "{stderr}");
        let report = last_report(&stdout);
        let leak = suspects_at(&report, "leak_deep");
        let stack = leak.first().unwrap_or_else(|| panic!("a leak_deep site: {report:#}"))["stack"].clone();
        stack.as_array().unwrap().iter().filter(|f| f["function"] == "leak_deep").count()
    };
    let (shallow, deep) = (frames("512"), frames("2048"));
    assert!((1..=3).contains(&shallow), "512 bytes reach at most 3 calls: {shallow}");
    assert!(deep >= 8, "2048 bytes reach 8 calls at least: {deep}");
}

#[test]
fn through_the_daemon_each_refusal_names_its_real_reason() {
    let daemon = open_daemon();
    let socket = daemon.socket.to_str().unwrap();
    let (uid, _) = user_a();
    let refused = |command: Command| {
        let (code, _, stderr) = run(command);
        assert_eq!((code, stderr.lines().count()), (Some(2), 1), "one line, exit 2: {stderr}");
        stderr.trim_end().to_string()
    };
    let roots = Target::leaky();
    for pid in [roots.pid(), 1] {
        assert_eq!(
            refused(trace_as_user(&daemon.socket, &["--pid", &pid.to_string()])),
            format!("psleak: the psleak daemon on {socket}: cannot trace pid {pid}: it belongs to uid 0, and you are uid {uid}"),
        );
    }
    let dead = {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    assert!(refused(trace_as_user(&daemon.socket, &["--pid", &dead.to_string()]))
        .starts_with(&format!("psleak: no process with pid {dead}")));
    let mine = Target::start(as_user(&mut Command::new(leaky()), user_a()));
    let pid = mine.pid().to_string();
    let own_probes = refused(trace_as_user(&daemon.socket, &["--pid", &pid, "--ring-mib", "64", "--btf", "/x"]));
    assert!(own_probes.starts_with("psleak: --btf, --ring-mib set up psleak's own probes"), "{own_probes}");

    let mut nobody_listens = psleak();
    as_user(&mut nobody_listens, user_a()).args(["trace", "--pid", &pid]).env("PSLEAK_SOCKET", "/nonexistent/s");
    assert!(refused(nobody_listens).starts_with("psleak: no psleak daemon answers on /nonexistent/s: "));
    let roots_only = Daemon::start(&[]);
    assert!(refused(trace_as_user(&roots_only.socket, &["--pid", &pid])).ends_with(&format!(
        "the psleak daemon on {} does not admit this user: its --socket-mode and --socket-group say who may connect",
        roots_only.socket.display()
    )));
}

/// An attach as root asking for the last report after the target's exit.
fn tracer_session(daemon: &Daemon, pid: u32) -> Client {
    let mut client = daemon.connect();
    client.request(json!({"op": "attach", "pid": pid, "version": 1, "final_report": true}));
    client
}

#[test]
fn a_report_request_out_of_bounds_is_refused_and_the_session_goes_on() {
    let daemon = open_daemon();
    let mut target = Target::leaky();
    // A test's session (no final_report) is not a tracer's: it makes no reports.
    let mut tests = Client::attach(&daemon, target.pid());
    assert_error(&tests.ask(r#"{"op":"report"}"#), "this session makes no reports");
    drop(tests);
    let mut client = tracer_session(&daemon, target.pid());
    target.run("malloc 2 100");
    let cases = [
        (json!({"op": "report", "top": 1_000_000_000_000u64}), "at most 1000 memory sites"),
        (json!({"op": "report", "min_size": 10, "max_size": 1}), "max_size is smaller than min_size"),
        (json!({"op": "report", "sort": "evil"}), "bad request: unknown variant `evil`"),
        (json!({"op": "report", "min_age_ms": -1}), "bad request: invalid value"),
        (json!({"op": "report", "stopped_by": "everything"}), "bad request: unknown variant"),
        (json!({"op": "report", "top": 1, "colour": "red"}), "bad request: invalid type"),
    ];
    for (request, expected) in cases {
        assert_error(&client.ask(&request.to_string()), expected);
    }
    // Forever is no age anything has: nothing is shown, nothing overflows.
    let ancient = client.request(json!({"op": "report", "min_age_ms": u64::MAX}));
    assert_eq!(ancient["report"]["live"]["sites"], 0, "{ancient}");
    let report = client.request(json!({"op": "report", "top": 1, "sort": "count", "text": true}))["report"].clone();
    assert_eq!(suspects_at(&report, "leak_malloc")[0]["count"], 2, "{report:#}");
    // A last report ends the session.
    let last = client.request(json!({"op": "report", "stopped_by": "interrupted"}));
    assert_eq!((&last["report"]["final"], &last["report"]["stopped_by"]), (&true.into(), &"interrupted".into()));
    assert!(client.is_closed(), "the session ends with its last report");
    assert!(common::wait_until(Duration::from_secs(5), || daemon.sessions() == 0));
}

#[test]
fn an_attach_asking_for_a_stack_depth_the_probes_cannot_copy_is_refused() {
    let daemon = open_daemon();
    let target = Target::leaky();
    for (stack_bytes, expected) in [
        (json!(4096), "bad attach: 4096 is not a stack depth of 512, 1024, 1536 or 2048 bytes"),
        (json!(0), "bad attach: 0 is not a stack depth"),
        (json!(513), "bad attach: 513 is not a stack depth"),
        (json!(-512), "bad request: invalid value"),
        (json!("deep"), "bad request: invalid type"),
    ] {
        let attach = json!({"op": "attach", "pid": target.pid(), "version": 1, "stack_bytes": stack_bytes});
        assert_error(&daemon.connect().ask(&attach.to_string()), expected);
    }
    let frames = json!({"op": "attach", "pid": target.pid(), "version": 1, "python_frames": "yes"});
    assert_error(&daemon.connect().ask(&frames.to_string()), "bad request: invalid type");
    assert_eq!(daemon.sessions(), 0, "none was admitted");
}

#[test]
fn after_its_target_exits_a_tracers_session_gives_the_last_report_once_then_ends() {
    let daemon = open_daemon();
    let mut target = Target::leaky();
    let pid = target.pid();
    let mut client = tracer_session(&daemon, pid);
    target.run("malloc 4 100");
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    let last = client.request(json!({"op": "report"}))["report"].clone();
    assert_eq!((&last["final"], &last["stopped_by"]), (&true.into(), &"target_exited".into()), "{last:#}");
    assert_eq!(suspects_at(&last, "leak_malloc")[0]["count"], 4, "what it did until its exit: {last:#}");
    assert_eq!(last["process"], Value::Null, "no counters of a pid that may be another process's now");
    assert!(client.is_closed());

    // A tracer that never asks is not waited for long.
    let target = Target::leaky();
    let _silent = tracer_session(&daemon, target.pid());
    drop(target);
    assert!(common::wait_until(Duration::from_secs(20), || daemon.sessions() == 0), "{}", daemon.log());
}

/// User A's process traced through `daemon`, once it has exec'd a setuid program (which makes
/// it root) and opened a file of root's; the trace's psleak, its stderr after its first line,
/// and the setuid program's directory (to remove).
fn traced_into_root(daemon: &Daemon, target: &mut Target) -> (Tracer, BufReader<ChildStderr>, PathBuf) {
    let setuid = setuid_leaky();
    let pid = target.pid().to_string();
    let mut command = trace_as_user(&daemon.socket, &["--json", "--pid", &pid, "--interval", "3600"]);
    let (child, stderr) = start_psleak(command.stdout(Stdio::piped()), "through the psleak daemon on");
    target.exec(&setuid);
    target.run("file 1");
    (Tracer::from_child(child), stderr, setuid.parent().unwrap().to_path_buf())
}

/// A trace's last report once its target became root: nothing of root's program is shown.
fn assert_nothing_of_roots(stdout: &str) {
    let report = last_report(stdout);
    assert_eq!((&report["final"], &report["stopped_by"]), (&true.into(), &"target_changed_user".into()));
    assert_eq!(report["fds"].as_array().unwrap().len(), 0, "nothing of root's is shown: {report:#}");
    assert_eq!(report["suspects"].as_array().unwrap().len(), 0, "{report:#}");
    assert!(report["process"].is_null(), "{report:#}");
}

#[test]
fn a_target_that_becomes_root_and_exits_shows_its_tracer_nothing_of_roots_program() {
    // The attack: a program that execs a setuid one, which opens a file of root's and exits
    // at once, before the session's next look at whom it runs as. The tracer is told, and its
    // last report shows nothing, as psleak trace's own probes do (trace_hostile.rs); before, the
    // daemon's refusal ended it with no report and exit status 2.
    let daemon = open_daemon();
    let mut target = Target::start(as_user(&mut Command::new(leaky()), user_a()));
    let (tracer, mut stderr, setuid) = traced_into_root(&daemon, &mut target);
    drop(target);
    let output = tracer.into_output();
    let mut said = String::new();
    stderr.read_to_string(&mut said).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.starts_with("psleak: the target exec'd, and ") && said.contains(": tracing stops"), "{said}");
    assert_eq!(stdout.lines().count(), 1, "the last report alone: {stdout}");
    assert_nothing_of_roots(&stdout);
    let _ = std::fs::remove_dir_all(setuid);
}

#[test]
fn a_target_that_becomes_root_and_runs_on_ends_its_tracers_trace_at_once() {
    // The daemon tells the tracer unasked (`protocol::Over`): it does not wait an interval to
    // learn that its session is over.
    let daemon = open_daemon();
    let mut target = Target::start(as_user(&mut Command::new(leaky()), user_a()));
    let (tracer, mut stderr, setuid) = traced_into_root(&daemon, &mut target);
    let tracer_pid = tracer.pid();
    let ended = common::wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{tracer_pid}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    if !ended {
        tracer.signal(libc::SIGKILL);
    }
    let output = tracer.into_output();
    assert!(ended, "the trace goes on while the target runs as root");
    let mut said = String::new();
    stderr.read_to_string(&mut said).unwrap();
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(said.contains("psleak: the target exec'd, and it runs a setuid or setgid program"), "{said}");
    assert_nothing_of_roots(&String::from_utf8_lossy(&output.stdout));
    target.run("malloc 1 1"); // it runs on
    let _ = std::fs::remove_dir_all(setuid);
}
