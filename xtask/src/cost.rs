//! `cargo xtask bench-cost`: what tracing costs the code around a leak test, side by side in
//! one run (contenders interleaved, medians of `ROUNDS`): a pytest session of ordinary tests
//! with leak tests among them, and the allocation-heavy pair of leaky_ext. Its tables go in
//! their own section of bench/RESULTS.md, which `cargo xtask bench` keeps.
//!
//! Then what a probe hit costs, per probed function, with the probes where psleak puts them
//! and with all of them at their function's entry (the placement before), in the same rounds.
//!
//! `PSLEAK_BENCH_BEFORE=/path/to/python` adds a contender: another build of psleak installed
//! in that interpreter (the one before a change, to measure the change).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::bench::{attach, median, run_case, stop, Contender, Waiting};
use super::{build_release, python_with_psleak, root, run, Result, Section};

const ROUNDS: usize = 5;
const SECTION_START: &str = "<!-- tracing cost: cargo xtask bench-cost -->";
const SECTION_END: &str = "<!-- end of tracing cost -->";
pub const SECTION: Section = Section { start: SECTION_START, end: SECTION_END };

/// leak_case.py's allocation-heavy cases.
const HEAVY_CASES: &[&str] = &["list: build and free 20000 nodes", "list: forget a node of 20000"];

pub fn bench_cost() -> Result {
    let ours = python_with_psleak()?;
    let dir = root().join("target/bench");
    let old = super::bench::venv(&dir.join("venv-psleak-0.1.6"), super::bench::OLD_PSLEAK_PACKAGES)?;
    let ext = dir.join("ext");
    super::bench::build_leaky_ext(&ours, &ext)?;
    let malloc = ("PYTHONMALLOC", "malloc");
    let mut contenders = vec![
        Contender {
            name: "psleak, default backend (trace)",
            python: ours.clone(),
            runner: "psleak",
            env: vec![malloc],
        },
        Contender {
            name: "psleak poll",
            python: ours.clone(),
            runner: "psleak",
            env: vec![("PSLEAK_BACKEND", "poll"), malloc],
        },
        Contender { name: "psleak 0.1.6", python: old, runner: "psleak", env: vec![malloc] },
    ];
    if let Some(before) = std::env::var_os("PSLEAK_BENCH_BEFORE") {
        let python = PathBuf::from(before);
        contenders.push(Contender {
            name: "psleak before (PSLEAK_BENCH_BEFORE)",
            python,
            runner: "psleak",
            env: vec![malloc],
        });
    }

    let names: Vec<String> = std::iter::once("ordinary tests' time in the session (s)".to_string())
        .chain(std::iter::once("the whole session (s)".to_string()))
        .chain(HEAVY_CASES.iter().map(|c| format!("time to verdict: {c} (s)")))
        .collect();
    let mut values = vec![vec![Vec::new(); contenders.len()]; names.len()];
    let mut verdicts = vec![vec![String::new(); contenders.len()]; HEAVY_CASES.len()];
    for round in 0..ROUNDS {
        for (j, contender) in contenders.iter().enumerate() {
            let (ordinary, whole) = session(contender, &ext)?;
            values[0][j].push(ordinary);
            values[1][j].push(whole);
            for (k, case) in HEAVY_CASES.iter().enumerate() {
                let run = run_case(contender, case, &ext)?;
                values[2 + k][j].push(run.seconds);
                verdicts[k][j] = format!("{}{}", run.verdict, if run.right { "" } else { " (wrong)" });
            }
            println!("  [{}/{ROUNDS}] {}: ordinary {ordinary:.2} s, session {whole:.2} s", round + 1, contender.name);
        }
    }

    let mut md = format!(
        "{SECTION_START}\n## 8. What tracing costs the code around a leak test (median of {ROUNDS}, interleaved)\n\n"
    );
    md += "A pytest session of 20 ordinary tests (each builds 100,000 small dicts) with 5 leak tests of leaky_ext \
           among them (two leaks, three clean functions, one pair allocation-heavy: 20,000 mallocs a call), \
           all with PYTHONMALLOC=malloc; and the allocation-heavy pair alone, each in a fresh interpreter \
           (bench/tracing_cost.py, bench/leak_case.py).\n\n";
    md += &format!(
        "| | {} |\n|---|{}\n",
        contenders.iter().map(|c| c.name).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(contenders.len())
    );
    for (i, name) in names.iter().enumerate() {
        let medians: Vec<f64> = values[i].iter().map(|v| super::bench::median(v.clone()).unwrap_or(f64::NAN)).collect();
        let poll = medians[1];
        let cells: Vec<String> = medians
            .iter()
            .enumerate()
            .map(|(j, m)| {
                let verdict = if i >= 2 { format!(" {}", verdicts[i - 2][j]) } else { String::new() };
                format!("{m:.2}{verdict} (×{:.2} poll)", m / poll)
            })
            .collect();
        md += &format!("| {name} | {} |\n", cells.join(" | "));
    }
    println!("\nxtask: what a probe hit costs, per probed function");
    let psleak = build_release()?;
    let venv_python = std::fs::canonicalize(&ours).map_err(|e| e.to_string())?;
    md += &probe_costs(&psleak, &format!("the test venv's CPython ({})", venv_python.display()), &ours, &ext)?;
    // Debian's own CPython is built with LTO: its allocator functions differ (see `psleak probes`).
    let debian = Path::new(DEBIAN_PYTHON);
    let debian_ext = dir.join("ext-debian");
    super::bench::build_leaky_ext(debian, &debian_ext)?;
    md += &probe_costs(&psleak, &format!("Debian's CPython ({DEBIAN_PYTHON}, LTO)"), debian, &debian_ext)?;
    md += SECTION_END;
    md += "\n";
    println!("\n{md}");
    SECTION.write(&root().join("bench/RESULTS.md"), &md)?;
    println!("xtask: wrote its section of bench/RESULTS.md");
    Ok(())
}

