//! `cargo xtask bench`: psleak against the tools its users would otherwise use, side by side in
//! one run, contenders interleaved so that the machine's noise falls on all of them alike.
//! Writes bench/RESULTS.md, bench/results.json and bench/time_to_verdict.png.
//!
//! The cases and the way each contender runs one are in bench/leak_case.py; this file runs them,
//! measures the tracing overhead and the collector's cost, and writes the tables.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{build_c, build_release, python_with_psleak, root, run, Guard, Result};

const REPETITIONS: usize = 5;
const MEMRAY_PACKAGES: &[&str] = &[super::PYTEST, "pytest-memray==1.11.0", "matplotlib==3.11.2"];
pub const OLD_PSLEAK_PACKAGES: &[&str] = &["psleak==0.1.6", super::PYTEST];
/// Per-call leak sizes tried for "smallest leak caught": 1 B, 2 B, 4 B ... 64 KiB.
const LEAK_SIZES: std::ops::RangeInclusive<u32> = 0..=16;

pub struct Contender {
    pub name: &'static str,
    pub python: PathBuf,
    /// `psleak` or `memray`: how leak_case.py drives the case.
    pub runner: &'static str,
    pub env: Vec<(&'static str, &'static str)>,
}

struct Case {
    name: String,
    expected: String,
    memray: bool,
}

#[derive(Clone)]
pub struct Run {
    pub verdict: String,
    pub right: bool,
    pub calls: u64,
    pub seconds: f64,
}

pub fn bench() -> Result {
    let psleak = build_release()?;
    let ours = python_with_psleak()?;
    let dir = root().join("target/bench");
    let old = venv(&dir.join("venv-psleak-0.1.6"), OLD_PSLEAK_PACKAGES)?;
    let memray = venv(&dir.join("venv-memray"), MEMRAY_PACKAGES)?;
    let ext = dir.join("ext");
    build_leaky_ext(&ours, &ext)?;
    let with_malloc = |backend| vec![("PSLEAK_BACKEND", backend), ("PYTHONMALLOC", "malloc")];
    let contenders = vec![
        Contender { name: "psleak trace", python: ours.clone(), runner: "psleak", env: with_malloc("trace") },
        Contender {
            name: "psleak trace, pymalloc",
            python: ours.clone(),
            runner: "psleak",
            env: vec![("PSLEAK_BACKEND", "trace")],
        },
        Contender { name: "psleak poll", python: ours.clone(), runner: "psleak", env: with_malloc("poll") },
        Contender {
            name: "psleak 0.1.6",
            python: old.clone(),
            runner: "psleak",
            env: vec![("PYTHONMALLOC", "malloc")],
        },
        Contender { name: "pytest-memray", python: memray.clone(), runner: "memray", env: vec![] },
    ];
    let cases = list_cases(&ours)?;

    println!(
        "\nxtask: {} cases × {} contenders × {REPETITIONS} repetitions, interleaved",
        cases.len(),
        contenders.len()
    );
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); contenders.len()]; cases.len()];
    for rep in 0..REPETITIONS {
        for (i, case) in cases.iter().enumerate() {
            for (j, contender) in contenders.iter().enumerate() {
                if contender.runner == "memray" && !case.memray {
                    continue;
                }
                let result = run_case(contender, &case.name, &ext)?;
                println!(
                    "  [{}/{REPETITIONS}] {:<36} {:<24} {:<28} {:>7} calls {:>6.2} s",
                    rep + 1,
                    case.name,
                    contender.name,
                    result.verdict,
                    result.calls,
                    result.seconds
                );
                runs[i][j].push(result);
            }
        }
    }

    println!("\nxtask: steady state: every case in one process per contender, {REPETITIONS} times");
    let mut steady: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); contenders.len()]; cases.len()];
    for _ in 0..REPETITIONS {
        for (j, contender) in contenders.iter().enumerate() {
            for (name, result) in run_all_cases(contender, &ext)? {
                let i = cases.iter().position(|c| c.name == name).ok_or(format!("unknown case {name}"))?;
                steady[i][j].push(result);
            }
            println!("  {}: done", contender.name);
        }
    }

    println!("\nxtask: the smallest per-call leak each contender catches 5 times out of 5");
    let smallest = smallest_leaks(&contenders, &ext)?;
    println!("\nxtask: tracing overhead and the collector's cost");
    let overhead = overhead(&psleak)?;

    let report = Report {
        contenders: &contenders,
        cases: &cases,
        runs: &runs,
        steady: &steady,
        smallest: &smallest,
        overhead: &overhead,
    };
    let bench_dir = root().join("bench");
    let markdown = report.markdown(&machine(&ours, &old, &memray));
    // The soak's and the tracing cost's sections are their own tasks': kept as they were.
    let results = bench_dir.join("RESULTS.md");
    let markdown = markdown
        + &crate::cost::SECTION.kept(&results).unwrap_or_default()
        + &crate::soak::SECTION.kept(&results).unwrap_or_default();
    std::fs::write(bench_dir.join("RESULTS.md"), &markdown).map_err(|e| e.to_string())?;
    let json = bench_dir.join("results.json");
    std::fs::write(&json, report.json().to_string()).map_err(|e| e.to_string())?;
    run(Command::new(&memray).arg(bench_dir.join("chart.py")).arg(&json).arg(bench_dir.join("time_to_verdict.png")))?;
    println!("\n{markdown}");
    println!("xtask: wrote bench/RESULTS.md, bench/results.json and bench/time_to_verdict.png");
    Ok(())
}

