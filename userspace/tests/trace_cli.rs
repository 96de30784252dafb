//! `psleak trace` as a bcc or bpftrace user drives it: a versioned JSON layout with a
//! machine-readable end, sites sorted by what the user asks, reports to a file, colour only
//! where it is wanted; each against the real leaking C program under the real probes.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

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
