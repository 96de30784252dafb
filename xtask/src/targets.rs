//! `cargo xtask check-targets`: type-checks and lints what this Linux machine cannot run — the Windows
//! backend (ETW) and the polling metrics of Windows, macOS and FreeBSD — with each target's
//! standard library from rustup. An outside download must never block the Linux suite: a
//! target that cannot be installed is reported in one loud line and skipped.

use std::process::{Command, Stdio};

use crate::{root, run, Result};

/// (target, what its check covers).
const TARGETS: &[(&str, &str)] = &[
    ("x86_64-pc-windows-msvc", "Windows: ETW sessions and records, polling fallback, Python module"),
    ("x86_64-apple-darwin", "macOS: polling metrics, Python module"),
    ("x86_64-unknown-freebsd", "FreeBSD: polling metrics, Python module"),
];

/// The crates with code for those platforms (their tests included).
const CRATES: &[&str] = &["psleak", "psleak-etw", "psleak-python"];

/// Checks every target; Err only when code fails to type-check.
pub fn check() -> Result {
    let mut checked = Vec::new();
    for (target, covers) in TARGETS {
        if !add(target) {
            println!(
                "xtask: !!!!! SKIPPED {target}: `rustup target add {target}` failed; {covers} NOT type-checked !!!!!"
            );
            continue;
        }
        println!("xtask: cargo clippy --target {target} ({covers})");
        let mut cargo = Command::new("cargo");
        cargo.args(["clippy", "--locked", "--all-targets", "--target", target]).current_dir(root());
        for krate in CRATES {
            cargo.args(["-p", krate]);
        }
        // PyO3 cross-checks without the target's interpreter when told the Python version.
        // A warning fails, the workspace's lints too: code that no one runs here must at least
        // stay clean.
        run(cargo.env("PYO3_CROSS_PYTHON_VERSION", "3.11").args(["--", "-D", "warnings"]))?;
        checked.push(*target);
    }
    println!(
        "xtask: type-checked for {}",
        if checked.is_empty() { "no other target".into() } else { checked.join(", ") }
    );
    Ok(())
}

/// Installs `target`'s standard library with rustup (from rustup's own distribution); false
/// when that fails.
pub fn add(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "add", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