/// Builds tests/python/ext (leaky_ext) with `python` into `ext`.
pub fn build_leaky_ext(python: &Path, ext: &Path) -> Result {
    run(Command::new(python)
        .args(["setup.py", "-q", "build_ext", "--build-lib"])
        .arg(ext)
        .arg("--build-temp")
        .arg(ext.join("tmp"))
        .current_dir(root().join("tests/python/ext"))
        .stdout(Stdio::null()))
}

/// A virtualenv of its own under target/bench with `packages` from PyPI.
pub fn venv(dir: &Path, packages: &[&str]) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(dir))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--disable-pip-version-check"]).args(packages))?;
    Ok(python)
}

fn leak_case() -> PathBuf {
    root().join("bench/leak_case.py")
}

fn list_cases(python: &Path) -> Result<Vec<Case>> {
    let output = Command::new(python).arg(leak_case()).arg("--list").output().map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("leak_case.py --list: {e}"))?;
            Ok(Case {
                name: v["case"].as_str().unwrap_or_default().to_string(),
                expected: v["expected"].as_str().unwrap_or_default().to_string(),
                memray: v["memray"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

fn leak_case_command(contender: &Contender, case: &str, ext: &Path) -> Result<Command> {
    let path = std::env::join_paths([ext.to_path_buf(), root().join("bench")]).map_err(|e| e.to_string())?;
    let mut command = Command::new(&contender.python);
    command
        .arg(leak_case())
        .args([contender.runner, case])
        .env("PYTHONPATH", path)
        .env_remove("PYTHONMALLOC")
        .env_remove("PSLEAK_BACKEND");
    command.envs(contender.env.iter().copied());
    Ok(command)
}

fn parse_run(line: &str, seconds: f64) -> Option<Run> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(Run {
        verdict: v["verdict"].as_str()?.to_string(),
        right: v["right"].as_bool()?,
        calls: v["calls"].as_u64()?,
        seconds: v["seconds"].as_f64().unwrap_or(seconds),
    })
}

fn crashed(stderr: &[u8], seconds: f64) -> Run {
    let stderr = String::from_utf8_lossy(stderr);
    let why = stderr.lines().last().unwrap_or("no output").to_string();
    Run { verdict: format!("crashed: {why}"), right: false, calls: 0, seconds }
}

/// One case in a fresh process; the time is the whole process's, as a user waits for it.
pub fn run_case(contender: &Contender, case: &str, ext: &Path) -> Result<Run> {
    let started = Instant::now();
    let output = leak_case_command(contender, case, ext)?.output().map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().last().and_then(|l| parse_run(l, seconds)).unwrap_or_else(|| crashed(&output.stderr, seconds)))
}

/// Every case in one process, each timed inside it: (case, run) pairs.
fn run_all_cases(contender: &Contender, ext: &Path) -> Result<Vec<(String, Run)>> {
    let output = leak_case_command(contender, "--all", ext)?.output().map_err(|e| e.to_string())?;
    let runs: Vec<(String, Run)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let case = serde_json::from_str::<serde_json::Value>(line).ok()?["case"].as_str()?.to_string();
            Some((case, parse_run(line, 0.0)?))
        })
        .collect();
    if !output.status.success() {
        return Err(format!(
            "{}: the run of every case failed: {}",
            contender.name,
            crashed(&output.stderr, 0.0).verdict
        ));
    }
    Ok(runs)
}

