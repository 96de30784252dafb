//! psleak's development tasks. Each installs what it needs first (`setup`), so that on a
//! fresh Debian machine one command does the whole job.
//!
//!   cargo xtask setup   install the system packages the build and the tests need
//!   cargo xtask demo    trace a real leaking C process and show the leaking functions
//!   cargo xtask test    the whole test suite: Rust, then Python (package built by maturin),
//!                       also as an unprivileged user through `psleak daemon`
//!   cargo xtask bench   psleak against psleak 0.1.6 and pytest-memray: bench/RESULTS.md
//!   cargo xtask bench-cost  what tracing costs the code around a leak test: its section of
//!                       bench/RESULTS.md
//!   cargo xtask soak    the daemon under 10,000 sessions and ten minutes of hostile clients
//!   cargo xtask check-targets   type-check the Windows, macOS and FreeBSD code (also in `test`)
//!   cargo xtask wine    run the Windows build under Wine (also in `test`)
//!   cargo xtask typecheck   mypy and pyright on a user's tests and mistakes (also in `test`)
//!   cargo xtask wheel   the sdist and the manylinux wheel built from it, checked (also in `test`)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

mod bench;
mod cost;
mod pythons;
mod soak;
mod targets;
mod typecheck;
mod unprivileged;
mod wheel;
mod wine;

/// Debian packages: what the build needs (clang for the BPF C, libelf/zlib/pkg-config/make for
/// the bundled libbpf; autotools, gettext, flex and bison for the wheel's libelf, built from
/// elfutils' sources by libbpf-sys), and what the tests use (gcc for the C targets, g++ for the C++ extension
/// built as wheels are, bpftool to check that no
/// probe remains, setpriv to run unprivileged, python3 as a traced interpreter, and with its
/// headers and venv for the tests an unprivileged user runs through the daemon; mingw-w64 gcc,
/// wine64 to build and run the Windows build).
const PACKAGES: &[&str] = &[
    "clang",
    "libelf-dev",
    "zlib1g-dev",
    "pkg-config",
    "make",
    "autoconf",
    "automake",
    "autopoint",
    "libtool",
    "gettext",
    "flex",
    "bison",
    "gawk",
    "gcc",
    "g++",
    "libc6-dev",
    "bpftool",
    "util-linux",
    "python3",
    "python3-dev",
    "python3-venv",
    "gcc-mingw-w64-x86-64-win32",
    "wine",
    "wine64",
];

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "setup" => setup(),
        "demo" => setup().and_then(|()| demo()),
        "test" => setup().and_then(|()| test()),
        "bench" => setup().and_then(|()| bench::bench()),
        "bench-cost" => setup().and_then(|()| cost::bench_cost()),
        "soak" => setup().and_then(|()| soak::soak()),
        "check-targets" => targets::check(),
        "typecheck" => match checked(typecheck::checks()) {
            0 => Ok(()),
            n => Err(format!("{n} type checks failed")),
        },
        "wheel" => setup().and_then(|()| wheel_task()),
        "wine" => setup().and_then(|()| wine::smoke()).and_then(|(_, failed)| match failed {
            0 => Ok(()),
            n => Err(format!("{n} checks failed")),
        }),
        _ => Err("usage: cargo xtask setup|demo|test|bench|bench-cost|soak|check-targets|typecheck|wine|wheel".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The tests run this checkout's programs as other users (a daemon's clients, `nobody`): every
