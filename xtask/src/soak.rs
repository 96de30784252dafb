//! `cargo xtask soak`: `psleak daemon` under a long load, on demand (not in CI; ~30 minutes).
//! First 10,000 sessions attached, measured once and detached by clients of one user; then ten
//! minutes of another user's hostile clients (dripping, half lines, endless lines, garbage,
//! other users' pids, silent crowds, clients that read no reply) beside good clients whose
//! every batch must be exact. The daemon's resident memory and open fds before, between and
//! after go into their own section of bench/RESULTS.md, which `cargo xtask bench` keeps.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{build_c, build_release, root, unprivileged::create_user, Guard, Result, Section};

const SESSIONS: u32 = 10_000;
const CHURN_CLIENTS: u32 = 8;
const HOSTILE_SECONDS: u32 = 600;
const GOOD_CLIENTS: u32 = 4;
const HOSTILE_CLIENTS: u32 = 4;

/// The markers of the soak's section in bench/RESULTS.md.
pub const SECTION_START: &str = "<!-- soak: written by cargo xtask soak -->";
pub const SECTION_END: &str = "<!-- /soak -->";
pub const SECTION: Section = Section { start: SECTION_START, end: SECTION_END };

pub fn soak() -> Result {
    let psleak = build_release()?;
    let dir = std::env::temp_dir().join("psleak-soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    // Where the users may read them (the checkout may be under /root).
    let leaky = dir.join("leaky");
    std::fs::copy(build_c("leaky")?, &leaky).map_err(|e| e.to_string())?;
    let client = dir.join("soak_client.py");
    std::fs::copy(root().join("bench/soak_client.py"), &client).map_err(|e| e.to_string())?;
    let (good_user, hostile_user) = (create_user("psleak-test-a")?, create_user("psleak-test-b")?);

    let socket = dir.join("psleak.sock");
    let log = std::fs::File::create(dir.join("daemon.log")).map_err(|e| e.to_string())?;
    let mut daemon = Guard(
        Command::new(&psleak)
            .args(["daemon", "--socket-mode", "666", "--socket"])
            .arg(&socket)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start psleak daemon: {e}"))?,
    );
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("psleak daemon did not start".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let clients = |mode: &str, how_long: String, user: (u32, u32), n: u32| -> Result<Vec<Guard>> {
        (0..n)
            .map(|_| {
                let mut command = Command::new("python3");
                command.arg(&client).arg(&socket).arg(&leaky).arg(mode).arg(&how_long);
                command.uid(user.0).gid(user.1).current_dir("/").stdout(Stdio::piped());
                command.spawn().map(Guard).map_err(|e| format!("cannot run {}: {e}", client.display()))
            })
            .collect()
    };
    let before = sample(&socket)?;

    println!("xtask: soak: {SESSIONS} sessions attached and detached by {CHURN_CLIENTS} clients");
    let churn_started = Instant::now();
    let churn = totals(clients("churn", format!("x{}", SESSIONS / CHURN_CLIENTS), good_user, CHURN_CLIENTS)?)?;
    let churn_took = churn_started.elapsed();
    let between = settled(&socket)?;

    println!("xtask: soak: {HOSTILE_SECONDS} s of {HOSTILE_CLIENTS} hostile clients beside {GOOD_CLIENTS} good ones");
    let hostile = clients("hostile", HOSTILE_SECONDS.to_string(), hostile_user, HOSTILE_CLIENTS)?;
    let good = totals(clients("good", HOSTILE_SECONDS.to_string(), good_user, GOOD_CLIENTS)?)?;
    let hostile = totals(hostile)?;
    let after = settled(&socket)?;

    let stopping = Instant::now();
    super::run(Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]))?;
    let status = daemon.0.wait().map_err(|e| e.to_string())?;
    let stop_took = stopping.elapsed();

    let count = |counts: &serde_json::Value, key: &str| counts[key].as_u64().unwrap_or(0);
    let section = format!(
        "{SECTION_START}\n## 7. The daemon under a long load (`cargo xtask soak`, not in CI)\n\n\
         {SESSIONS} sessions attached, measured once and detached by {CHURN_CLIENTS} clients of one user \
         ({:.0} s, {:.1} sessions/s; {} exact of {} measured, {} refused and retried), then \
         {HOSTILE_SECONDS} s of {HOSTILE_CLIENTS} clients of another user attacking without pause ({} attacks: \
         dripping, half lines, 50 MiB lines, garbage, other users' pids, silent crowds, replies left unread) \
         beside {GOOD_CLIENTS} good clients ({} of {} batches exact). SIGTERM then ended the daemon in \
         {:.2} s ({status}).\n\n\
         | daemon | at start | after {SESSIONS} sessions | after {HOSTILE_SECONDS} s of hostile clients |\n\
         |---|---:|---:|---:|\n\
         | resident memory | {} | {} | {} |\n\
         | open fds | {} | {} | {} |\n\
         | sessions | {} | {} | {} |\n\
         {SECTION_END}\n",
        churn_took.as_secs_f64(),
        f64::from(count(&churn, "sessions") as u32) / churn_took.as_secs_f64(),
        count(&churn, "exact"),
        count(&churn, "sessions"),
        count(&churn, "refused"),
        count(&hostile, "attacks"),
        count(&good, "exact"),
        count(&good, "batches"),
        stop_took.as_secs_f64(),
        mib(before.resident),
        mib(between.resident),
        mib(after.resident),
        before.fds,
        between.fds,
        after.fds,
        before.sessions,
        between.sessions,
        after.sessions,
    );
    print!("{section}");
    SECTION.write(&root().join("bench/RESULTS.md"), &section)?;
    println!("xtask: wrote the soak's section of bench/RESULTS.md");
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

struct Sample {
    resident: u64,
    fds: u64,
    sessions: usize,
}

/// The daemon's state as its status request tells root.
fn sample(socket: &Path) -> Result<Sample> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("the daemon does not answer: {e}"))?;
    stream.write_all(b"{\"op\":\"status\"}\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| e.to_string())?;
    let status: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
    Ok(Sample {
        resident: status["resident_bytes"].as_u64().unwrap_or(0),
        fds: status["open_fds"].as_u64().unwrap_or(0),
        sessions: status["sessions"].as_array().map_or(0, Vec::len),
    })
}

/// A sample once the clients' sessions have ended (or after 30 s).
fn settled(socket: &Path) -> Result<Sample> {
    let started = Instant::now();
    loop {
        let now = sample(socket)?;
        if now.sessions == 0 || started.elapsed() > Duration::from_secs(30) {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for clients and adds up the counts each printed.
fn totals(clients: Vec<Guard>) -> Result<serde_json::Value> {
    let mut sum = serde_json::Map::new();
    for mut client in clients {
        let mut line = String::new();
        BufReader::new(client.0.stdout.take().ok_or("no stdout")?).read_line(&mut line).map_err(|e| e.to_string())?;
        let counts: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("a soak client failed ({e}): {line:?}"))?;
        for (key, value) in counts.as_object().into_iter().flatten() {
            let total = sum.entry(key.clone()).or_insert(0.into());
            *total = (total.as_u64().unwrap_or(0) + value.as_u64().unwrap_or(0)).into();
        }
        let _ = client.0.wait();
    }
    Ok(sum.into())
}
