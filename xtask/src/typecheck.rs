//! The package's types as a user's type checker sees them: mypy --strict and pyright must pass
//! tests/typing/user_tests.py (ordinary leak tests) and report an error on each line of
//! tests/typing/mistakes.py marked MISTAKE, and on no other.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use super::{root, Result};

/// Each checker on each file, as a named result (the suite counts each as a test).
pub fn checks() -> Vec<(&'static str, Result)> {
    let bin = root().join("target/venv/bin");
    let mypy = || {
        let mut command = Command::new(bin.join("mypy"));
        command.args(["--strict", "--cache-dir"]).arg(root().join("target/mypy-cache"));
        command
    };
    let pyright = || {
        let mut command = Command::new(bin.join("pyright"));
        command.arg("--pythonpath").arg(bin.join("python"));
        command
    };
    vec![
        ("mypy --strict passes a user's leak tests", refused_lines(mypy(), "user_tests.py", ": error:")),
        ("mypy refuses each mistake", refused_lines(mypy(), "mistakes.py", ": error:")),
        ("pyright passes a user's leak tests", refused_lines(pyright(), "user_tests.py", " - error:")),
        ("pyright refuses each mistake", refused_lines(pyright(), "mistakes.py", " - error:")),
    ]
}

/// Runs `checker` on tests/typing/`file`; Ok when the lines it reports an error on (`error` ends
/// each report's location) are the file's MISTAKE lines.
fn refused_lines(mut checker: Command, file: &str, error: &str) -> Result {
    let path = root().join("tests/typing").join(file);
    let out = checker.arg(&path).current_dir(root()).output().map_err(|e| format!("cannot run {checker:?}: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    let refused = error_lines(&said, file, error);
    let expected = mistake_lines(&path)?;
    match refused == expected {
        true => Ok(()),
        false => Err(format!("errors on lines {refused:?}, mistakes on {expected:?}:\n{said}")),
    }
}

/// The lines of `file` that a checker's output reports an error on: `…file:LINE: error:` (mypy)
/// or `…file:LINE:COL - error:` (pyright).
fn error_lines(output: &str, file: &str, error: &str) -> BTreeSet<u32> {
    output
        .lines()
        .filter_map(|line| {
            let (location, _) = line.split_once(error)?;
            let (_, position) = location.rsplit_once(&format!("{file}:"))?;
            position.split(':').next()?.parse().ok()
        })
        .collect()
}

fn mistake_lines(path: &Path) -> Result<BTreeSet<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((1..).zip(text.lines()).filter(|(_, line)| line.contains("# MISTAKE")).map(|(n, _)| n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_error_lines_of_mypy_and_pyright() {
        let mypy = "tests/typing/mistakes.py:5: error: Argument 1 [arg-type]\nFound 1 error in 1 file";
        assert_eq!(error_lines(mypy, "mistakes.py", ": error:"), BTreeSet::from([5]));
        let pyright =
            "/w/tests/typing/mistakes.py\n  /w/tests/typing/mistakes.py:9:47 - error: Argument\n    \"x\" - error: y";
        assert_eq!(error_lines(pyright, "mistakes.py", " - error:"), BTreeSet::from([9]));
    }
}