/// directory above it must let them through. One that does not (a clone in `mktemp -d`'s
/// private directory) is given o+x, said in a line; nothing else changes.
fn let_other_users_through() -> Result {
    use std::os::unix::fs::PermissionsExt;
    for dir in root().ancestors() {
        let mode = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?.permissions().mode();
        if mode & 0o001 == 0 {
            let through = std::fs::Permissions::from_mode(mode | 0o001);
            std::fs::set_permissions(dir, through).map_err(|e| format!("{}: {e}", dir.display()))?;
            println!(
                "xtask: {} now lets other users through (o+x): the tests run programs of it as them",
                dir.display()
            );
        }
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// A section of bench/RESULTS.md that one task writes between its two markers, and that the
/// others keep when they rewrite the rest.
pub struct Section {
    pub start: &'static str,
    pub end: &'static str,
}

impl Section {
    /// Puts `section` (with its markers) into `results`, in place of the one there if any.
    pub fn write(&self, results: &Path, section: &str) -> Result {
        let text = std::fs::read_to_string(results).unwrap_or_default();
        let text = match (text.find(self.start), text.find(self.end)) {
            (Some(start), Some(end)) if start < end => {
                format!("{}{section}{}", &text[..start], &text[end + self.end.len()..].trim_start_matches('\n'))
            }
            _ => format!("{}\n{section}", text.trim_end()),
        };
        std::fs::write(results, text).map_err(|e| e.to_string())
    }

    /// The section in `results`, to be kept when the rest is rewritten.
    pub fn kept(&self, results: &Path) -> Option<String> {
        let text = std::fs::read_to_string(results).ok()?;
        let (start, end) = (text.find(self.start)?, text.find(self.end)?);
        (start < end).then(|| text[start..end + self.end.len()].to_string() + "\n")
    }
}

fn run(command: &mut Command) -> Result {
    let status = command.status().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
}

fn output(command: &mut Command) -> Result<String> {
    let out = command.output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
}

/// Installs the missing Debian packages; does nothing when all are there.
fn setup() -> Result {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        println!("xtask: system packages present ({})", PACKAGES.join(", "));
    } else {
        if !is_root() {
            return Err(format!("missing packages {}: run as root, or `sudo apt-get install {0}`", missing.join(" ")));
        }
        println!("xtask: installing {} from Debian", missing.join(", "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("xtask: warning: this kernel has no /sys/kernel/btf/vmlinux; psleak will need --btf");
    }
    Ok(())
}

fn test() -> Result {
    let_other_users_through()?;
    println!("xtask: running the whole test suite (real probes, real leaking processes)");
    let mut cargo = Command::new("cargo")
        .args(["test", "--workspace", "--locked"])
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(cargo.stdout.take().expect("stdout is piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some((p, f)) = result_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = cargo.wait().map_err(|e| e.to_string())?;
    let python = python_tests();
    let packaging = wheel::wheel().map(|w| wheel::checks(&w, &root().join("target/venv")));
    let packaging_checks = packaging.as_ref().map_or(1, |checks| checks.len() as u64);
    let packaging_failed = packaging.map_or(1, checked);
    let other_targets = targets::check();
    let under_wine = wine::smoke();
    let lints = lints();
    let (py_passed, py_failed) = python.as_ref().map_or((0, 1), |r| (r.passed, r.failed));
    let (wine_passed, wine_failed) = under_wine.as_ref().map_or((0, 1), |&counts| counts);
    let lint_failed = lints.iter().filter(|(_, result)| result.is_err()).count() as u64;
    // One closing line for the whole suite: cargo's own last line is the last test binary's.
    println!(
        "tests: {} passed, {} failed",
        passed + py_passed + wine_passed + lints.len() as u64 - lint_failed + packaging_checks - packaging_failed,
        failed + py_failed + wine_failed + lint_failed + packaging_failed
    );
    if let Err(err) = &python {
        eprintln!("xtask: the Python tests could not run: {err}");
    }
    if !status.success() {
        return Err(format!("cargo test failed ({status})"));
    }
    other_targets?;
    if packaging_failed > 0 {
        return Err(format!("{packaging_failed} checks of the wheel failed"));
    }
    for (lint, result) in lints {
        result.map_err(|err| format!("{lint} failed: {err}"))?;
    }
    match under_wine {
        Ok((_, 0)) => {}
        Ok((_, failed)) => return Err(format!("{failed} checks of the Windows build under Wine failed")),
        Err(err) => return Err(format!("the Windows build could not run under Wine: {err}")),
    }
    match python {
        Ok(r) if r.failed == 0 => Ok(()),
        Ok(r) => Err(format!("{} Python tests failed", r.failed)),
        Err(err) => Err(err),
    }
}

/// The lints the suite keeps, each counted as one test: clippy on every target of the workspace
/// (the other platforms' code in `targets::check`), ruff's lints and format on the Python
/// (config: ruff.toml), and the package's types under mypy and pyright (`typecheck`).
fn lints() -> Vec<(&'static str, Result)> {
    let clippy = ["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"];
    let ruff = root().join("target/venv/bin/ruff");
    let python_code = ["python", "tests/python", "tests/typing", "bench"];
    let ruff_run = |args: &[&str]| run(Command::new(&ruff).args(args).args(python_code).current_dir(root()));
    let mut lints = vec![
        ("cargo clippy -D warnings", run(Command::new("cargo").args(clippy).current_dir(root()))),
        ("ruff check", ruff_run(&["check"])),
        ("ruff format --check", ruff_run(&["format", "--check"])),
    ];
    lints.extend(typecheck::checks());
    lints
}

/// PyPI packages of the Python test runs and lints (auditwheel for the wheel's checks, mypy and
/// pyright for `typecheck`); psutil only because psleak 0.1.6's own test files, run unchanged
/// against our package, import it.
const PYTHON_TEST_DEPS: &[&str] = &[
    "maturin==1.16.0",
    "auditwheel==6.8.2",
    PYTEST,
    "pytest-instafail",
    "pytest-xdist==3.8.0",
    "jsonschema==4.25.1",
    "psutil",
    "setuptools",
    "ruff==0.17.5",
    "mypy==2.4.1",
    "pyright[nodejs]==1.1.414",
];

/// The pytest of every Python run, ours and the benchmark's.
const PYTEST: &str = "pytest==9.2.0";

/// psleak 0.1.6's tests that poke at psutil itself (`psleak.psutil.heap_info`), which this
/// package does not use; everything else of theirs runs unchanged.
const UPSTREAM_PSUTIL_TESTS: &[&str] = &[
    "tests/test_interface.py::TestEmitWarnings::test_no_heap_info",
    "tests/test_interface.py::TestEmitWarnings::test_heap_used_zero",
];

/// Expects a skip without PYTHONMALLOC=malloc: true of the polling backend only, the tracer
/// sees Python's own allocator.
const UPSTREAM_POLL_ONLY_TEST: &str = "tests/test_interface.py::TestMisc::test_pythonmalloc_not_set";

#[derive(Default)]
struct PytestCounts {
    passed: u64,
    failed: u64,
}

/// Builds the package with maturin into a virtualenv under target/, then runs our Python tests
/// and psleak 0.1.6's under each backend, with and without PYTHONMALLOC=malloc.
fn python_tests() -> Result<PytestCounts> {
    let target = root().join("target");
    let python = python_with_psleak()?;
    let upstream = upstream_tests(&python, &target)?;

    let ours = root().join("tests/python");
    let malloc = Some("malloc");
    let trace_report = target.join("psleak-trace.json");
    let poll_report = target.join("psleak-poll.json");
    let twin_rounds = ("PSLEAK_TWIN_ROUNDS", "20");
    let report_arg = |path: &Path| format!("--psleak-report={}", path.display());
    // (name, directory, backend, PYTHONMALLOC, pytest arguments, environment)
    type PytestRun<'a> = (&'a str, &'a Path, &'a str, Option<&'a str>, Vec<String>, Vec<(&'a str, &'a str)>);
    let runs: Vec<PytestRun> = vec![
        ("ours, trace", &ours, "trace", malloc, vec![report_arg(&trace_report)], vec![twin_rounds]),
        ("ours, trace, pymalloc", &ours, "trace", None, vec![], vec![]),
        ("ours, poll", &ours, "poll", malloc, vec![report_arg(&poll_report)], vec![twin_rounds]),
        ("psleak 0.1.6's, trace", &upstream, "trace", malloc, deselect(false), vec![]),
        ("psleak 0.1.6's, trace, pymalloc", &upstream, "trace", None, deselect(false), vec![]),
        ("psleak 0.1.6's, poll", &upstream, "poll", malloc, deselect(true), vec![]),
    ];
    let mut total = PytestCounts::default();
    let mut times = Vec::new();
    let mut record = |name: String, started: Instant, counts: PytestCounts| {
        times.push((name, started.elapsed(), counts.passed, counts.failed));
        total.passed += counts.passed;
        total.failed += counts.failed;
    };
    for (name, dir, backend, pythonmalloc, args, env) in runs {
        println!("xtask: Python tests ({name})");
        let started = Instant::now();
        record(name.into(), started, pytest_under(&python, dir, backend, pythonmalloc, &args, &env)?);
    }
    // Ours under every other interpreter, with each allocator: what depends on the version
    // (frame layouts, the allocator's probes, the C API) is in both.
    let wheel = wheel::wheel()?;
    for interpreter in pythons::others(&python)? {
        let other = pythons::venv(&interpreter, &wheel)?;
        // An interpreter built with LTO (Debian's) inlines its object allocator: under
        // pymalloc its leaks are caught but not named, which test_plugin_and_backends checks.
        let allocators: &[_] = if interpreter.inlines_its_allocator {
            &[("trace", malloc)]
        } else {
            &[("trace", malloc), ("trace, pymalloc", None)]
        };
        for &(kind, pythonmalloc) in allocators {
            let name = format!("ours, {kind}, {}", interpreter.name);
            println!("xtask: Python tests ({name})");
            let started = Instant::now();
            record(name, started, pytest_under(&other, &ours, "trace", pythonmalloc, &[], &[])?);
        }
    }
    print_calls_to_verdict(&trace_report, &poll_report);

    let started = Instant::now();
    let counts = unprivileged::run_through_daemon()?;
    record("ours (leaky_ext), Debian python3: root, then a user through the daemon".into(), started, counts);
    println!("\n| Python test run | wall time | passed | failed |\n|---|---:|---:|---:|");
    for (name, took, passed, failed) in &times {
        println!("| {name} | {:.1} s | {passed} | {failed} |", took.as_secs_f64());
    }
    Ok(total)
}

/// Runs pytest in `dir` with `python`, on `backend`, with PYTHONMALLOC set to `pythonmalloc` or
/// unset.
fn pytest_under(
    python: &Path,
    dir: &Path,
    backend: &str,
    pythonmalloc: Option<&str>,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<PytestCounts> {
    let mut command = Command::new(python);
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:instafail"])
        .args(args)
        .current_dir(dir)
        .env("PSLEAK_BACKEND", backend)
        .env("PYTHONUNBUFFERED", "1")
        .envs(env.iter().copied());
    match pythonmalloc {
        Some(allocator) => command.env("PYTHONMALLOC", allocator),
        None => command.env_remove("PYTHONMALLOC"),
    };
    pytest(&mut command)
}

fn deselect(poll: bool) -> Vec<String> {
    let mut tests: Vec<&str> = UPSTREAM_PSUTIL_TESTS.to_vec();
    if !poll {
        tests.push(UPSTREAM_POLL_ONLY_TEST);
    }
    tests.iter().map(|t| format!("--deselect={t}")).collect()
}

/// A virtualenv under target/ with the test dependencies and this package, built by maturin.
fn python_with_psleak() -> Result<PathBuf> {
    let target = root().join("target");
    let venv = target.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PYTHON_TEST_DEPS))?;
    let wheel = wheel::build(&venv)?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]).arg(wheel))?;
    Ok(python)
}

/// `cargo xtask wheel`: builds the sdist and the wheel, installs it in the venv and checks it.
fn wheel_task() -> Result {
    let python = python_with_psleak()?;
    let venv = python.parent().and_then(Path::parent).ok_or("the venv's python has no venv")?;
    let wheel = wheel::wheel()?;
    let failed = checked(wheel::checks(&wheel, venv));
    println!("xtask: {}", wheel.display());
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} checks of the wheel failed")),
    }
}