/// For each contender, the smallest leak (bytes per call) it caught in all 5 runs, if any.
fn smallest_leaks(contenders: &[Contender], ext: &Path) -> Result<Vec<Option<u64>>> {
    let mut found: Vec<Option<u64>> = vec![None; contenders.len()];
    for shift in LEAK_SIZES {
        let size = 1u64 << shift;
        let mut caught = vec![0; contenders.len()];
        for _ in 0..REPETITIONS {
            for (j, contender) in contenders.iter().enumerate() {
                if found[j].is_none() && run_case(contender, &format!("forget_free/{size}"), ext)?.right {
                    caught[j] += 1;
                }
            }
        }
        for (j, contender) in contenders.iter().enumerate() {
            if found[j].is_none() {
                println!("  {size:>6} B/call: {:<24} caught {}/{REPETITIONS}", contender.name, caught[j]);
                if caught[j] == REPETITIONS {
                    found[j] = Some(size);
                }
            }
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
}

/// Figures 4 and 6: medians over interleaved rounds, in the units their names say.
struct Overhead {
    rows: Vec<(&'static str, f64)>,
}

const ROUNDS: usize = 3;
const PAIRS: u64 = 2_000_000;
const LIVE_BLOCKS: u64 = 1_000_000;

/// A Python-level call of a small function, `n` times, timed in the target.
const PYTHON_WORKLOAD: &str = "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n\
def small(i):\n    return {'k': [i, str(i)]}\n\
n = 200000\nt = time.perf_counter_ns()\nfor i in range(n):\n    small(i)\n\
print((time.perf_counter_ns() - t) / n, flush=True)\nsys.stdin.readline()\n";

fn overhead(psleak: &Path) -> Result<Overhead> {
    let alloc = build_c("bench_alloc")?;
    let pairs = PAIRS.to_string();
    let alloc_cmd = |count: &str, mode: &str| {
        let mut c = Command::new(&alloc);
        c.args([count, "64", mode]);
        c
    };
    let python_cmd = || {
        let mut c = Command::new("python3");
        c.args(["-c", PYTHON_WORKLOAD]).env("PYTHONMALLOC", "malloc");
        c
    };
    let names = [
        "malloc/free pair, untraced (ns)",
        "malloc/free pair, floor: same probes, empty programs (ns)",
        "malloc/free pair, traced by psleak (ns)",
        "malloc/free pair, traced, probes at function entry (ns)",
        "Python call of a small function, untraced (ns)",
        "Python call of a small function, floor (ns)",
        "Python call of a small function, traced by psleak (ns)",
        "time to attach, C target (s)",
        "time to attach, Python target (s)",
        "events per second, traced malloc/free loop",
        "events lost in that loop",
        "collector memory per live tracked allocation (bytes)",
    ];
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        values[0].push(Waiting::start(&mut alloc_cmd(&pairs, "free"))?.go()?);
        for (row, extra) in [(1, &["--empty-probes"][..]), (2, &[][..]), (3, &["--probes-at-entry"][..])] {
            let mut target = Waiting::start(&mut alloc_cmd(&pairs, "free"))?;
            let (tracer, attach_s) = attach(psleak, &target.pid(), extra)?;
            let ns = target.go()?;
            std::thread::sleep(Duration::from_millis(300));
            let (events, lost) = stop(tracer)?;
            values[row].push(ns);
            if row == 2 {
                values[7].push(attach_s);
                values[9].push(events as f64 / (PAIRS as f64 * ns / 1e9));
                values[10].push(lost as f64);
            }
        }
        values[4].push(Waiting::start(&mut python_cmd())?.go()?);
        for (row, extra) in [(5, &["--empty-probes"][..]), (6, &[][..])] {
            let mut target = Waiting::start(&mut python_cmd())?;
            let (tracer, attach_s) = attach(psleak, &target.pid(), extra)?;
            values[row].push(target.go()?);
            if row == 6 {
                values[8].push(attach_s);
            }
            stop(tracer)?;
        }
        values[11].push(bytes_per_live_allocation(psleak, &mut alloc_cmd(&LIVE_BLOCKS.to_string(), "keep"))?);
    }
    let rows = names
        .iter()
        .zip(values)
        .map(|(name, mut v)| {
            v.sort_by(f64::total_cmp);
            (*name, v[v.len() / 2])
        })
        .collect();
    Ok(Overhead { rows })
}

/// The collector's resident memory grows by this much per allocation it holds in its ledger.
fn bytes_per_live_allocation(psleak: &Path, keep: &mut Command) -> Result<f64> {
    let mut target = Waiting::start(keep)?;
    let (tracer, _) = attach(psleak, &target.pid(), &[])?;
    let tracer_pid = tracer.0.id();
    let before = resident_bytes(tracer_pid)?;
    target.go()?;
    std::thread::sleep(Duration::from_secs(1)); // the last events drained
    let after = resident_bytes(tracer_pid)?;
    let (events, _) = stop(tracer)?;
    if events < LIVE_BLOCKS {
        return Err(format!("the collector saw {events} of {LIVE_BLOCKS} allocations"));
    }
    Ok((after - before) as f64 / LIVE_BLOCKS as f64)
}

fn resident_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))
}