/// (the ordinary tests' own time, the whole session's) of one session under `contender`.
fn session(contender: &Contender, ext: &Path) -> Result<(f64, f64)> {
    let out = root().join("target/bench/cost-session.json");
    let started = Instant::now();
    run(Command::new(&contender.python)
        .arg(root().join("bench/tracing_cost.py"))
        .arg("session")
        .arg(&out)
        .env("PYTHONPATH", ext)
        .env_remove("PSLEAK_BACKEND")
        .envs(contender.env.iter().copied())
        .stdout(Stdio::null()))?;
    let whole = started.elapsed().as_secs_f64();
    let times: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    Ok((times.values().filter_map(serde_json::Value::as_f64).sum(), whole))
}

/// The system's CPython, beside the test venv's (pyenv's on this machine kind).
const DEBIAN_PYTHON: &str = "/usr/bin/python3.11";

/// How each probed function is timed by bench/probe_cost.py, untraced and traced two ways.
const PLACEMENTS: [(&str, &[&str]); 5] = [
    ("untraced", &[]),
    ("probes at function entry", &["--probes-at-entry"]),
    ("probes placed", &[]),
    ("probes placed, no Python frames", &["--no-python-frames"]),
    ("probes placed, 512 bytes of stack", &["--stack-depth", "512"]),
];

