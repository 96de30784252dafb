//! `psleak trace -- CMD ARGS...`: the command started stopped at its entry point, so that the
//! probes are in before its first instruction of its own. At the exec only the program and the
//! loader are mapped; at the entry point (AT_ENTRY) the loader has mapped every library the
//! probes go on (libc, libpython). The child asks to be traced (PTRACE_TRACEME), stops at its
//! exec, gets a breakpoint on its entry, and is held there until `release`.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use crate::error::Error;

/// A command started and held at its entry point.
pub struct Launched {
    pub child: Child,
    /// How the user wrote it, for messages.
    pub name: String,
    held: bool,
}

impl Launched {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the command run on (PTRACE_DETACH): once the probes are in.
    pub fn release(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.held, false) {
            // SAFETY: ptrace on our own stopped tracee; no pointers passed.
            let detached = unsafe { libc::ptrace(libc::PTRACE_DETACH, self.pid() as libc::pid_t, 0, 0) };
            if detached != 0 {
                return Err(Error::Io(format!("cannot let {} run", self.name), io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

impl Drop for Launched {
    /// A command never released (the attach failed) is not left stopped: it is killed.
    fn drop(&mut self) {
        if self.held {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `command` and holds it at its entry point.
pub fn launch(command: &[OsString]) -> Result<Launched, Error> {
    let (program, args) = command.split_first().ok_or_else(|| Error::Refused("no command to launch".into()))?;
    let name = program.to_string_lossy().into_owned();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: between fork and exec, only ptrace(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| match libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Io(format!("cannot run {name}"), e))?;
    let launched = Launched { child, name, held: true };
    hold_at_entry(&launched)?;
    Ok(launched)
}

/// From the stop at exec to the stop at the entry point, the entry's instruction restored
/// (x86_64: an int3, and the instruction pointer put back on it).
fn hold_at_entry(launched: &Launched) -> Result<(), Error> {
    let pid = launched.pid() as libc::pid_t;
    let failed = |what: &str| {
        Error::Io(format!("cannot stop {} at its entry point: {what}", launched.name), io::Error::last_os_error())
    };
    wait_for_trap(pid).map_err(|()| failed("it did not stop at its exec"))?;
    let entry = entry_point(pid).ok_or_else(|| failed("no AT_ENTRY in its auxv"))?;
    // SAFETY: ptrace on our own stopped tracee; PEEKTEXT returns the word, POKETEXT takes it by
    // value; errno tells a failed peek from a word of -1.
    unsafe {
        *libc::__errno_location() = 0;
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, entry as *mut libc::c_void, 0);
        if word == -1 && *libc::__errno_location() != 0 {
            return Err(failed("its entry point cannot be read"));
        }
        let trap = (word & !0xff) | 0xcc; // int3 in the entry's first byte
        if libc::ptrace(libc::PTRACE_POKETEXT, pid, entry as *mut libc::c_void, trap) != 0
            || libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) != 0
        {
            return Err(failed("its entry point cannot be written"));
        }
        wait_for_trap(pid).map_err(|()| failed("it ended before its entry point"))?;
        let mut regs = std::mem::zeroed::<libc::user_regs_struct>();
        if libc::ptrace(libc::PTRACE_POKETEXT, pid, entry as *mut libc::c_void, word) != 0
            || libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs as *mut libc::user_regs_struct) != 0
        {
            return Err(failed("its registers cannot be read"));
        }
        regs.rip = entry; // back onto the restored instruction
        if libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &regs as *const libc::user_regs_struct) != 0 {
            return Err(failed("its registers cannot be written"));
        }
    }
    Ok(())
}

/// Waits for the tracee's next SIGTRAP stop, passing on any other signal it gets meanwhile;
/// Err if it ends first.
fn wait_for_trap(pid: libc::pid_t) -> Result<(), ()> {
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; writes one int.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid || !libc::WIFSTOPPED(status) {
            return Err(());
        }
        match libc::WSTOPSIG(status) {
            libc::SIGTRAP => return Ok(()),
            // SAFETY: resumes our own stopped tracee with the signal it was stopped by.
            signal => unsafe {
                libc::ptrace(libc::PTRACE_CONT, pid, 0, signal);
            },
        }
    }
}

/// The program's entry point, from the auxiliary vector the kernel gave it.
fn entry_point(pid: libc::pid_t) -> Option<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).ok()?;
    auxv.chunks_exact(16).find_map(|pair| {
        let (key, value) = pair.split_at(8);
        match u64::from_ne_bytes(key.try_into().ok()?) {
            libc::AT_ENTRY => Some(u64::from_ne_bytes(value.try_into().ok()?)),
            _ => None,
        }
    })
}