/// A benchmark target that waits for a line on stdin before it starts.
pub struct Waiting {
    child: Guard,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Waiting {
    pub fn start(command: &mut Command) -> Result<Self> {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(Self { child: Guard(child), stdout })
    }

    pub fn pid(&self) -> String {
        self.child.0.id().to_string()
    }

    /// Lets it run and returns the number it prints.
    fn go(&mut self) -> Result<f64> {
        let line = self.go_line()?;
        line.trim().parse().map_err(|_| format!("benchmark target printed {line:?}"))
    }

    /// Lets it run and returns the line it prints.
    pub fn go_line(&mut self) -> Result<String> {
        writeln!(self.child.0.stdin.as_mut().expect("stdin is piped"), "go").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(line)
    }
}

/// psleak attached to a waiting target; returns (tracer, seconds to attach).
pub fn attach(psleak: &Path, pid: &str, extra: &[&str]) -> Result<(Guard, f64)> {
    let started = Instant::now();
    let mut child = Command::new(psleak)
        .args(["trace", "--json", "--interval", "3600", "--ring-mib", "64", "--pid", pid])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr is piped")).read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("tracing pid") {
        return Err(format!("psleak did not attach: {line}"));
    }
    Ok((Guard(child), started.elapsed().as_secs_f64()))
}

/// Stops the tracer and returns (events, events lost).
pub fn stop(mut tracer: Guard) -> Result<(u64, u64)> {
    run(Command::new("kill").args(["-INT", &tracer.0.id().to_string()]))?;
    let mut out = String::new();
    tracer.0.stdout.as_mut().expect("stdout is piped").read_to_string(&mut out).map_err(|e| e.to_string())?;
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .map_err(|e| format!("psleak's final report is not JSON: {e}"))?;
    let number = |v: &serde_json::Value| v.as_u64().ok_or_else(|| format!("no such number in {report}"));
    Ok((number(&report["events"])?, number(&report["lost"]["ring_full"])?))
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

fn command_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The machine and the versions, for the head of RESULTS.md.
fn machine(ours: &Path, old: &Path, memray: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim_start_matches("MemTotal:").trim().to_string()))
        .unwrap_or_default();
    let version = |python: &Path, module: &str| {
        command_line(python, &["-c", &format!("import importlib.metadata as m; print(m.version('{module}'))")])
    };
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mut rev = git(&["rev-parse", "--short", "HEAD"]);
    if !git(&["status", "--porcelain"]).is_empty() {
        rev += " with uncommitted changes";
    }
    format!(
        "- Date: {}\n- Machine: {cpu}, {} CPUs, {memory} RAM, kernel {}\n- psleak (this repository) at {rev}; {}\n\
         - psleak {} from PyPI (on psutil {}); pytest-memray {} on memray {}\n",
        command_line(Path::new("date"), &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_line(Path::new("nproc"), &[]),
        command_line(Path::new("uname"), &["-r"]),
        command_line(ours, &["--version"]),
        version(old, "psleak"),
        version(old, "psutil"),
        version(memray, "pytest-memray"),
        version(memray, "memray"),
    )
}

