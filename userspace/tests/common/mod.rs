//! Real targets and a real tracer for the integration tests: C programs built here with gcc,
//! Python, and the `psleak` binary attached to them with its probes loaded into this kernel.
#![allow(dead_code)] // each test binary uses its own part of this module

pub mod daemon;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds `tests/targets/NAME.c` once per test binary; `static_link` for a binary without a shared libc.
pub fn build_target(name: &str, static_link: bool) -> PathBuf {
    if static_link {
        build_variant(name, &format!("{name}-static"), &["-O0", "-g", "-fno-omit-frame-pointer", "-static"])
    } else {
        build_variant(name, name, &["-O0", "-g", "-fno-omit-frame-pointer"])
    }
}

/// Builds `tests/targets/NAME.c` with the compiler `flags` into `out` under the tests' tmpdir.
pub fn build_variant(name: &str, out: &str, flags: &[&str]) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(out);
    let source = repo_root().join("tests/targets").join(format!("{name}.c"));
    let status = Command::new("gcc").args(flags).arg("-pthread").arg("-o").arg(&out).arg(&source).status();
    assert!(status.expect("gcc runs").success(), "building {} failed", source.display());
    out
}

/// `tests/targets/loads_late.c` built as its program and as the library it is given.
pub fn loads_late() -> (PathBuf, PathBuf) {
    let flags = ["-O0", "-g", "-fno-omit-frame-pointer", "-DLIBRARY", "-shared", "-fPIC"];
    let library = build_variant("loads_late", "libloads_late.so", &flags);
    (build_target("loads_late", false), library)
}

/// The leak of `loads_late`'s library in a report of it: named by its function and line, with
/// the program's call under it, although the command had exited when the report was made.
pub fn assert_the_late_library_is_named(report: &Value) {
    let suspects = report["suspects"].as_array().unwrap();
    let leak = suspects.iter().find(|s| s["count"] == 5 && s["bytes"] == 15000);
    let leak = leak.unwrap_or_else(|| panic!("the library's 5 blocks: {report:#}"));
    let (function, line) = (&leak["site"]["function"], &leak["site"]["line"]);
    assert_eq!((function, line), (&"leak_late".into(), &line_of("loads_late", "LEAK_LINE").into()), "{leak:#}");
    let caller = leak["stack"].as_array().unwrap().iter().find(|f| f["function"] == "load_and_leak");
    assert_eq!(caller.map(|f| &f["line"]), Some(&line_of("loads_late", "CALL_LINE").into()), "{leak:#}");
}

/// The line of `tests/targets/NAME.c` that holds `marker`.
pub fn line_of(name: &str, marker: &str) -> u64 {
    line_of_file(&repo_root().join("tests/targets").join(format!("{name}.c")), marker)
}

/// The line of `source` that holds `marker`.
pub fn line_of_file(source: &Path, marker: &str) -> u64 {
    let source = std::fs::read_to_string(source).unwrap();
    source.lines().position(|l| l.contains(marker)).expect("the marker is in the source") as u64 + 1
}

pub fn leaky() -> &'static Path {
    static LEAKY: OnceLock<PathBuf> = OnceLock::new();
    LEAKY.get_or_init(|| build_target("leaky", false))
}

/// This machine kind's CPythons: Debian's (LTO, its allocator API in the executable) and
/// pyenv's 3.9-3.13 (in libpython, whose Free functions only jump on to the allocator's).
pub fn this_machines_pythons() -> Vec<PathBuf> {
    let pyenv = std::env::var_os("PYENV_ROOT").map_or_else(|| "/root/.pyenv".into(), PathBuf::from);
    let mut found = vec![PathBuf::from("/usr/bin/python3.11")];
    for minor in 9..=13 {
        let versions = std::fs::read_dir(pyenv.join("versions")).into_iter().flatten().flatten();
        let mut of_minor: Vec<_> = versions
            .map(|v| v.path().join(format!("bin/python3.{minor}")))
            .filter(|p| p.exists() && p.to_string_lossy().contains(&format!("/3.{minor}.")))
            .collect();
        of_minor.sort();
        found.extend(of_minor.pop());
    }
    assert_eq!(found.len(), 6, "Debian's python3.11 and pyenv's 3.9-3.13 are on this machine kind: {found:?}");
    found
}