/// The probe cost table: for each allocation function, what an alloc/free pair costs more
/// traced (its entry and return probes' hit and its family's free's), probes at their
/// function's entry against where psleak places them; and the Python small-call ratio.
fn probe_costs(psleak: &Path, label: &str, python: &Path, ext: &Path) -> Result<String> {
    let script = root().join("bench/probe_cost.py");
    let target = || {
        let mut command = Command::new(python);
        command.arg(&script).env("PYTHONPATH", ext).env_remove("PYTHONMALLOC");
        command
    };
    // name -> placement -> ns per pair, over the rounds
    let mut ns: Vec<(String, [Vec<f64>; 5])> = Vec::new();
    // placement -> the tracer's CPU per event (ns), over the rounds
    let mut cpu: [Vec<f64>; 5] = Default::default();
    for round in 0..ROUNDS {
        for (k, (placement, flags)) in PLACEMENTS.iter().enumerate() {
            let mut waiting = Waiting::start(&mut target())?;
            let tracer = if k == 0 { None } else { Some(attach(psleak, &waiting.pid(), flags)?.0) };
            let line = waiting.go_line()?;
            if let Some(tracer) = tracer {
                let used = cpu_seconds(tracer.0.id())?;
                let (events, _) = stop(tracer)?;
                cpu[k].push(used * 1e9 / events.max(1) as f64);
            }
            let times: Vec<(String, f64)> =
                serde_json::from_str(&line).map_err(|e| format!("probe_cost.py printed {line:?}: {e}"))?;
            for (name, value) in times {
                let at = match ns.iter().position(|(n, _)| *n == name) {
                    Some(at) => at,
                    None => {
                        ns.push((name, Default::default()));
                        ns.len() - 1
                    }
                };
                ns[at].1[k].push(value);
            }
            println!("  [{}/{ROUNDS}] {label}: {placement}", round + 1);
        }
    }
    let sits_on = placements(psleak, &mut target())?;
    let mut md = format!(
        "\n### What a probe hit costs in {label} (median of {ROUNDS}, interleaved; `psleak probes --pid PID` shows the placement)\n\n\
         Each row: an allocation of 64 bytes by that function, freed at once by its family's free, 20,000 times in \
         leaky_ext (bench/probe_cost.py, default allocator); traced by `psleak trace`. The extra time is the \
         function's probe hit (its entry and return probes share one place) and its free's, with the whole \
         stack read at each creation (2 KiB); the last columns without the Python stack (`--no-python-frames`), \
         and with 512 bytes of the native stack (`--stack-depth 512`).\n\n\
         | function | probe sits on | untraced (ns) | extra, probes at entry (ns) | extra, probes placed (ns) | placed / at entry | extra, placed, no Python frames (ns) | extra, placed, 512 B of stack (ns) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for (name, by_placement) in &ns {
        let [untraced, at_entry, placed, native_only, shallow] =
            by_placement.clone().map(|v| median(v).unwrap_or(f64::NAN));
        let (extra_entry, extra_placed) = (at_entry - untraced, placed - untraced);
        // A function under two names (glibc's memalign, aligned_alloc) is probed once, as the first.
        let on = sits_on.iter().find(|(f, _)| f == name).map_or("probed under another name", |(_, on)| on.as_str());
        if name == SMALL_CALL {
            md += &format!(
                "| {name} (untraced, at entry, placed: ×untraced) | | {untraced:.0} | ×{:.0} | ×{:.0} | {:.2} | ×{:.0} | ×{:.0} |\n",
                at_entry / untraced,
                placed / untraced,
                placed / at_entry,
                native_only / untraced,
                shallow / untraced
            );
        } else {
            md += &format!(
                "| {name} | {on} | {untraced:.0} | {extra_entry:.0} | {extra_placed:.0} | {:.2} | {:.0} | {:.0} |\n",
                extra_placed / extra_entry,
                native_only - untraced,
                shallow - untraced
            );
        }
    }
    // pymalloc's free serves PyMem_Free and PyObject_Free both, where their dispatch is followed.
    let frees: Vec<String> = ["free", "PyMem_RawFree", "PyMem_Free", "PyObject_Free"]
        .iter()
        .map(|&free| {
            let on = sits_on.iter().find(|(f, _)| f == free).map_or("probed under another name", |(_, on)| on.as_str());
            format!("{free}: {on}")
        })
        .collect();
    md += &format!("\nThe frees' probes: {}.\n", frees.join("; "));
    let [_, at_entry, placed, native_only, shallow] = cpu.map(|v| median(v).unwrap_or(f64::NAN));
    md += &format!(
        "\nThe tracer's CPU per event it read (user and system time, its attach included): probes at entry \
         {at_entry:.0} ns, placed {placed:.0} ns, placed without Python frames {native_only:.0} ns, placed with \
         512 bytes of stack {shallow:.0} ns.\n"
    );
    Ok(md)
}

/// The user and system CPU seconds process `pid` has used (/proc/PID/stat counts in USER_HZ,
/// 100 on Linux).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("psleak's stat: {e}"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks =
        |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).ok_or_else(|| format!("no CPU times in {stat}"));
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// bench/probe_cost.py's small-call row.
const SMALL_CALL: &str = "Python call of a small function";

/// (function, what its probe sits on: "push at +7", "single-stepped"...) in the bench target.
fn placements(psleak: &Path, target: &mut Command) -> Result<Vec<(String, String)>> {
    let waiting = Waiting::start(target)?;
    let out = Command::new(psleak)
        .args(["probes", "--json", "--pid", &waiting.pid()])
        .output()
        .map_err(|e| format!("cannot run psleak probes: {e}"))?;
    if !out.status.success() {
        return Err(format!("psleak probes failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let probe: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("psleak probes: {e}"))?;
        let (function, offset) =
            (probe["function"].as_str().unwrap_or_default(), probe["offset"].as_u64().unwrap_or(0));
        let instruction = probe["instruction"].as_str().unwrap_or_default();
        let on = match (probe["within"].as_str(), offset) {
            (Some(within), _) => format!("{instruction} at {within}+{offset}"),
            (None, 0) => format!("{instruction} at entry"),
            (None, _) => format!("{instruction} at +{offset}"),
        };
        found.push((function.to_string(), on));
    }
    Ok(found)
}