struct Report<'a> {
    contenders: &'a [Contender],
    cases: &'a [Case],
    runs: &'a [Vec<Vec<Run>>],
    steady: &'a [Vec<Vec<Run>>],
    smallest: &'a [Option<u64>],
    overhead: &'a Overhead,
}

impl Report<'_> {
    fn header(&self, first: &str) -> String {
        let names: Vec<&str> = self.contenders.iter().map(|c| c.name).collect();
        format!("| {first} | {} |\n|---|{}\n", names.join(" | "), "---:|".repeat(names.len()))
    }

    /// One row per case, a cell per contender; cases a contender cannot express show as "n/a".
    fn table(&self, first: &str, expected: bool, cell: impl Fn(usize, usize, &[Run]) -> String) -> String {
        self.table_of(self.runs, first, expected, cell)
    }

    fn table_of(
        &self,
        runs: &[Vec<Vec<Run>>],
        first: &str,
        expected: bool,
        cell: impl Fn(usize, usize, &[Run]) -> String,
    ) -> String {
        let mut out = if expected {
            self.header(&format!("{first} | expected")).replacen("|---|", "|---|---|", 1)
        } else {
            self.header(first)
        };
        for (i, case) in self.cases.iter().enumerate() {
            let cells: Vec<String> = (0..self.contenders.len())
                .map(|j| if runs[i][j].is_empty() { "n/a".into() } else { cell(i, j, &runs[i][j]) })
                .collect();
            let expected = if expected { format!(" | {}", case.expected) } else { String::new() };
            out += &format!("| {}{expected} | {} |\n", case.name, cells.join(" | "));
        }
        out
    }

    fn median_seconds(runs: &[Vec<Vec<Run>>], i: usize, j: usize) -> Option<f64> {
        median(runs[i][j].iter().map(|r| r.seconds).collect())
    }

    /// Median time per case and its ratio to psleak trace's; a wrong verdict is marked.
    fn time_cell(runs: &[Vec<Vec<Run>>], i: usize, j: usize) -> String {
        let wrong = if runs[i][j].iter().all(|r| r.right) { "" } else { " **(wrong verdict)**" };
        match (Self::median_seconds(runs, i, j), Self::median_seconds(runs, i, 0)) {
            (Some(m), Some(b)) if j > 0 => format!("{m:.3} s (×{:.2}){wrong}", m / b),
            (Some(m), _) => format!("{m:.3} s{wrong}"),
            _ => "n/a".into(),
        }
    }

    fn markdown(&self, machine: &str) -> String {
        let mut md = format!(
            "# Benchmark: psleak against psleak 0.1.6 and pytest-memray\n\nWritten by `cargo xtask bench` \
             (not run in CI). Every contender runs every case in a fresh process with its defaults, \
             {REPETITIONS} times, interleaved.\n\n{machine}\n"
        );
        md += "Contenders: **psleak trace** (this package, eBPF collector, `PYTHONMALLOC=malloc`), \
               **psleak trace, pymalloc** (the same without `PYTHONMALLOC`), **psleak poll** (this package's \
               polling backend, `PYTHONMALLOC=malloc`), **psleak 0.1.6** (PyPI, `PYTHONMALLOC=malloc`), \
               **pytest-memray** (`limit_leaks`, its documented loop pattern: 10 warm-up calls in a fixture, \
               200 calls in the test, a per-stack limit of 1 KB; it cannot see fds or threads).\n\n";

        let right: Vec<String> = (0..self.contenders.len())
            .map(|j| {
                let (mut ok, mut all) = (0, 0);
                for case_runs in self.runs {
                    if !case_runs[j].is_empty() {
                        all += 1;
                        ok += usize::from(case_runs[j].iter().all(|r| r.right));
                    }
                }
                format!("{ok}/{all}")
            })
            .collect();
        md += "## 1. Verdicts (right in all 5 runs, else what was said)\n\n";
        md += &format!(
            "Cases right 5/5: {}\n\n",
            self.contenders.iter().zip(&right).map(|(c, r)| format!("{} {r}", c.name)).collect::<Vec<_>>().join(", ")
        );
        md += &self.table("case", true, |_, _, runs| {
            if runs.iter().all(|r| r.right) {
                "right".into()
            } else {
                let mut said: BTreeMap<&str, usize> = BTreeMap::new();
                runs.iter().for_each(|r| *said.entry(r.verdict.as_str()).or_default() += 1);
                let said: Vec<String> = said.iter().map(|(v, n)| format!("{v} ×{n}")).collect();
                format!("**wrong**: {}", said.join(", "))
            }
        });
        md += "\n## 2. Wall time to verdict (median of 5; ratio to psleak trace)\n\n\
               The whole process, as a user waits for one test: interpreter start, imports, the collector's \
               start and attach (trace), the calls, the verdict, the exit.\n\n";
        md += &self.table("case", false, |i, j, _| Self::time_cell(self.runs, i, j));
        md += "\n### 2b. The same in steady state: every case in one process (median of 5)\n\n\
               What a test suite sees: the one-time costs (imports; for the tracer, the collector's start, \
               BTF relocation, map allocation and attach, ~0.3 s) are paid by an untimed first case.\n\n";
        md += &self.table_of(self.steady, "case", false, |i, j, _| Self::time_cell(self.steady, i, j));
        md += "\n![time to verdict](time_to_verdict.png)\n\n## 3. Calls of the function under test to reach the verdict (median)\n\n";
        md += &self.table("case", false, |_, _, runs| {
            median(runs.iter().map(|r| r.calls as f64).collect()).map_or("n/a".into(), |c| format!("{c:.0}"))
        });
        md += "\n## 4 and 6. Tracing overhead and the collector's cost (median of 3 interleaved rounds)\n\n\
               Floor: the same probes attached with programs that return at once (`--empty-probes`): \
               the kernel's uprobe cost alone.\n\n| measure | value | ratio to untraced |\n|---|---:|---:|\n";
        let rows = &self.overhead.rows;
        for (k, (name, value)) in rows.iter().enumerate() {
            let ratio = match k {
                1..=3 => format!("×{:.0}", value / rows[0].1),
                5 | 6 => format!("×{:.1}", value / rows[4].1),
                _ => String::new(),
            };
            md += &format!("| {name} | {value:.3} | {ratio} |\n");
        }
        md += "\n## 5. Smallest per-call leak caught 5 times out of 5 with defaults (`forget_free(N)`)\n\n\
               | contender | smallest leak |\n|---|---:|\n";
        for (contender, size) in self.contenders.iter().zip(self.smallest) {
            let size = size.map_or(format!("none up to {} B", 1u64 << LEAK_SIZES.end()), |s| format!("{s} B"));
            md += &format!("| {} | {size} |\n", contender.name);
        }
        md
    }

    fn json(&self) -> serde_json::Value {
        let contenders: Vec<&str> = self.contenders.iter().map(|c| c.name).collect();
        let cases: Vec<&str> = self.cases.iter().map(|c| c.name.as_str()).collect();
        let medians = |runs: &[Vec<Vec<Run>>]| -> serde_json::Map<String, serde_json::Value> {
            let mut seconds = serde_json::Map::new();
            for (j, name) in contenders.iter().enumerate() {
                let per_case: serde_json::Map<String, serde_json::Value> = (0..cases.len())
                    .filter_map(|i| Some((cases[i].to_string(), Self::median_seconds(runs, i, j)?.into())))
                    .collect();
                seconds.insert(name.to_string(), per_case.into());
            }
            seconds
        };
        serde_json::json!({
            "contenders": contenders,
            "cases": cases,
            "seconds": medians(self.runs),
            "steady_seconds": medians(self.steady),
        })
    }
}
