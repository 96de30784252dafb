//! The Windows build of psleak run under Wine (Debian's wine64, with mingw-w64 to build it):
//! the unit tests of `psleak` and `psleak-etw`, and `psleak.exe trace` against a Windows
//! program that leaks threads, handles and memory.
//!
//! Wine is not Windows: it has no ETW (the kernel session is refused: access denied) and
//! stubs some counters (handle counts read 0, no private working set, no HeapSummary). What it
//! can show is checked: the unit tests pass there (the Windows polling functions among them,
//! but the HeapSummary one, skipped loudly), the binary runs, `trace` falls back to polling in
//! one line and says so in every report, the target's threads and memory are seen growing, and
//! a dead pid or a bad argument is one line and exit 2. Like `check-targets`, a target rustup
//! cannot install is one loud line, not a failure of the Linux suite.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{root, run, Guard, Result};

const TARGET: &str = "x86_64-pc-windows-gnu";
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// Checks passed and failed; Err when the checks could not run at all.
pub fn smoke() -> Result<(u64, u64)> {
    if !crate::targets::add(TARGET) {
        println!("xtask: !!!!! SKIPPED Wine: `rustup target add {TARGET}` failed; the Windows build NOT run !!!!!");
        return Ok((0, 0));
    }
    println!("xtask: the Windows build of psleak under Wine (polling fallback; Wine has no ETW)");
    let dir = root().join("target/wine");
    let exe = build(&dir)?;
    let wine = Wine::start(&dir)?;
    let (tests_passed, tests_failed) = wine.unit_tests()?;
    let mut checks = Checks::default();

    let help = wine.run(&exe, &["--help"])?;
    checks.check("psleak.exe links (mingw-w64) and runs under Wine", help.status.success(), &help);

    let mut target = wine.command(&dir.join("leaky.exe"));
    let mut target = Guard(target.stdout(Stdio::piped()).spawn().map_err(|e| format!("cannot start leaky.exe: {e}"))?);
    let mut first = String::new();
    BufReader::new(target.0.stdout.take().expect("stdout is piped"))
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    let pid = first.trim().to_string();
    let trace = wine.run(&exe, &["trace", "--pid", &pid, "--interval", "1", "--duration", "3", "--json"])?;
    let stderr = String::from_utf8_lossy(&trace.stderr);
    let fallback: Vec<&str> = stderr.lines().filter(|l| l.starts_with("psleak: ")).collect();
    checks.check(
        "trace without ETW says so in one line and polls",
        trace.status.success()
            && fallback.len() == 1
            && fallback[0].contains("cannot start the ETW kernel session")
            && fallback[0].ends_with(&format!("polling pid {pid} instead")),
        &trace,
    );
    let reports: Vec<serde_json::Value> =
        String::from_utf8_lossy(&trace.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    checks.check(
        "every report says no events come",
        reports.len() >= 3
            && reports.iter().all(|r| r["untraced"].as_str().is_some_and(|u| u.contains("no ETW events"))),
        &trace,
    );
    let grown = |what: &str| reports.last().and_then(|r| r["process"]["since_attach"][what].as_i64()).unwrap_or(0);
    // 3 s at a thread and 64 KiB every 50 ms: ~60 threads and ~3.8 MiB.
    checks.check("the target's threads are counted as they grow", grown("threads") >= 10, &trace);
    checks.check("the target's memory is seen growing (rss)", grown("rss") >= 1 << 20, &trace);

    let dead = wine.run(&exe, &["trace", "--pid", "999999"])?;
    let dead_err = String::from_utf8_lossy(&dead.stderr);
    let dead_lines: Vec<&str> = dead_err.lines().filter(|l| l.starts_with("psleak")).collect();
    checks.check(
        "a dead pid is one line and exit 2",
        dead.status.code() == Some(2)
            && dead_lines
                == ["psleak: no process with pid 999999: check the pid with `tasklist /FI \"PID eq 999999\"`"],
        &dead,
    );
    let bad = wine.run(&exe, &["trace", "--pid", "twelve"])?;
    let bad_err = String::from_utf8_lossy(&bad.stderr);
    checks.check(
        "an invalid argument is refused with exit 2, no panic",
        bad.status.code() == Some(2) && bad_err.contains("invalid value 'twelve'") && !bad_err.contains("panicked"),
        &bad,
    );
    drop(target);
    drop(wine);
    Ok((tests_passed + checks.passed, tests_failed + checks.failed))
}

/// psleak.exe and the target, in `dir`, and the DLL Wine 8 lacks.
fn build(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run(Command::new("cargo")
        .args(["build", "--locked", "-p", "psleak", "--bin", "psleak", "--target", TARGET])
        .current_dir(root()))?;
    let exe = dir.join("psleak.exe");
    fs::copy(root().join(format!("target/{TARGET}/debug/psleak.exe")), &exe).map_err(|e| e.to_string())?;
    let sources = root().join("tests/targets/windows");
    run(Command::new(MINGW_GCC).args(["-O1", "-o"]).arg(dir.join("leaky.exe")).arg(sources.join("leaky.c")))?;
    run(Command::new(MINGW_GCC)
        .args(["-shared", "-o"])
        .arg(dir.join(PRNG_DLL))
        .arg(sources.join("process_prng.c"))
        .arg("-ladvapi32"))?;
    Ok(exe)
}

/// Where Rust's standard library takes its random numbers on Windows; Wine 9 has it, Wine 8
/// does not: a stand-in goes into the prefix's system32.
const PRNG_DLL: &str = "bcryptprimitives.dll";

/// The unit tests Wine cannot run, and why.
const NOT_UNDER_WINE: &[(&str, &str)] =
    &[("poll::windows::tests::a_heap_block_shows_in_the_heap_figure", "Wine 8 has no HeapSummary")];

/// A Wine prefix of our own; its server and every process in it are killed when dropped.
struct Wine {
    prefix: PathBuf,
}

impl Wine {
    fn start(dir: &Path) -> Result<Self> {
        let wine = Self { prefix: dir.join("prefix") };
        // A server that stays (until Drop), started with no pipe of ours: a server started
        // by a later client would inherit that client's output and hold it open.
        fs::create_dir_all(&wine.prefix).map_err(|e| e.to_string())?;
        run(wine.command(Path::new("wineserver")).arg("-p"))?;
        run(wine.command(Path::new("wineboot")).arg("-i"))?;
        fs::copy(dir.join(PRNG_DLL), wine.prefix.join("drive_c/windows/system32").join(PRNG_DLL))
            .map_err(|e| format!("cannot put {PRNG_DLL} into the Wine prefix: {e}"))?;
        Ok(wine)
    }

    /// `cargo test` of the Windows build, each test binary run by Wine: (passed, failed).
    fn unit_tests(&self) -> Result<(u64, u64)> {
        for (test, why) in NOT_UNDER_WINE {
            println!("xtask: !!!!! SKIPPED under Wine: {test} ({why}); it runs on Windows only !!!!!");
        }
        let mut cargo = Command::new("cargo");
        cargo
            .args(["test", "--locked", "--lib", "-p", "psleak", "-p", "psleak-etw", "--target", TARGET, "--"])
            .args(NOT_UNDER_WINE.iter().flat_map(|(test, _)| ["--skip", test]))
            .current_dir(root())
            .env("CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER", "wine")
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            .env_remove("DISPLAY");
        let output = cargo.output().map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
        let (mut passed, mut failed) = (0, 0);
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some((p, f)) = crate::result_counts(line) {
                println!("wine: {line}");
                passed += p;
                failed += f;
            } else if line.contains("FAILED") || line.contains("panicked") {
                println!("wine: {line}");
            }
        }
        if !output.status.success() && failed == 0 {
            // A test binary that died (an unimplemented function aborts the process) counts no test.
            println!("{}", String::from_utf8_lossy(&output.stderr).trim_end());
            failed += 1;
        }
        Ok((passed, failed))
    }

    /// `program` under Wine (a Linux path to an .exe), its output to be taken, never inherited:
    /// Wine's server outlives its clients and must not hold the suite's pipes.
    fn command(&self, program: &Path) -> Command {
        let mut command = if program.extension().is_some_and(|e| e == "exe") {
            let mut wine = Command::new("wine");
            wine.arg(program);
            wine
        } else {
            Command::new(program)
        };
        command
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn run(&self, exe: &Path, args: &[&str]) -> Result<Output> {
        let mut command = self.command(exe);
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.output().map_err(|e| format!("cannot run {command:?}: {e}"))
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = self.command(Path::new("wineserver")).arg("-k").status();
    }
}

#[derive(Default)]
struct Checks {
    passed: u64,
    failed: u64,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, output: &Output) {
        if ok {
            self.passed += 1;
            println!("wine: ok     {name}");
        } else {
            self.failed += 1;
            println!("wine: FAILED {name} (exit {:?})", output.status.code());
            println!("  stdout: {}", String::from_utf8_lossy(&output.stdout).trim_end());
            println!("  stderr: {}", String::from_utf8_lossy(&output.stderr).trim_end());
        }
    }
}
