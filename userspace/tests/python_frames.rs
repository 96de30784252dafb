//! The Python line behind a leak (issue 16): every creation carries the Python stack of the
//! thread that made it, read by the probes from the interpreter, on each CPython of this
//! machine kind; two Python callers of one C function are two sites.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{line_of_file, repo_root, this_machines_pythons, Target, Tracer};
use serde_json::Value;

#[test]
fn a_leak_through_ctypes_is_named_by_its_python_line_and_each_caller_is_its_own_site() {
    let script = repo_root().join("tests/targets/python_calls.py");
    let (first, second) = (line_of_file(&script, "FIRST_LINE"), line_of_file(&script, "SECOND_LINE"));
    let long = line_of_file(&script, "LONG_LINE");
    for python in this_machines_pythons() {
        let mut target = Target::start(Command::new(&python).arg(&script));
        let tracer = Tracer::attach(target.pid(), &[]);
        target.run("first 20");
        target.run("second 10");
        target.run("a_function_with_a_long_name 5");
        let report = tracer.finish();
        let leak = |count: u64| -> &Value {
            let suspects = report["suspects"].as_array().unwrap();
            let found = suspects.iter().find(|s| s["count"] == count && s["bytes"] == count * 3000);
            found.unwrap_or_else(|| panic!("{}: no site of {count} blocks: {report:#}", python.display()))
        };
        // (A name longer than the 16 bytes of it the frame's stamp holds is named as well.)
        for (count, function, line) in
            [(20, "first", first), (10, "second", second), (5, "a_function_with_a_long_name", long)]
        {
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

#[test]
fn a_frame_whose_code_was_freed_before_it_was_read_is_never_named_after_its_successor() {
    // psleak reads a frame's code object when it drains the event, milliseconds later; by then
    // the function may be gone and another's code, name and file at the same addresses. Such a
    // frame is left out; before, it was named after the function that came to live there.
    let script = repo_root().join("tests/targets/python_calls.py");
    let call = line_of_file(&script, "GENERATED_LINE");
    for python in this_machines_pythons() {
        let mut target = Target::start(Command::new(&python).arg(&script));
        let tracer = Tracer::attach(target.pid(), &["--top", "1000", "--min-size", "3000", "--max-size", "3049"]);
        target.run("generated 50");
        let report = tracer.finish();
        let mut blocks = 0;
        for site in report["suspects"].as_array().unwrap() {
            let frames = site["python"].as_array().unwrap();
            if !frames.iter().any(|f| f["function"] == "generated" && f["line"] == call) {
                continue;
            }
            blocks += site["count"].as_u64().unwrap();
            let made = |f: &&Value| f["function"] != "generated" && f["function"].as_str().unwrap().starts_with("gen");
            let Some(gen) = frames.iter().find(made) else { continue };
            // gen_3.method (3.11+: a qualname), gen_4, generated_function_number_5
            let name = gen["function"].as_str().unwrap();
            let (made, _) = name.split_once('.').unwrap_or((name, ""));
            let i: u64 = made.rsplit('_').next().unwrap().parse().unwrap();
            let size = site["bytes"].as_u64().unwrap() / site["count"].as_u64().unwrap();
            let shown = python.display();
            assert_eq!(size, 3000 + i, "{shown}: a block of function {} named {name}: {site:#}", size - 3000);
            assert_eq!(gen["file"], format!("{made}.py"), "{shown}: {site:#}");
        }
        assert_eq!(blocks, 50, "{}: every block, named or not: {report:#}", python.display());
    }
}

/// The extension `name` built from `source` (in the repository) for `python` with `compiler`
/// and `flags`, against the interpreter's own headers: the directory it is in and the module's
/// file name.
fn extension(python: &Path, source: &str, name: &str, compiler: &str, flags: &[&str]) -> (PathBuf, String) {
    let asked = Command::new(python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['include']); print(sysconfig.get_config_var('EXT_SUFFIX'))",
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8(asked.stdout).unwrap();
    let (include, suffix) = answer.trim().split_once('\n').unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}{suffix}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("{name}{suffix}");
    let source = repo_root().join(source);
    let built = Command::new(compiler)
        .args(flags)
        .args(["-fPIC", "-shared", "-pthread", "-I", include, "-o"])
        .arg(dir.join(&file))
        .arg(&source)
        .status()
        .unwrap();
    assert!(built.success(), "building {} for {}", source.display(), python.display());
    (dir, file)
}

/// tests/python/ext/stripped_ext.cpp built as wheels are built (`-O2 -fomit-frame-pointer`, no
/// debug info) and stripped (`strip -s`).
fn stripped_ext(python: &Path) -> (PathBuf, String) {
    let (dir, file) =
        extension(python, "tests/python/ext/stripped_ext.cpp", "stripped_ext", "g++", &["-O2", "-fomit-frame-pointer"]);
    assert!(Command::new("strip").arg("-s").arg(dir.join(&file)).status().unwrap().success());
    (dir, file)
}

#[test]
fn a_stripped_extension_without_frame_pointers_is_unwound_to_the_python_line() {
    // Pillow's and numpy's wheels as a user has them: no symbols, no frame pointers. Each leak
    // is two static helpers deep; the module's CFI leads back through them to Python.
    let script = repo_root().join("tests/targets/stripped_calls.py");
    let line = |marker: &str| line_of_file(&script, marker);
    for python in this_machines_pythons() {
        let (dir, module) = stripped_ext(&python);
        let mut target = Target::start(Command::new(&python).arg(&script).arg(&dir));
        let tracer = Tracer::attach(target.pid(), &[]);
        target.run("blocks 30");
        target.run("fds 3");
        target.run("threads 2");
        let report = tracer.finish();
        let of_module = |entry: &Value| -> usize {
            let frames = entry["stack"].as_array().unwrap();
            let ours = frames.iter().filter(|f| f["module"].as_str().is_some_and(|m| m.ends_with(&module)));
            ours.inspect(|f| {
                assert!(f["function"].is_null(), "a stripped module names no function: {f}");
                let text = f["text"].as_str().unwrap();
                assert!(text.starts_with(&format!("{module}+0x")), "module+offset: {text}");
            })
            .count()
        };
        let context = format!("{}: {report:#}", python.display());
        let blocks = report["suspects"].as_array().unwrap().iter().find(|s| s["count"] == 30 && s["bytes"] == 120_000);
        let blocks = blocks.unwrap_or_else(|| panic!("no site of the 30 blocks: {context}"));
        // grab and stash, and leak_blocks that called them.
        assert!(of_module(blocks) >= 3, "the extension's frames: {context}");
        assert!(blocks["site"]["module"].as_str().unwrap().ends_with(&module), "blamed: the extension: {context}");
        let users = |entry: &Value, function: &str, marker: &str| {
            assert_eq!(entry["called_from"]["function"], function, "{context}");
            assert_eq!(entry["called_from"]["line"], line(marker), "{context}");
            let text = entry["site_text"].as_str().unwrap();
            assert!(
                text.starts_with(&format!("{function} (stripped_calls.py:{}) → {module}+0x", line(marker))),
                "{text}"
            );
        };
        users(blocks, "blocks", "BLOCKS_LINE");
        let fds: Vec<&Value> = report["fds"].as_array().unwrap().iter().filter(|f| of_module(f) > 0).collect();
        assert_eq!(fds.len(), 3, "the constructor's fds: {context}");
        for fd in fds {
            users(fd, "fds", "FDS_LINE");
        }
        let threads: Vec<&Value> = report["threads"].as_array().unwrap().iter().filter(|t| of_module(t) > 0).collect();
        assert_eq!(threads.len(), 2, "the extension's threads: {context}");
        for thread in threads {
            users(thread, "threads", "THREADS_LINE");
        }
    }
}

/// Calls leaky_ext's functions, imported from the directory in argv[1]: `NAME N` calls NAME N times.
const LEAKY_CALLS: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import leaky_ext
print("ready", flush=True)
for command in sys.stdin:
    name, _, count = command.partition(" ")
    for _ in range(int(count)):
        getattr(leaky_ext, name)()
    print("ok", flush=True)
"#;

#[test]
fn a_forgotten_decref_is_blamed_on_the_extension_on_every_cpython() {
    // 3.12 and 3.13 make a dict and a list through more allocator layers (_PyObject_GC_New,
    // _PyDict_FromItems...) than 3.11: the blamed frame must still be the extension's.
    for python in this_machines_pythons() {
        let (dir, _) = extension(&python, "tests/python/ext/leaky_ext.c", "leaky_ext", "gcc", &["-O2", "-g"]);
        let mut command = Command::new(&python);
        command.arg("-c").arg(LEAKY_CALLS).arg(&dir);
        if python.starts_with("/usr/bin") {
            // Debian's CPython is built with LTO: its object allocator is inlined out of the
            // probes' reach (README), malloc is not.
            command.env("PYTHONMALLOC", "malloc");
        }
        let mut target = Target::start(&mut command);
        let tracer = Tracer::attach(target.pid(), &[]);
        let functions = ["forget_decref_list", "forget_decref_tuple", "forget_decref_dict"];
        for function in functions {
            // More than the free lists hold (80 lists or dicts, 2000 pairs): most are new blocks.
            target.run(&format!("{function} 3000"));
        }
        let report = tracer.finish();
        for function in functions {
            let blocks: u64 = common::suspects_at(&report, function).iter().filter_map(|s| s["count"].as_u64()).sum();
            assert!(blocks >= 1000, "{}: {function} blamed for {blocks} blocks: {report:#}", python.display());
        }
    }
}
