//! `psleak trace -- CMD ARGS...`: the command started stopped at its entry point, so that the
//! probes are in before its first instruction of its own, and held at its exit, so that what it
//! did last is named while its memory is still there. At the exec only the program and the
//! loader are mapped; at the entry point (AT_ENTRY) the loader has mapped every library the
//! probes go on (libc, libpython). The child asks to be traced (PTRACE_TRACEME), stops at its
//! exec, gets a breakpoint on its entry, and is held there until `release`. From then on psleak
//! follows it (PTRACE_SEIZE, PTRACE_O_TRACEEXIT): it runs freely, its signals passed on, until
//! its main thread exits; there it waits until psleak has read every event it made (`let_go`).
//! Once it has exited, its code mappings and its Python code objects are gone: a library it
//! loaded late (an extension module) and every Python frame of its last events could no longer
//! be named.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::error::{say, Error};

/// Where a launched command is, for psleak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Stopped at its entry point, traced since its exec: killed if never released.
    AtEntry,
    /// Running, followed so that it stops at its exit.
    Followed,
    /// Stopped at its exit, its memory still mapped, until it is let go.
    AtExit,
    /// Not traced any more.
    Free,
}

/// A command started for the trace: held at its entry point until released, then followed to
/// its exit.
pub struct Launched {
    child: Child,
    /// How the user wrote it, for messages.
    pub name: String,
    hold: Hold,
    /// Its exit status, if psleak's own wait took it.
    ended: Option<ExitStatus>,
    /// It was let go on its way out (from its exit, or with a signal it got): it may take a
    /// moment to end.
    ending: bool,
}

impl Launched {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn raw_pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Lets the command run on from its entry point (once the probes are in), followed to its
    /// exit. If it cannot be followed, it runs on all the same, and the user is told what that
    /// costs.
    pub fn release(&mut self) -> Result<(), Error> {
        if self.hold != Hold::AtEntry {
            return Ok(());
        }
        // SAFETY: ptrace on our own stopped tracee; no pointers passed.
        if unsafe { libc::ptrace(libc::PTRACE_DETACH, self.raw_pid(), 0usize, 0usize) } != 0 {
            return Err(Error::Io(format!("cannot let {} run", self.name), io::Error::last_os_error()));
        }
        self.hold = Hold::Free;
        // Seized, not traced as before: its stops for job control are its own (PTRACE_LISTEN).
        let options = libc::PTRACE_O_TRACEEXIT as usize;
        // SAFETY: ptrace on our own child; the options travel in the data argument.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, self.raw_pid(), 0usize, options) } == 0 {
            self.hold = Hold::Followed;
            return Ok(());
        }
        let why = io::Error::last_os_error();
        if self.status().is_none() {
            say(&format!(
                "psleak: cannot hold {} at its exit ({why}): what it does in its last moments may go unnamed",
                self.name
            ));
        }
        Ok(())
    }

    /// Takes in what became of the command since last asked: passes its signals on, and
    /// returns true when it is stopped at its exit (its main thread's), to be let go.
    pub fn at_exit(&mut self) -> bool {
        while self.hold == Hold::Followed {
            let Some(status) = self.wait(libc::WNOHANG) else { break };
            self.resume(status);
        }
        self.hold == Hold::AtExit
    }

    /// Lets the command go: from its exit, or wherever it is now (the trace ends first, and it
    /// runs on, with any signal it was stopped by).
    pub fn let_go(&mut self) {
        if self.hold == Hold::Followed {
            // SAFETY: ptrace on our own seized tracee; no pointers passed.
            if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, self.raw_pid(), 0usize, 0usize) } != 0 {
                self.hold = Hold::Free; // it is gone: the wait says how it ended
                return;
            }
            // Until it stops for the interrupt; signals that come first go on with it.
            while self.hold == Hold::Followed {
                let Some(status) = self.wait(0) else {
                    self.hold = Hold::Free;
                    break;
                };
                match stop_of(status) {
                    Some(Stop::Signal(signal)) => self.detach(signal),
                    // On its way out: it ends in a moment.
                    Some(Stop::Exit) => {
                        self.detach(0);
                        self.ending = true;
                    }
                    Some(_) => self.detach(0),
                    None => self.resume(status),
                }
            }
        }
        if self.hold == Hold::AtExit {
            self.detach(0);
            self.ending = true;
        }
    }

    /// What became of it, once it is let go: its exit status if it ended (one let go on its
    /// way out is given a moment), None if it runs on.
    pub fn status(&mut self) -> Option<ExitStatus> {
        let patience = if self.ending { ENDING_PATIENCE } else { Duration::ZERO };
        let started = Instant::now();
        loop {
            if self.ended.is_none() {
                self.ended = self.child.try_wait().ok().flatten();
            }
            if self.ended.is_some() || started.elapsed() >= patience {
                return self.ended;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The next wait status of the command (`flags`: WNOHANG or 0), if there is one; an end
    /// is taken note of.
    fn wait(&mut self, flags: libc::c_int) -> Option<libc::c_int> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; writes one int.
            let waited = unsafe { libc::waitpid(self.raw_pid(), &mut status, flags | libc::__WALL) };
            if waited == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if waited != self.raw_pid() {
                return None;
            }
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.ended = Some(ExitStatus::from_raw(status));
                self.hold = Hold::Free;
            }
            return Some(status);
        }
    }

    /// Resumes the followed command from a stop, as if psleak were not there.
    fn resume(&mut self, status: libc::c_int) {
        let pid = self.raw_pid();
        // SAFETY: ptrace on our own seized tracee, stopped; no pointers passed.
        unsafe {
            match stop_of(status) {
                Some(Stop::Exit) => self.hold = Hold::AtExit,
                // Stopped by SIGSTOP or SIGTSTP: it stays so until a SIGCONT, as without psleak.
                Some(Stop::Group) => {
                    libc::ptrace(libc::PTRACE_LISTEN, pid, 0usize, 0usize);
                }
                Some(Stop::Signal(signal)) => {
                    libc::ptrace(libc::PTRACE_CONT, pid, 0usize, signal as usize);
                }
                Some(Stop::Other) => {
                    libc::ptrace(libc::PTRACE_CONT, pid, 0usize, 0usize);
                }
                None => {}
            }
        }
    }

    fn detach(&mut self, signal: libc::c_int) {
        // SAFETY: ptrace on our own stopped tracee; the signal travels in the data argument.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.raw_pid(), 0usize, signal as usize) };
        self.ending |= signal != 0;
        self.hold = Hold::Free;
    }
}

