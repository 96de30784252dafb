//! `psleak probes`: where the tracer's uprobes would go in a process, and whether the kernel
//! emulates the instruction each sits on. Nothing is attached.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use common::Target;
use serde_json::Value;

#[test]
fn each_probed_function_is_shown_with_the_instruction_its_probe_sits_on() {
    let target = Target::leaky();
    let probes = probes_of(target.pid());
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

/// `psleak probes --json --pid` of a process, a line of JSON per probe.
fn probes_of(pid: u32) -> Vec<Value> {
    let out = common::psleak().args(["probes", "--json", "--pid", &pid.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

#[test]
fn every_cpython_free_is_probed_on_an_instruction_the_kernel_emulates() {
    for python in common::this_machines_pythons() {
        for allocator in [None, Some("malloc"), Some("debug")] {
            let mut command = std::process::Command::new(&python);
            command.args(["-c", "print('ready', flush=True); input()"]).env_remove("PYTHONMALLOC");
            if let Some(allocator) = allocator {
                command.env("PYTHONMALLOC", allocator);
            }
            let target = Target::start(&mut command);
            let probes = probes_of(target.pid());
            let what = format!("{} with PYTHONMALLOC={allocator:?}", python.display());
            let frees: Vec<&Value> =
                probes.iter().filter(|p| p["function"].as_str().unwrap().ends_with("Free")).collect();
            assert!(!frees.is_empty(), "{what}: {probes:?}");
            for free in frees {
                assert_eq!(free["emulated"], true, "{what}: {free}");
                // pyenv's are probed in the allocator's free they jump to; Debian's in themselves.
                let pyenv = !python.starts_with("/usr/bin");
                assert_eq!(free["within"].is_string(), pyenv, "{what}: {free}");
            }
        }
    }
}

#[test]
fn a_forged_allocator_table_moves_the_free_probe_only_to_a_function_of_the_same_binary() {
    let mut target = Target::start(&mut std::process::Command::new(common::build_target("python_forged", false)));
    let free_of = |pid| {
        let probes = probes_of(pid);
        probes.into_iter().find(|p| p["function"] == "PyObject_Free").unwrap_or_else(|| panic!("no PyObject_Free"))
    };
    let followed = free_of(target.pid());
    assert_eq!((followed["within"].as_str(), followed["emulated"].as_bool()), (Some("own_free"), Some(true)));
    for (table, what) in [
        ("point middle", "into the middle of a function"),
        ("point libc", "to another binary's function"),
        ("point nowhere", "to nothing mapped"),
    ] {
        target.run(table);
        let free = free_of(target.pid());
        // Not followed: the probe stays on PyObject_Free's own first instruction.
        assert_eq!(
            (free["within"].is_null(), free["offset"].as_u64()),
            (true, Some(0)),
            "a table pointing {what}: {free}"
        );
        assert_eq!(free["emulated"], false, "{free}");
    }
    target.run("point entry");
    assert_eq!(free_of(target.pid())["within"], "own_free");
}
