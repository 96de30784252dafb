//! The Python line behind a leak (issue 16): every creation carries the Python stack of the
//! thread that made it, read by the probes from the interpreter, on each CPython of this
//! machine kind; two Python callers of one C function are two sites.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::process::Command;

use common::{line_of_file, repo_root, this_machines_pythons, Target, Tracer};
use serde_json::Value;

#[test]
fn a_leak_through_ctypes_is_named_by_its_python_line_and_each_caller_is_its_own_site() {
    let script = repo_root().join("tests/targets/python_calls.py");
    let (first, second) = (line_of_file(&script, "FIRST_LINE"), line_of_file(&script, "SECOND_LINE"));
    for python in this_machines_pythons() {
        let mut target = Target::start(Command::new(&python).arg(&script));
        let tracer = Tracer::attach(target.pid(), &[]);
        target.run("first 20");
        target.run("second 10");
        let report = tracer.finish();
        let leak = |count: u64| -> &Value {
            let suspects = report["suspects"].as_array().unwrap();
            let found = suspects.iter().find(|s| s["count"] == count && s["bytes"] == count * 3000);
            found.unwrap_or_else(|| panic!("{}: no site of {count} blocks: {report:#}", python.display()))
        };
        for (count, function, line) in [(20, "first", first), (10, "second", second)] {
            let site = leak(count);
            let called_from = &site["called_from"];
            assert_eq!(called_from["function"], function, "{}: {site:#}", python.display());
            assert_eq!(called_from["line"], line, "{}: {site:#}", python.display());
            assert!(called_from["file"].as_str().unwrap().ends_with("python_calls.py"), "{site:#}");
            let text = site["site_text"].as_str().unwrap();
            assert!(
                text.starts_with(&format!("{function} (python_calls.py:{line}) → ")),
                "the user's line leads: {text}"
            );
            // The whole Python stack goes on to the module's code, which called the function.
            let outer = site["python"].as_array().unwrap().iter().any(|f| f["function"] == "<module>");
            assert!(outer, "{}: {site:#}", python.display());
        }
    }
}
