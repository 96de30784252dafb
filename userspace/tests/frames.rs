//! Frames a user can act on (issue 16): an inlined function named as itself, and where a module
//! has no symbols, `module+0xOFFSET` with its build-id, an offset that `addr2line -e` on the
//! unstripped build turns back into the function and line.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::process::Command;

use common::{build_variant, line_of, stack_functions, Target, Tracer};

#[test]
fn a_leak_in_an_inlined_function_is_named_as_that_function_with_its_line() {
    let program = build_variant("inlined", "inlined-O1", &["-O1", "-g"]);
    let mut target = Target::start(&mut Command::new(&program));
    let tracer = Tracer::attach(target.pid(), &[]);
    target.run("sessions 20");
    let report = tracer.finish();
    let suspect = &report["suspects"][0];
    let site = &suspect["site"];
    assert_eq!(site["function"], "remember_session", "{suspect:#}");
    assert_eq!(site["line"], line_of("inlined", "REMEMBER_SESSION_LINE"), "{suspect:#}");
    assert_eq!(suspect["count"], 20);
    // Then the function it was inlined into, at the same call, as `addr2line -i` lists them.
    let functions = stack_functions(suspect);
    assert_eq!(&functions[..2], ["remember_session", "open_sessions"], "{suspect:#}");
    assert_eq!(suspect["stack"][0]["addr"], suspect["stack"][1]["addr"], "one call, two frames");
}

#[test]
fn a_stripped_module_s_frames_are_its_offsets_that_addr2line_names_on_the_unstripped_build() {
    let flags = ["-O2", "-g", "-fomit-frame-pointer"];
    let unstripped = build_variant("leaky", "leaky-O2", &flags);
    let stripped = build_variant("leaky", "leaky-O2-stripped", &flags);
    assert!(Command::new("strip").arg("-s").arg(&stripped).status().unwrap().success());
    let mut target = Target::start(&mut Command::new(&stripped));
    let tracer = Tracer::attach(target.pid(), &[]);
    target.run("malloc 30 100");
    let report = tracer.finish();

    let suspect = report["suspects"].as_array().unwrap().iter().find(|s| s["count"] == 30).expect("the leak");
    let site = &suspect["site"];
    assert_eq!(site["function"], serde_json::Value::Null, "no symbols: {site:#}");
    let offset = site["offset"].as_str().unwrap();
    assert_eq!(suspect["site_text"], format!("leaky-O2-stripped+{offset}"), "{suspect:#}");
    let build_id = site["build_id"].as_str().unwrap();
    let notes = Command::new("readelf").arg("-n").arg(&unstripped).output().unwrap();
    assert!(String::from_utf8_lossy(&notes.stdout).contains(build_id), "strip keeps the build-id: {build_id}");

    let named = Command::new("addr2line").args(["-f", "-e"]).arg(&unstripped).arg(offset).output().unwrap();
    let named = String::from_utf8_lossy(&named.stdout);
    assert_eq!(named.lines().next(), Some("leak_malloc"), "addr2line on the offset: {named}");
}
