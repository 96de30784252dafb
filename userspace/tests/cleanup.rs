//! Nothing of psleak stays in the kernel after it ends, however it ends: checked with bpftool.
//! The tests of this file take turns, since each counts every psleak program in the kernel.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::sync::Mutex;

use common::{assert_no_probes_remain, psleak_programs_loaded, Target, Tracer, PROGRAMS};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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
    assert_no_probes_remain();
}

#[test]
fn nothing_remains_after_sigterm_or_sigkill() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut target = Target::leaky();
        let tracer = attached_tracer(&mut target);
        tracer.signal(signal);
        let _ = tracer.into_output();
        assert_no_probes_remain();
    }
}

#[test]
fn nothing_remains_after_the_target_exits() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut target = Target::leaky();
    let tracer = attached_tracer(&mut target);
    drop(target);
    assert!(tracer.into_output().status.success());
    assert_no_probes_remain();
}

#[test]
fn nothing_remains_after_a_duration() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target = Target::leaky();
    let (code, stderr) = common::run_psleak(&["trace", "--pid", &target.pid().to_string(), "--duration", "0.5"]);
    assert_eq!(code, 0, "{stderr}");
    assert_no_probes_remain();
}
