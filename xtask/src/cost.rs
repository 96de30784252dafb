//! `cargo xtask bench-cost`: what tracing costs the code around a leak test, side by side in
//! one run (contenders interleaved, medians of `ROUNDS`): a pytest session of ordinary tests
//! with leak tests among them, and the allocation-heavy pair of leaky_ext. Its tables go in
//! their own section of bench/RESULTS.md, which `cargo xtask bench` keeps.
//!
//! `PSLEAK_BENCH_BEFORE=/path/to/python` adds a contender: another build of psleak installed
//! in that interpreter (the one before a change, to measure the change).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::bench::{run_case, Contender};
use super::{python_with_psleak, root, run, Result, Section};

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