/// Prints each named check's outcome; returns how many failed.
fn checked(checks: Vec<(&str, Result)>) -> u64 {
    let mut failed = 0;
    for (name, result) in checks {
        match result {
            Ok(()) => println!("xtask: {name}: ok"),
            Err(err) => {
                println!("xtask: {name}: FAILED: {err}");
                failed += 1;
            }
        }
    }
    failed
}

/// psleak 0.1.6's test files and their C extension, from the sdist on PyPI, unchanged.
fn upstream_tests(python: &Path, target: &Path) -> Result<PathBuf> {
    let dir = target.join("psleak-0.1.6");
    if !dir.join("tests/test_algo.py").exists() {
        let download = target.join("psleak-sdist");
        run(Command::new(python)
            .args(["-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:"])
            .args(["psleak==0.1.6", "-d"])
            .arg(&download))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        run(Command::new("tar")
            .arg("xzf")
            .arg(download.join("psleak-0.1.6.tar.gz"))
            .args(["--strip-components=1", "-C"])
            .arg(&dir)
            .arg("psleak-0.1.6/tests"))?;
    }
    run(Command::new(python)
        .args(["tests/build_ext.py", "-q", "build_ext", "--inplace"])
        .current_dir(&dir)
        .stdout(Stdio::null()))?;
    Ok(dir)
}

