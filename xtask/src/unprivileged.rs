//! Our leak tests run by an unprivileged user through root's `psleak daemon`, as on a CI
//! runner; their verdicts must be the privileged run's. Everything that user runs is put in a
//! directory of its own under /tmp, with Debian's python3: the checkout and the Python that
//! built the package may be somewhere only root can enter (e.g. pyenv's, under /root).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{pytest, root, run, wheel, Guard, PytestCounts, Result, PYTEST};

/// Created by the test setup when missing: a system user with nothing but its own group.
const USER: &str = "psleak-ci";

/// The tests run that way: leaky_ext's deliberate leaks (each caught and named), their clean
/// twins and the controls (each passing).
const TESTS: &str = "test_leaky_ext.py";

/// Runs `TESTS` twice with the same interpreter: as root with a private collector, then as
/// `USER` through a daemon admitting `USER`'s group (socket mode 0660); a test whose outcome
/// differs counts as a failure, as does a daemon that does not end cleanly on SIGTERM.
pub fn run_through_daemon() -> Result<PytestCounts> {
    let (uid, gid) = create_user(USER)?;
    let dir = std::env::temp_dir().join("psleak-ci-daemon");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    run(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", PYTEST, "setuptools"])
        .arg(wheel::wheel()?))?;
    // The user's own: its home, and the tests (the extension is built beside them).
    let home = dir.join("home");
    run(Command::new("cp").arg("-r").arg(root().join("tests/python")).arg(&home))?;
    run(Command::new("chown").args(["-R", &format!("{uid}:{gid}")]).arg(&home))?;
    let pytest_run = |report: &Path| {
        let mut command = Command::new(&python);
        command
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:instafail"])
            .arg(TESTS)
            .arg(format!("--psleak-report={}", report.display()))
            .current_dir(&home)
            .env("PSLEAK_BACKEND", "trace")
            .env("PYTHONMALLOC", "malloc")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1");
        command
    };

    println!("xtask: Python tests (leaky_ext, Debian's python3, as root with a private collector)");
    let reference = dir.join("privileged.json");
    let mut counts = pytest(&mut pytest_run(&reference))?;

    let socket = dir.join("psleak.sock");
    let log = std::fs::File::create(dir.join("daemon.log")).map_err(|e| e.to_string())?;
    let mut daemon = Guard(
        // The package's own `psleak` script: what `pip install psleak` gives a CI runner.
        Command::new(venv.join("bin/psleak"))
            .args(["daemon", "--socket-mode", "660", "--socket-group", USER, "--socket"])
            .arg(&socket)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start psleak daemon: {e}"))?,
    );
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            return Err(format!("psleak daemon did not start: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("xtask: Python tests (leaky_ext, Debian's python3, as user {USER} through root's psleak daemon)");
    let report = home.join("report.json");
    let unprivileged = pytest(pytest_run(&report).uid(uid).gid(gid).env("HOME", &home).env("PSLEAK_SOCKET", &socket))?;
    counts.passed += unprivileged.passed;
    counts.failed += unprivileged.failed;

    run(Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]))?;
    let status = daemon.0.wait().map_err(|e| e.to_string())?;
    if !status.success() || socket.exists() {
        counts.failed += 1;
        println!("xtask: psleak daemon did not stop cleanly on SIGTERM ({status})");
    }
    counts.failed += compare_verdicts(&report, &reference);
    Ok(counts)
}

/// `user`'s uid and gid, after creating it if needed.
pub fn create_user(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, user]).stderr(Stdio::null()).output().ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        println!("xtask: creating the unprivileged user {user}");
        run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ]))?;
    }
    Ok((id("-u").ok_or("useradd made no user")?, id("-g").ok_or("useradd made no group")?))
}

/// How many tests of `report` ended otherwise than in `reference`, or are missing from it.
fn compare_verdicts(report: &Path, reference: &Path) -> u64 {
    let outcomes = |path: &Path| -> BTreeMap<String, (String, String, u64)> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        json["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let field = |name: &str| f[name].as_str().map(str::to_string);
                Some((field("test")?, (field("outcome")?, field("backend")?, f["calls"].as_u64().unwrap_or(0))))
            })
            .collect()
    };
    let (ours, reference) = (outcomes(report), outcomes(reference));
    if ours.is_empty() {
        println!("xtask: the unprivileged run wrote no report to {}", report.display());
        return 1;
    }
    let mut differences = 0;
    let mut same_calls = 0;
    for (test, (outcome, backend, calls)) in &ours {
        match reference.get(test) {
            Some((expected, _, reference_calls)) if expected == outcome && backend == "trace" => {
                same_calls += u64::from(calls == reference_calls);
            }
            other => {
                differences += 1;
                println!("xtask: {test}: {outcome} by {backend} through the daemon, privileged: {other:?}");
            }
        }
    }
    println!(
        "xtask: through the daemon as {USER}: {} tests, {} with the privileged run's verdict ({same_calls} after as many calls)",
        ours.len(),
        ours.len() as u64 - differences,
    );
    differences
}
