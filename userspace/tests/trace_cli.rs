//! `psleak trace` as a bcc or bpftrace user drives it: a versioned JSON layout with a
//! machine-readable end, sites sorted by what the user asks, reports to a file, colour only
//! where it is wanted; each against the real leaking C program under the real probes.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::daemon::fresh_dir;
use common::{psleak, Target, Tracer};
use serde_json::Value;

/// The functions of a report's memory sites, in its order.
fn site_functions(report: &Value) -> Vec<String> {
    let suspects = report["suspects"].as_array().unwrap();
    suspects.iter().map(|s| s["site"]["function"].as_str().unwrap_or("?").to_string()).collect()
}

#[test]
fn each_report_says_its_layout_version_time_and_why_it_ended() {
    let mut target = Target::leaky();
    let tracer = Tracer::attach(target.pid(), &[]);
    target.run("malloc 3 100");
    let report = tracer.finish();
    assert_eq!(report["schema"], 1, "{report}");
    assert_eq!(report["psleak"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["stopped_by"], "interrupted", "a code, not a sentence");
    let time = report["time"].as_str().unwrap();
    let shape: String = time.chars().map(|c| if c.is_ascii_digit() { '9' } else { c }).collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999Z", "UTC, RFC 3339: {time}");
}

#[test]
fn sites_come_in_the_order_asked_for() {
    // leak_malloc holds the most bytes (10 × 5000), leak_calloc the most blocks (100 × 10).
    let mut target = Target::leaky();
    let bytes = Tracer::attach(target.pid(), &["--sort", "bytes"]);
    let count = Tracer::attach(target.pid(), &["--sort", "count"]);
    target.run("malloc 10 5000");
    target.run("calloc 100 10");
    assert_eq!(site_functions(&bytes.finish())[..2], ["leak_malloc", "leak_calloc"]);
    assert_eq!(site_functions(&count.finish())[..2], ["leak_calloc", "leak_malloc"]);
}

#[test]
fn the_fastest_growing_site_leads_when_sorted_by_rate() {
    let mut target = Target::leaky();
    let mut tracer = Tracer::attach(target.pid(), &["--sort", "rate", "--interval", "0.5"]);
    let mut report_with = |function: &str| loop {
        let report = tracer.next_report();
        if site_functions(&report).iter().any(|f| f == function) {
            break report;
        }
    };
    target.run("malloc 10 5000");
    report_with("leak_malloc");
    // Fewer bytes than leak_malloc holds, but made since the last report.
    target.run("realloc 20 300");
    let report = report_with("leak_realloc");
    assert_eq!(site_functions(&report)[..2], ["leak_realloc", "leak_malloc"], "{report:#}");
    assert_eq!(report["suspects"][1]["recent_bytes_per_s"], 0.0, "leak_malloc grew before");
    tracer.finish();
}

#[test]
fn reports_go_to_the_file_asked_for() {
    let mut target = Target::leaky();
    let dir = fresh_dir("trace-output", 0o755);
    let path = dir.join("reports.jsonl");
    let tracer = Tracer::attach(target.pid(), &["-o", path.to_str().unwrap()]);
    target.run("malloc 2 100");
    tracer.signal(libc::SIGINT);
    let output = tracer.into_output();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "nothing on stdout");
    let written = std::fs::read_to_string(&path).unwrap();
    let last: Value = serde_json::from_str(written.lines().last().unwrap()).unwrap();
    assert_eq!((&last["final"], &site_functions(&last)[0]), (&Value::Bool(true), &"leak_malloc".to_string()));
}

