//! Nothing of psleak stays in the kernel after it ends, however it ends: checked with bpftool.
//! The tests of this file take turns, since each counts every psleak program in the kernel.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::{Target, Tracer};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The names of psleak's BPF programs (as the kernel keeps them, 15 characters at most).
const PROGRAMS: [&str; 6] = ["alloc_enter", "alloc_exit", "free_enter", "syscall_exit", "thread_start", "thread_exit"];

fn psleak_programs_loaded() -> usize {
    let output = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs (cargo xtask setup installs it)");
    assert!(output.status.success(), "bpftool: {}", String::from_utf8_lossy(&output.stderr));
    let programs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    programs.as_array().unwrap().iter().filter(|p| PROGRAMS.iter().any(|name| p["name"] == *name)).count()
}

fn assert_all_gone() {
    let gone = common::wait_until(Duration::from_secs(5), || psleak_programs_loaded() == 0);
    assert!(gone, "{} psleak programs are still loaded", psleak_programs_loaded());
}

fn attached_tracer(target: &mut Target) -> Tracer {
    let tracer = Tracer::attach(target.pid(), &[]);
    target.run("malloc 10 10");
    assert!(psleak_programs_loaded() >= PROGRAMS.len(), "the probes are loaded while tracing");
    tracer
}

#[test]
fn nothing_remains_after_ctrl_c() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut target = Target::leaky();
    attached_tracer(&mut target).finish();
    assert_all_gone();
}

#[test]
fn nothing_remains_after_sigterm_or_sigkill() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut target = Target::leaky();
        let tracer = attached_tracer(&mut target);
        tracer.signal(signal);
        let _ = tracer.into_output();
        assert_all_gone();
    }
}

#[test]
fn nothing_remains_after_the_target_exits() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut target = Target::leaky();
    let tracer = attached_tracer(&mut target);
    drop(target);
    assert!(tracer.into_output().status.success());
    assert_all_gone();
}

#[test]
fn nothing_remains_after_a_duration() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target = Target::leaky();
    let (code, stderr) = common::run_psleak(&["trace", "--pid", &target.pid().to_string(), "--duration", "0.5"]);
    assert_eq!(code, 0, "{stderr}");
    assert_all_gone();
}