impl Drop for Launched {
    /// A command never released (the attach failed) is not left stopped: it is killed. One
    /// followed runs on, untraced.
    fn drop(&mut self) {
        match self.hold {
            Hold::AtEntry => {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            _ => self.let_go(),
        }
    }
}

/// How long a command let go on its way out (from its exit, or with the Ctrl-C it got too) may
/// take to end, before psleak says it runs on.
const ENDING_PATIENCE: Duration = Duration::from_millis(500);

/// Why a seized tracee stopped (ptrace(2): "Stopped states").
enum Stop {
    /// At PTRACE_EVENT_EXIT: its main thread is exiting, its memory still mapped.
    Exit,
    /// A group-stop (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU), reported as PTRACE_EVENT_STOP.
    Group,
    /// A signal on its way to it, to be passed on.
    Signal(libc::c_int),
    /// Another event stop (PTRACE_INTERRUPT's).
    Other,
}

fn stop_of(status: libc::c_int) -> Option<Stop> {
    if !libc::WIFSTOPPED(status) {
        return None;
    }
    let signal = libc::WSTOPSIG(status);
    Some(match status >> 16 {
        0 => Stop::Signal(signal),
        libc::PTRACE_EVENT_EXIT => Stop::Exit,
        libc::PTRACE_EVENT_STOP if signal != libc::SIGTRAP => Stop::Group,
        _ => Stop::Other,
    })
}

/// Starts `command` and holds it at its entry point.
pub fn launch(command: &[OsString]) -> Result<Launched, Error> {
    let (program, args) = command.split_first().ok_or_else(|| Error::Refused("no command to launch".into()))?;
    let name = program.to_string_lossy().into_owned();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: between fork and exec, only ptrace(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| match libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize) {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Io(format!("cannot run {name}"), e))?;
    let launched = Launched { child, name, hold: Hold::AtEntry, ended: None, ending: false };
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
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, entry as *mut libc::c_void, 0usize);
        if word == -1 && *libc::__errno_location() != 0 {
            return Err(failed("its entry point cannot be read"));
        }
        let trap = (word & !0xff) | 0xcc; // int3 in the entry's first byte
        if libc::ptrace(libc::PTRACE_POKETEXT, pid, entry as *mut libc::c_void, trap) != 0
            || libc::ptrace(libc::PTRACE_CONT, pid, 0usize, 0usize) != 0
        {
            return Err(failed("its entry point cannot be written"));
        }
        wait_for_trap(pid).map_err(|()| failed("it ended before its entry point"))?;
        let mut regs = std::mem::zeroed::<libc::user_regs_struct>();
        if libc::ptrace(libc::PTRACE_POKETEXT, pid, entry as *mut libc::c_void, word) != 0
            || libc::ptrace(libc::PTRACE_GETREGS, pid, 0usize, &mut regs as *mut libc::user_regs_struct) != 0
        {
            return Err(failed("its registers cannot be read"));
        }
        regs.rip = entry; // back onto the restored instruction
        if libc::ptrace(libc::PTRACE_SETREGS, pid, 0usize, &regs as *const libc::user_regs_struct) != 0 {
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
                libc::ptrace(libc::PTRACE_CONT, pid, 0usize, signal as usize);
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
