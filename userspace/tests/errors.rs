//! Bad input gets one clear line on stderr and exit status 2, never a panic.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{build_target, leaky, run_psleak, Target, Tracer};

/// Asserts a clean refusal: status 2, one `psleak:` line that contains `expected`.
fn assert_refused(args: &[&str], expected: &str) {
    let (code, stderr) = run_psleak(args);
    assert_eq!(code, 2, "exit status for {args:?}; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line of error for {args:?}, got: {stderr}");
    assert!(lines[0].starts_with("psleak: ") && lines[0].contains(expected), "for {args:?}: {stderr}");
}

fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    (2..max).rev().find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()).unwrap()
}

#[test]
fn a_pid_that_does_not_exist() {
    let pid = unused_pid().to_string();
    assert_refused(&["trace", "--pid", &pid], &format!("no process with pid {pid}"));
    assert_refused(&["trace", "--pid", "0"], "no process with pid 0");
    assert_refused(&["probes", "--pid", &pid], &format!("no process with pid {pid}"));
}

#[test]
fn a_kernel_thread() {
    assert_refused(&["trace", "--pid", "2"], "cannot trace pid 2: it is a kernel thread");
    assert_refused(&["probes", "--pid", "2"], "cannot trace pid 2: it is a kernel thread");
}

#[test]
fn a_process_that_already_exited() {
    let mut zombie = Command::new("true").spawn().unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{}/stat", zombie.id())).is_ok_and(|s| s.contains(") Z "))
    }));
    assert_refused(&["trace", "--pid", &zombie.id().to_string()], "it has already exited");
    zombie.wait().unwrap();
}

#[test]
fn a_statically_linked_target() {
    let mut target = Target::start(&mut Command::new(build_target("leaky", true)));
    assert_refused(&["trace", "--pid", &target.pid().to_string()], "has no shared libc mapped");
    target.run("malloc 1 1");
}

/// psleak run as `nobody` with the given capabilities (setpriv, from util-linux).
fn psleak_as_nobody(caps: &str, pid: u32) -> (Option<i32>, String) {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if caps.is_empty() {
        command.arg("--inh-caps=-all");
    } else {
        command.arg(format!("--inh-caps={caps}")).arg(format!("--ambient-caps={caps}"));
    }
    let output = command
        .arg(env!("CARGO_BIN_EXE_psleak"))
        .args(["trace", "--pid", &pid.to_string(), "--duration", "0.5"])
        .output()
        .expect("setpriv (util-linux) runs");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_process_caught_right_after_exec_is_traced() {
    // The target stops at its exec (PTRACE_TRACEME): only the program and the dynamic loader
    // are mapped, libc is not yet. psleak must wait for it, not call the program static.
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(leaky());
    command.stdin(Stdio::piped()).stdout(Stdio::null());
    // SAFETY: ptrace(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| match libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        })
    };
    let mut target = command.spawn().unwrap();
    let pid = target.id() as i32;
    let mut status = 0;
    // SAFETY: waits for our own child's stop at exec.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFSTOPPED(status), "stopped at exec");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("libc.so"), "libc is not mapped yet");

    let tracer = common::psleak()
        .args(["trace", "--pid", &pid.to_string(), "--duration", "0.3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: releases our own stopped child.
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) }, 0);
    let output = tracer.wait_with_output().unwrap();
    target.kill().unwrap();
    target.wait().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("tracing pid"), "{stderr}");
}

#[test]
fn without_privileges() {
    assert!(!Path::new("/run/psleak.sock").exists(), "a daemon on the default socket would be used instead");
    let target = Target::leaky();
    for caps in ["", "+bpf,+perfmon"] {
        let (code, stderr) = psleak_as_nobody(caps, target.pid());
        assert_eq!(code, Some(2), "caps {caps:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("needs root (CAP_SYS_ADMIN"), "caps {caps:?}: {stderr}");
        assert!(
            stderr.contains(
                "or have root run `psleak daemon` and trace through it (at /run/psleak.sock, or --socket PATH)"
            ),
            "the way without sudo too: {stderr}"
        );
    }
    // A pid that is not there is the first thing wrong, whoever asks.
    let gone = unused_pid();
    let (code, stderr) = psleak_as_nobody("", gone);
    assert_eq!(
        (code, stderr.trim_end()),
        (Some(2), &*format!("psleak: no process with pid {gone}: check the pid with `ps -p {gone}`"))
    );
}

#[test]
fn cap_sys_admin_suffices_for_ones_own_process_but_not_anothers() {
    let as_nobody = |mut c: Command| {
        let mut wrapped = Command::new("setpriv");
        wrapped.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(c.get_program()).args(c.get_args());
        c = wrapped;
        c
    };
    let mine = Target::start(&mut as_nobody(Command::new(leaky())));
    let (code, stderr) = psleak_as_nobody("+sys_admin", mine.pid());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("tracing pid"), "{stderr}");

    let roots = Target::leaky();
    let (code, stderr) = psleak_as_nobody("+sys_admin", roots.pid());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot trace pid {}: it belongs to uid 0, and you are uid 65534", roots.pid())),
        "{stderr}"
    );
}

#[test]
fn no_btf() {
    let target = Target::leaky();
    let pid = target.pid().to_string();
    assert_refused(&["trace", "--pid", &pid, "--btf", "/nonexistent/vmlinux"], "no BTF file at /nonexistent/vmlinux");
}

