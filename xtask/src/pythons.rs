//! Every CPython the package supports, as this machine has them: pyenv's 3.9–3.13 and Debian's
//! python3. The suite runs the package's tests under each (the main venv's interpreter runs
//! them all, with psleak 0.1.6's; the others run ours), each in a venv of its own under target/
//! with the one abi3 wheel installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{output, root, run, Result};

/// The minor versions the package supports (pyproject.toml's classifiers).
const SUPPORTED: &[&str] = &["3.9", "3.10", "3.11", "3.12", "3.13"];

/// What every interpreter's venv needs for our tests: pytest 9 has left 3.9.
const TEST_DEPS: &[&str] = &[
    "pytest==9.2.0; python_version >= '3.10'",
    "pytest==8.4.2; python_version < '3.10'",
    "pytest-xdist==3.8.0",
    "jsonschema==4.25.1",
    "setuptools",
];

/// An interpreter to test under: what to call it, and its executable.
pub struct Interpreter {
    pub name: String,
    pub python: PathBuf,
    /// Built with LTO, its object allocator inlined out of the probes' sight (Debian's).
    pub inlines_its_allocator: bool,
}

/// pyenv's newest build of each supported version, then Debian's python3, leaving out `main`'s
/// (the venv that runs everything); an error names a supported version this machine lacks, so
/// that a missing interpreter is never a silent pass.
pub fn others(main: &Path) -> Result<Vec<Interpreter>> {
    let versions = pyenv_root()?.join("versions");
    let mut builds: Vec<String> = std::fs::read_dir(&versions)
        .map_err(|e| format!("{}: {e}", versions.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    // Newest patch first: 3.9.18 before 3.9.2.
    builds.sort_by_key(|b| std::cmp::Reverse(b.split('.').map(|n| n.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>()));
    let main_base = base_executable(main)?;
    let mut found = Vec::new();
    for minor in SUPPORTED {
        let build = builds
            .iter()
            .find(|b| b.strip_prefix(minor).is_some_and(|rest| rest.starts_with('.')))
            .ok_or_else(|| format!("no CPython {minor} under {}: `pyenv install {minor}`", versions.display()))?;
        let python = versions.join(build).join("bin/python3");
        if base_executable(&python)? != main_base {
            found.push(Interpreter { name: format!("pyenv's {build}"), python, inlines_its_allocator: false });
        }
    }
    found.push(Interpreter {
        name: "Debian's python3".into(),
        python: "/usr/bin/python3".into(),
        inlines_its_allocator: true,
    });
    Ok(found)
}

fn pyenv_root() -> Result<PathBuf> {
    Ok(PathBuf::from(output(Command::new("pyenv").arg("root"))?.trim()))
}

/// The interpreter behind a venv's python, or the python itself.
fn base_executable(python: &Path) -> Result<PathBuf> {
    let script = "import os, sys; print(os.path.realpath(getattr(sys, '_base_executable', sys.executable)))";
    Ok(PathBuf::from(output(Command::new(python).args(["-c", script]))?.trim()))
}

/// A venv for `interpreter` under target/ (made once), with the test dependencies and `wheel`.
pub fn venv(interpreter: &Interpreter, wheel: &Path) -> Result<PathBuf> {
    let name: String =
        interpreter.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    let venv = root().join("target/venvs").join(name);
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new(&interpreter.python).args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--disable-pip-version-check"]).args(TEST_DEPS))?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]).arg(wheel))?;
    Ok(python)
}
