//! The Windows build of `psleak` run under Wine (Debian's wine64, with mingw-w64 to build it
//! and its target), against a Windows program that leaks threads, handles and memory.
//!
//! Wine is not Windows: it has no ETW (the kernel session is refused: access denied) and
//! stubs some counters (handle counts read 0, no private working set). What it can show is
//! checked: the binary links and runs, `trace` falls back to polling in one line and says so
//! in every report, the target's threads and memory are seen growing, and a dead pid or a bad
//! argument is one line and exit 2. Like `check-targets`, a target rustup cannot install is
//! one loud line, not a failure of the Linux suite.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{root, run, Guard, Result};

const TARGET: &str = "x86_64-pc-windows-gnu";
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// Checks passed and failed; Err when the checks could not run at all.
pub fn smoke() -> Result<(u64, u64)> {
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !added {
        println!("xtask: !!!!! SKIPPED Wine: `rustup target add {TARGET}` failed; the Windows build NOT run !!!!!");
        return Ok((0, 0));
    }
    println!("xtask: the Windows build of psleak under Wine (polling fallback; Wine has no ETW)");
    let dir = root().join("target/wine");
    let exe = build(&dir)?;
    let wine = Wine::start(&dir)?;
    let mut checks = Checks::default();

    let help = wine.run(&exe, &["--help"])?;
    checks.check("psleak.exe links (mingw-w64) and runs under Wine", help.status.success(), &help);

    let mut target = wine.command(&dir.join("leaky.exe"));
    let mut target = Guard(target.stdout(Stdio::piped()).spawn().map_err(|e| format!("cannot start leaky.exe: {e}"))?);
    let mut first = String::new();
    BufReader::new(target.0.stdout.take().unwrap()).read_line(&mut first).map_err(|e| e.to_string())?;
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
        dead.status.code() == Some(2) && dead_lines == ["psleak: no running process has pid 999999"],
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
    Ok((checks.passed, checks.failed))
}

/// psleak.exe and the target, in `dir` beside the DLL Wine 8 lacks.
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
        .arg(dir.join("bcryptprimitives.dll"))
        .arg(sources.join("process_prng.c"))
        .arg("-ladvapi32"))?;
    Ok(exe)
}

/// A Wine prefix of our own; its server and every process in it are killed when dropped.
struct Wine {
    prefix: PathBuf,
}

impl Wine {
    fn start(dir: &Path) -> Result<Self> {
        let wine = Self { prefix: dir.join("prefix") };
        run(wine.command(Path::new("wineboot")).arg("-i").stdout(Stdio::null()).stderr(Stdio::null()))?;
        Ok(wine)
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