#[test]
fn a_file_that_cannot_be_written_stops_it_before_anything_is_attached() {
    let target = Target::leaky();
    let out = psleak()
        .args(["trace", "--pid", &target.pid().to_string(), "-o", "/nonexistent/dir/reports"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("psleak: cannot write to /nonexistent/dir/reports: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn colour_only_when_asked_or_on_a_terminal_without_no_color() {
    let target = Target::leaky();
    let trace = ["trace", "--duration", "0.5", "--pid", &target.pid().to_string()].map(String::from);
    let text = |extra: &[&str]| {
        let out = psleak().args(&trace).args(extra).stderr(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(text(&["--color", "always"]).starts_with("\x1b[1m["), "bold headings");
    assert!(!text(&["--color", "never"]).contains('\x1b'));
    assert!(!text(&[]).contains('\x1b'), "auto: stdout is a pipe here, not a terminal");
    assert!(!text(&["--color", "always", "--json"]).contains('\x1b'), "JSON is never coloured");
    // On a terminal (script(1) gives it one), auto colours unless NO_COLOR is set.
    let on_a_terminal = |no_color: &str| {
        let command = format!("{} {}", psleak().get_program().to_string_lossy(), trace.join(" "));
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .env("NO_COLOR", no_color)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(on_a_terminal("").contains("\x1b[1m["), "an empty NO_COLOR is not set");
    assert!(!on_a_terminal("1").contains("\x1b[1m"), "NO_COLOR=1");
}

#[test]
fn a_command_started_for_the_trace_is_followed_from_its_first_instruction() {
    let program = common::build_target("leaks_at_start", false);
    let out = psleak().args(["trace", "--json", "--"]).arg(&program).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["stopped_by"], "target_exited");
    let leak = &report["suspects"][0];
    let line = common::line_of("leaks_at_start", "LEAK_LINE");
    assert_eq!((&leak["site"]["function"], &leak["site"]["line"]), (&"main".into(), &line.into()), "{report:#}");
    assert_eq!((leak["count"].as_u64(), leak["bytes"].as_u64()), (Some(5), Some(5000)), "every block, the first too");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(", started for it): "), "{stderr}");
    assert!(stderr.trim_end().ends_with("ended (exit status: 3)"), "its exit status is said: {stderr}");
}

#[test]
fn what_a_command_does_in_a_library_it_loaded_just_before_it_exits_is_named() {
    // Its address space is gone once it has exited: it is held at its exit until psleak has
    // read every event it made (before, the library's blocks were `0x... in ?`).
    let (program, library) = common::loads_late();
    // Its main thread exits it, or another thread while the main one waits (its exit stops the
    // main thread too).
    for how in [&[][..], &["thread"], &[], &["thread"]] {
        let out = psleak().args(["trace", "--json", "--"]).arg(&program).arg(&library).args(how).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(report["stopped_by"], "target_exited");
        common::assert_the_late_library_is_named(&report);
        assert!(String::from_utf8_lossy(&out.stderr).trim_end().ends_with("ended (exit status: 0)"));
    }
}

/// A trace of `command`, in a process group of its own, once psleak says it is tracing it; the
/// command's pid.
struct CommandTrace {
    tracer: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
    command: u32,
}

impl CommandTrace {
    fn start(command: &[&str]) -> Self {
        let mut tracing = psleak();
        tracing.args(["trace", "--"]).args(command).stdout(Stdio::null()).process_group(0);
        let (tracer, stderr) = common::start_psleak(&mut tracing, "tracing pid");
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", tracer.id())).unwrap();
        let command = children.split_whitespace().next().unwrap().parse().unwrap();
        Self { tracer, stderr, command }
    }

    /// Whether psleak ended well, and the rest of what it said.
    fn end(mut self) -> (bool, String) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).unwrap();
        (self.tracer.wait().unwrap().success(), rest)
    }
}

fn state_of(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

#[test]
fn a_command_gets_its_signals_stops_and_goes_on_as_it_would_without_psleak() {
    // A signal it sends itself reaches its handler.
    let trapped = psleak().args(["trace", "--", "sh", "-c", "trap 'exit 5' USR1; kill -USR1 $$; sleep 5"]).output();
    let stderr = String::from_utf8(trapped.unwrap().stderr).unwrap();
    assert!(stderr.trim_end().ends_with("ended (exit status: 5)"), "{stderr}");

    // Stopped, it stays so until a SIGCONT (job control), then goes on.
    let trace = CommandTrace::start(&["sh", "-c", "kill -STOP $$; exit 6"]);
    let command = trace.command;
    let started = std::time::Instant::now();
    while !matches!(state_of(command), 't' | 'T') {
        assert!(started.elapsed().as_secs() < 10, "the command never stopped");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(matches!(state_of(command), 't' | 'T'), "nothing but a SIGCONT may resume it");
    // SAFETY: kill(2) of the command, our grandchild, still there (stopped).
    unsafe { libc::kill(command as i32, libc::SIGCONT) };
    let (_, stderr) = trace.end();
    assert!(stderr.trim_end().ends_with("ended (exit status: 6)"), "{stderr}");

    // Ctrl-C (SIGINT to the process group) ends both: the trace with its last report.
    let trace = CommandTrace::start(&["sleep", "10"]);
    // SAFETY: kill(2) of the process group the tracer leads.
    unsafe { libc::kill(-(trace.tracer.id() as i32), libc::SIGINT) };
    let (ended_well, stderr) = trace.end();
    assert!(ended_well, "{stderr}");
    assert!(stderr.trim_end().ends_with("ended (signal: 2 (SIGINT))"), "{stderr}");
}

#[test]
fn a_command_that_cannot_run_or_a_target_given_twice_is_refused_in_a_line() {
    let refused = |args: &[&str]| {
        let out = psleak().arg("trace").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = refused(&["--", "/nonexistent/prog", "arg"]);
    assert_eq!(missing.trim_end(), "psleak: cannot run /nonexistent/prog: No such file or directory (os error 2)");
    assert!(refused(&["--pid", "1", "--", "/bin/true"]).contains("cannot be used with"));
    assert!(refused(&[]).contains("<--pid <PID>|CMD>"), "either is needed");
}

#[test]
fn a_shallower_stack_depth_copies_fewer_frames() {
    let program = common::build_target("deep_leak", false);
    let frames = |depth: &str| {
        let out = psleak().args(["trace", "--json", "--stack-depth", depth, "--"]).arg(&program).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let report: Value =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
        let leak = report["suspects"].as_array().unwrap().iter().find(|s| s["site"]["function"] == "leak_deep");
        let stack = leak.unwrap_or_else(|| panic!("a leak_deep site: {report:#}"))["stack"].as_array().unwrap().clone();
        stack.iter().filter(|f| f["function"] == "leak_deep").count()
    };
    // Each of the 13 calls takes ~240 bytes of stack.
    let (shallow, deep) = (frames("512"), frames("2048"));
    assert!((1..=3).contains(&shallow), "512 bytes reach at most 3 calls: {shallow}");
    assert!(deep >= 8, "2048 bytes reach 8 calls at least: {deep}");
}
