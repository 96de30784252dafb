//! `psleak probes`: where the tracer's uprobes would go in a process, and whether the kernel
//! emulates the instruction each sits on. Nothing is attached.

#![cfg(target_os = "linux")]

mod common;

use common::Target;
use serde_json::Value;

#[test]
fn each_probed_function_is_shown_with_the_instruction_its_probe_sits_on() {
    let target = Target::leaky();
    let out = common::psleak().args(["probes", "--json", "--pid", &target.pid().to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let probes: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let of = |function: &str| {
        probes.iter().find(|p| p["function"] == function).unwrap_or_else(|| panic!("no {function} in {probes:?}"))
    };
    // glibc's malloc starts with a push; its free with a NULL check the probe passes; its
    // reallocarray multiplies into an argument's register first.
    assert_eq!((of("malloc")["offset"].as_u64(), of("malloc")["instruction"].as_str()), (Some(0), Some("push")));
    assert!(of("free")["offset"].as_u64() > Some(0) && of("free")["emulated"] == true, "{probes:?}");
    assert_eq!(of("reallocarray")["emulated"], false);
    assert!(of("malloc")["binary"].as_str().unwrap().contains("libc.so"));
    assert!(probes.iter().all(|p| !p["function"].as_str().unwrap().starts_with("Py")), "a C target has no CPython");
}