#[test]
fn invalid_arguments() {
    let target = Target::leaky();
    let pid = target.pid().to_string();
    for args in [
        vec!["trace", "--pid", &pid, "--interval", "0"],
        vec!["trace", "--pid", &pid, "--interval", "soon"],
        vec!["trace", "--pid", &pid, "--ring-mib", "3"],
        vec!["trace", "--pid", &pid, "--interval", "1e300"],
        vec!["trace", "--pid", &pid, "--duration", "1e300"],
        vec!["trace", "--pid", &pid, "--min-age", "1e300"],
        vec!["trace", "--pid", &pid, "--duration", "inf"],
        vec!["trace", "--pid", &pid, "--interval", "NaN"],
        vec!["daemon", "--idle-timeout", "1e300"],
        vec!["trace", "--pid", "-5"],
        vec!["trace", "--pid", &pid, "--", "true"],
        vec!["trace", "--bogus"],
        vec!["trace"],
        vec!["untrace"],
    ] {
        // One line, as every refusal (clap's own spread over five, its usage and a tip too).
        let (code, stderr) = run_psleak(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("psleak: ") && stderr.contains("--help says more"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_refused(
        &["trace", "--pid", &pid, "--min-size", "100", "--max-size", "10"],
        "--max-size is smaller than --min-size",
    );
    // psleak alone: its help, which names its commands, and a failure.
    let (code, stderr) = run_psleak(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("Commands:") && stderr.contains("trace"), "{stderr}");
}

#[test]
fn a_target_that_exits_while_traced_ends_the_session_with_a_report() {
    let mut target = Target::leaky();
    let tracer = Tracer::attach(target.pid(), &[]);
    target.run("malloc 5 10");
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    let output = tracer.into_output();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["stopped_by"], "target_exited");
    assert_eq!(report["process"], serde_json::Value::Null, "no metrics of a process that is gone");
    assert_eq!(report["live"]["heap_blocks"], 5);
    assert_eq!(report["suspects"][0]["site"]["function"], "leak_malloc", "named after the target is gone: {report:#}");
}

#[test]
fn a_target_that_exits_during_attach() {
    // Targets that live for 0 to 300 ms: psleak meets each before, during or after its attach
    // (~0.15 s from its start here). Every outcome must be a clean one.
    let mut outcomes = std::collections::BTreeSet::new();
    for delay_ms in (0..300).step_by(15) {
        let mut target = Command::new(leaky()).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let pid = target.id().to_string();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            drop(target.stdin.take()); // EOF: the target exits
            target.wait().unwrap();
        });
        let output = common::psleak().args(["trace", "--pid", &pid, "--interval", "3600"]).output().unwrap();
        killer.join().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        let outcome = match output.status.code() {
            Some(0) if stdout.contains("stopped (the target exited)") => "traced until it exited",
            Some(2) if stderr.contains("exited while psleak was attaching") => "exited during attach",
            Some(2)
                if ["it has already exited", "it is exiting", "no process with pid"]
                    .iter()
                    .any(|m| stderr.contains(m)) =>
            {
                "gone before attach"
            }
            other => panic!("unclean outcome {other:?}: {stderr} {stdout}"),
        };
        outcomes.insert(outcome);
    }
    assert!(outcomes.contains("traced until it exited"), "{outcomes:?}");
}

#[test]
fn a_closed_output_ends_the_session() {
    // `psleak trace ... | head -1`: once the reader is gone, psleak stops by itself.
    let target = Target::leaky();
    let mut tracer = common::psleak()
        .args(["trace", "--json", "--interval", "0.2", "--pid", &target.pid().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(tracer.stdout.take());
    let ended = common::wait_until(Duration::from_secs(10), || tracer.try_wait().unwrap().is_some());
    let _ = tracer.kill();
    assert!(ended, "psleak kept tracing with no reader");
    let output = tracer.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
}

#[test]
fn tracefs_is_not_needed() {
    // In a private mount namespace, empty tmpfs over tracefs and debugfs: psleak attaches
    // through the uprobe PMU and BTF tracepoints, which need neither.
    let mut target = Target::leaky();
    let script = format!(
        "mount -t tmpfs none /sys/kernel/tracing && mount -t tmpfs none /sys/kernel/debug && \
         test -z \"$(ls /sys/kernel/tracing)\" && exec {} trace --json --pid {} --duration 1",
        env!("CARGO_BIN_EXE_psleak"),
        target.pid()
    );
    let tracer =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    target.run("malloc 1 1");
    let stderr = String::from_utf8_lossy(&tracer.stderr);
    assert!(tracer.status.success(), "{stderr}");
    assert!(stderr.contains("tracing pid"), "{stderr}");
}

#[test]
fn an_explicit_btf_file_is_used() {
    let target = Target::leaky();
    let (code, stderr) = run_psleak(&[
        "trace",
        "--pid",
        &target.pid().to_string(),
        "--btf",
        "/sys/kernel/btf/vmlinux",
        "--duration",
        "0.3",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_refused(
        &["trace", "--pid", &target.pid().to_string(), "--btf", "/etc/hostname"],
        "/etc/hostname is not a BTF file",
    );
}