/// A process driven line by line on stdin, answering each command on stdout.
pub struct Target {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    pub fn start(command: &mut Command) -> Self {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("target starts");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "target said {line:?}");
        Self { child, stdin, stdout }
    }

    pub fn leaky() -> Self {
        Self::start(&mut Command::new(leaky()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has the target exec `program` (another leaky, say), which keeps its stdin and stdout;
    /// returns once the new program is ready.
    pub fn exec(&mut self, program: &Path) {
        writeln!(self.stdin, "exec {}", program.display()).unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "after exec the target said {line:?}");
    }

    /// Sends a command and waits until the target has carried it out.
    pub fn run(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "target answered {line:?} to {command:?}");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The psleak under test: this build's, or the binary `PSLEAK_TEST_BINARY` names (to show that
/// a test fails against a build from before its fix).
pub fn psleak() -> Command {
    Command::new(std::env::var_os("PSLEAK_TEST_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_psleak").into()))
}

/// Starts psleak with its stderr piped and waits for its first line, which must contain
/// `expected` (it is running); the rest of stderr is left to the caller.
pub fn start_psleak(command: &mut Command, expected: &str) -> (Child, BufReader<ChildStderr>) {
    let mut child = command.stderr(Stdio::piped()).spawn().expect("psleak starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains(expected), "psleak did not start: {line:?}");
    (child, stderr)
}

/// `psleak trace --json` attached to a process, reporting only when stopped.
pub struct Tracer {
    child: Option<Child>,
    reports: Option<BufReader<ChildStdout>>,
}

impl Tracer {
    /// A tracer started by the caller (psleak wrapped in another command), its stdout piped.
    pub fn from_child(mut child: Child) -> Self {
        let reports = child.stdout.take().map(BufReader::new);
        Self { child: Some(child), reports }
    }

    pub fn attach(pid: u32, extra: &[&str]) -> Self {
        let (mut child, _) = start_psleak(
            psleak()
                .args(["trace", "--json", "--pid", &pid.to_string()])
                .args(if extra.contains(&"--interval") { &[][..] } else { &["--interval", "3600"][..] })
                .args(extra)
                .stdout(Stdio::piped()),
            "tracing pid",
        );
        let reports = child.stdout.take().map(BufReader::new);
        Self { child: Some(child), reports }
    }

    /// Waits for the next report (psleak's `--interval`).
    pub fn next_report(&mut self) -> Value {
        let mut line = String::new();
        self.reports.as_mut().unwrap().read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the tracer to end by itself; `stdout` holds the reports not read yet.
    pub fn into_output(mut self) -> std::process::Output {
        let mut child = self.child.take().unwrap();
        child.stdout = self.reports.take().map(BufReader::into_inner);
        child.wait_with_output().unwrap()
    }

    /// Sends a signal to the tracer.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Stops the tracer with SIGINT and returns its last report.
    pub fn finish(self) -> Value {
        self.signal(libc::SIGINT);
        let output = self.into_output();
        assert!(output.status.success(), "psleak exited with {}", output.status);
        let stdout = String::from_utf8(output.stdout).unwrap();
        let last = stdout.lines().last().expect("a final report");
        let report: Value = serde_json::from_str(last).expect("the report is JSON");
        assert_eq!(report["final"], true);
        assert_eq!(report["lost"]["ring_full"], 0, "no event may be lost: {report}");
        assert_eq!(report["lost"]["corrupt"], 0);
        report
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The memory suspects whose site is the function `name`.
pub fn suspects_at<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["suspects"].as_array().unwrap().iter().filter(|s| s["site"]["function"] == name).collect()
}

/// The function names along a reported stack (of a suspect, fd or thread).
pub fn stack_functions(entry: &Value) -> Vec<&str> {
    entry["stack"].as_array().unwrap().iter().filter_map(|f| f["function"].as_str()).collect()
}

/// Runs psleak to completion and returns (exit code, stderr).
pub fn run_psleak(args: &[&str]) -> (i32, String) {
    let output = psleak().args(args).output().expect("psleak runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A child process killed when this goes out of scope, however the test ends.
pub struct Killed(pub Child);

impl Killed {
    /// The child, no longer killed when this goes.
    pub fn into_inner(self) -> Child {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the child is moved out exactly once.
        unsafe { std::ptr::read(&this.0) }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// The names of psleak's BPF programs (as the kernel keeps them, 15 characters at most).
pub const PROGRAMS: [&str; 7] =
    ["alloc_enter", "alloc_exit", "free_enter", "syscall_exit", "thread_start", "thread_exit", "target_exec"];

/// How many of psleak's programs the kernel holds, by bpftool: tests that count them take turns.
pub fn psleak_programs_loaded() -> usize {
    let output = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs (cargo xtask setup installs it)");
    assert!(output.status.success(), "bpftool: {}", String::from_utf8_lossy(&output.stderr));
    let programs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    programs.as_array().unwrap().iter().filter(|p| PROGRAMS.iter().any(|name| p["name"] == *name)).count()
}

pub fn assert_no_probes_remain() {
    let gone = wait_until(Duration::from_secs(5), || psleak_programs_loaded() == 0);
    assert!(gone, "{} psleak programs are still loaded", psleak_programs_loaded());
}