/// Runs pytest, echoing its output, and reads its closing summary line.
fn pytest(command: &mut Command) -> Result<PytestCounts> {
    let mut child = command.stdout(Stdio::piped()).spawn().map_err(|e| format!("cannot run pytest: {e}"))?;
    let mut counts = None;
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some(c) = pytest_counts(&line) {
            counts = Some(c);
        }
    }
    child.wait().map_err(|e| e.to_string())?;
    counts.ok_or_else(|| "pytest printed no summary (it could not run)".into())
}

/// (passed, failed + errors) from pytest's `3 failed, 75 passed, 13 skipped in 9.8s`.
fn pytest_counts(line: &str) -> Option<PytestCounts> {
    let summary = line.trim().trim_matches('=').trim();
    let (counts, took) = summary.rsplit_once(" in ")?;
    // "5.17s", or "69.83s (0:01:09)" past a minute
    took.split(' ').next()?.strip_suffix('s')?.parse::<f64>().ok()?;
    let mut result = PytestCounts::default();
    for part in counts.split(", ") {
        let (n, what) = part.split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        match what {
            "passed" => result.passed += n,
            "failed" | "error" | "errors" => result.failed += n,
            _ => {}
        }
    }
    Some(result)
}

/// For each deliberate leak, the calls of the leaking function each backend needed to decide.
fn print_calls_to_verdict(trace: &Path, poll: &Path) {
    let calls = |path: &Path| -> std::collections::BTreeMap<String, u64> {
        let Ok(text) = std::fs::read_to_string(path) else { return Default::default() };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { return Default::default() };
        json["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["test"].as_str().is_some_and(|t| t.contains("test_leak_is_caught")))
            .filter_map(|f| {
                Some((f["test"].as_str()?.rsplit_once('[')?.1.trim_end_matches(']').to_string(), f["calls"].as_u64()?))
            })
            .collect()
    };
    let (traced, polled) = (calls(trace), calls(poll));
    println!("\n| deliberate leak | calls to verdict, trace | calls to verdict, poll |\n|---|---:|---:|");
    for (case, n) in &traced {
        let p = polled.get(case).map_or("-".into(), |p| p.to_string());
        println!("| {case} | {n} | {p} |");
    }
}

/// (passed, failed) from cargo's `test result: ok. 12 passed; 0 failed; ...` lines.
fn result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word)?
                .trim()
                .parse()
                .ok()
        })
    };
    Some((count("passed")?, count("failed")?))
}

pub fn build_release() -> Result<PathBuf> {
    run(Command::new("cargo").args(["build", "--release", "--locked", "-p", "psleak"]).current_dir(root()))?;
    Ok(root().join("target/release/psleak"))
}

fn build_c(name: &str) -> Result<PathBuf> {
    let out_dir = root().join("target/xtask");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let out = out_dir.join(name);
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&out)
        .arg(root().join(format!("tests/targets/{name}.c"))))?;
    Ok(out)
}

/// A child that is killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo() -> Result {
    let psleak = build_release()?;
    let server = build_c("demo_server")?;
    let target = Guard(Command::new(&server).stdout(Stdio::null()).spawn().map_err(|e| e.to_string())?);
    let pid = target.0.id().to_string();
    println!("\nxtask: a toy server (pid {pid}) leaks a session record every 10th request and an fd every 50th.");
    println!("xtask: $ psleak trace --pid {pid} --interval 2 --duration 6 --top 3\n");
    let output = Command::new(&psleak)
        .args(["trace", "--pid", &pid, "--interval", "2", "--duration", "6", "--top", "3"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    if !output.status.success() {
        return Err(format!("psleak failed ({})", output.status));
    }
    for culprit in ["remember_session", "rotate_log"] {
        if !text.contains(culprit) {
            return Err(format!("the demo's leak in {culprit} was not named"));
        }
    }
    println!("\nxtask: caught: the sessions leaked in remember_session and the fds opened in rotate_log,");
    println!("xtask: while handle_request's own 4 KiB buffer, freed every time, does not show.");
    python_demo()
}

/// A unit test of a C extension that forgets a Py_DECREF, failed by the Python package, with
/// the leaking C function named.
fn python_demo() -> Result {
    let python = python_with_psleak()?;
    println!("\nxtask: and from Python: a unittest of a C extension whose function forgets a Py_DECREF");
    println!("xtask: (tests/python/ext/leaky_ext.c), run without PYTHONMALLOC=malloc:\n");
    let script = r#"
import sys, unittest
sys.path.insert(0, "tests/python")
import conftest  # builds leaky_ext
import leaky_ext, psleak

class TestLeakyExt(psleak.MemoryLeakTestCase):
    def test_forget_decref_list(self):
        self.execute(leaky_ext.forget_decref_list)
    def test_decref_list(self):
        self.execute(leaky_ext.decref_list)

unittest.main(argv=["demo", "-v"], exit=False)
"#;
    let output = Command::new(&python)
        .args(["-c", script])
        .current_dir(root())
        .env_remove("PYTHONMALLOC")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&output.stderr);
    print!("{text}");
    if !text.contains("forget_decref_list (leaky_ext.c:") || !text.contains("test_decref_list") {
        return Err("the Python demo did not name forget_decref_list".into());
    }
    println!("\nxtask: caught after 3 batches, named forget_decref_list; its twin decref_list passes.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pytest_summaries() {
        let c = pytest_counts("3 failed, 75 passed, 13 skipped, 1 error in 9.80s").unwrap();
        assert_eq!((c.passed, c.failed), (75, 4));
        let c = pytest_counts("========== 29 passed in 5.17s ==========").unwrap();
        assert_eq!((c.passed, c.failed), (29, 0));
        assert_eq!(pytest_counts("302 passed in 69.83s (0:01:09)").unwrap().passed, 302);
        assert!(pytest_counts("collected 29 items in the module").is_none());
    }

    #[test]
    fn reads_cargo_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 33.02s";
        assert_eq!(super::result_counts(ok), Some((12, 0)));
        assert_eq!(super::result_counts("test result: FAILED. 9 passed; 1 failed; 0 ignored"), Some((9, 1)));
        assert_eq!(super::result_counts("running 4 tests"), None);
    }
}
