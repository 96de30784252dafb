//! Access to the target process through procfs: is it there and traceable, what it has
//! mapped, what its fds and threads are, and reads of its memory.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;

/// One line of /proc/PID/maps that maps a file executable.
#[derive(Debug, Clone)]
struct CodeMapping {
    start: u64,
    end: u64,
    file_offset: u64,
    path: PathBuf,
}

/// A process held by a pidfd: its exit is seen, and its number never taken for the next
/// process that gets it. Opening one needs no privilege over the process.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    pub fn open(pid: u32) -> Result<Self, Error> {
        if pid == 0 || pid > i32::MAX as u32 {
            return Err(Error::NoSuchProcess(pid));
        }
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(match io::Error::last_os_error().raw_os_error() {
                Some(libc::ESRCH) => Error::NoSuchProcess(pid),
                _ => Error::Io(format!("cannot open process {pid}"), io::Error::last_os_error()),
            });
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// Readable once the process has exited.
    pub fn exit_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn is_alive(&self) -> bool {
        !crate::backends::ebpf::live::readable_now(self.0.as_raw_fd())
    }
}

/// A process psleak traces. Holds a pidfd, so that its exit is seen and its pid is never
/// confused with a later process that reuses the number.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    pidfd: Pidfd,
    /// Sorted by address, disjoint.
    code: Vec<CodeMapping>,
    last_refresh: Instant,
    /// The process mapped something since the mappings were read: an unknown code address
    /// may be in it, and is worth a look at once.
    mapped_since: bool,
    mem: Option<File>,
}

/// How often an unknown code address may have the mappings read again.
const REFRESH_PERIOD: Duration = Duration::from_millis(10);

/// Code mappings kept after they are gone, beyond those there are.
const MAX_GONE_MAPPINGS: usize = 4096;

impl Process {
    /// Opens `pid` for tracing, or says in one line why it cannot be traced.
    pub fn open(pid: u32) -> Result<Self, Error> {
        // The pidfd comes first: whatever is checked below is then checked of the process it
        // refers to, as long as that is alive afterwards (a pid changes hands only once its
        // process has exited and been reaped).
        let pidfd = Pidfd::open(pid)?;
        let root = PathBuf::from(format!("/proc/{pid}"));
        let stat = fs::read_to_string(root.join("stat")).map_err(|e| proc_error(pid, "stat", e))?;
        if stat_flags(&stat).is_some_and(|flags| flags & PF_KTHREAD != 0) {
            return Err(Error::NotTraceable(pid, "it is a kernel thread".into()));
        }
        let mem = match File::open(root.join("mem")) {
            Err(e) if e.raw_os_error().is_some_and(psleak_ebpf::is_out_of_fds) => {
                return Err(proc_error(pid, "mem", e))
            }
            opened => opened.ok(),
        };
        let mut process = Self { pid, pidfd, code: Vec::new(), last_refresh: Instant::now(), mapped_since: false, mem };
        process.check_traceable_by(&Credentials::own())?;
        if !process.is_alive() {
            return Err(Error::NotTraceable(pid, "it has already exited".into()));
        }
        process.refresh_mappings()?;
        if process.code.is_empty() {
            // Between releasing its memory and becoming a zombie, an exiting process maps nothing.
            return Err(Error::NotTraceable(pid, "it is exiting (no code mapped)".into()));
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether `tracer` may trace this process, as the kernel would let it ptrace it: the
    /// process runs as the tracer's uid and as nothing else (no setuid or setgid program made
    /// it more), holds no capability the tracer lacks, and its owner may read it (it is
    /// dumpable, hence /proc/PID is the uid's). Root may trace any. A process that is gone is
    /// refused too; callers check it is still alive afterwards.
    pub fn check_traceable_by(&self, tracer: &Credentials) -> Result<(), Error> {
        check_traceable(self.pid, tracer)
    }

    /// `check_traceable_by` after the process exec'd: one that is gone since cannot be checked,
    /// and what its new program did is not `tracer`'s to see on trust.
    pub fn check_exec_traceable_by(&self, tracer: &Credentials) -> Result<(), Error> {
        match self.check_traceable_by(tracer) {
            Err(Error::NoSuchProcess(pid)) => {
                Err(Error::NotTraceable(pid, "it exited before psleak could check whom its new program ran as".into()))
            }
            checked => checked,
        }
    }

    /// After the process exec'd: why tracing it stops, in words, if `tracer` may not trace its
    /// new program (or could not check any more whom it runs as).
    pub fn exec_refusal(&self, tracer: &Credentials) -> Option<String> {
        let why = match self.check_exec_traceable_by(tracer) {
            Ok(()) => return None,
            Err(Error::NotTraceable(_, why)) => why,
            Err(e) => e.to_string(),
        };
        Some(format!("the target exec'd, and {why}: tracing stops"))
    }

    /// The pidfd: readable once the process has exited.
    pub fn exit_fd(&self) -> RawFd {
        self.pidfd.exit_fd()
    }

    pub fn is_alive(&self) -> bool {
        self.pidfd.is_alive()
    }

    /// The short name of the process (its comm).
    pub fn name(&self) -> String {
        name_of(self.pid)
    }

    /// Re-reads which files are mapped executable (after a dlopen, say). What was seen before
    /// is kept unless a new mapping takes its place: it still names code that created resources,
    /// after a dlclose, and while an exiting process's maps empty out piece by piece.
    pub fn refresh_mappings(&mut self) -> Result<(), Error> {
        let maps =
            fs::read_to_string(format!("/proc/{}/maps", self.pid)).map_err(|e| proc_error(self.pid, "maps", e))?;
        self.last_refresh = Instant::now();
        self.mapped_since = false;
        // /proc lists mappings by address, without overlaps: `code` stays sorted and disjoint,
        // and is merged in O(n log n) (a target may map tens of thousands of code files).
        let mut fresh: Vec<CodeMapping> = maps.lines().filter_map(parse_code_mapping).collect();
        fresh.sort_by_key(|m| m.start);
        let overlapped = |old: &CodeMapping| {
            let next = fresh.partition_point(|m| m.end <= old.start);
            fresh.get(next).is_some_and(|m| m.start < old.end)
        };
        let mut kept: Vec<CodeMapping> =
            std::mem::take(&mut self.code).into_iter().filter(|old| !overlapped(old)).collect();
        // What is gone is remembered to name what it created, within bounds: a target that maps
        // code again and again elsewhere must not grow this without end.
        if kept.len() > fresh.len() + MAX_GONE_MAPPINGS {
            kept.clear();
        }
        fresh.extend(kept);
        fresh.sort_by_key(|m| m.start);
        self.code = fresh;
        Ok(())
    }

    /// After an exec: the old program's mappings are gone, those of the new one are read.
    pub fn forget_mappings(&mut self) {
        self.code.clear();
        let _ = self.refresh_mappings();
    }

    /// The libc the process has mapped, if it is dynamically linked against one.
    pub fn libc(&self) -> Option<PathBuf> {
        self.code.iter().map(|m| &m.path).find(|p| is_libc(p)).cloned()
    }

    /// The libc of a process that may be starting up: right after exec only the program and
    /// the dynamic loader are mapped, and the loader maps libc a moment later. A process
    /// without a dynamic loader is statically linked and has none.
    pub fn wait_for_libc(&mut self, limit: Duration) -> Option<PathBuf> {
        let started = Instant::now();
        loop {
            if let Some(libc) = self.libc() {
                return Some(libc);
            }
            let has_loader = self.code.iter().any(|m| is_dynamic_loader(&m.path));
            if !has_loader || !self.is_alive() || started.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
            let _ = self.refresh_mappings();
        }
    }

    /// The mapped files that might export CPython's allocator API, most likely first.
    pub fn python_candidates(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = Vec::new();
        for m in &self.code {
            let name = m.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if (name.starts_with("libpython") || name.starts_with("python")) && !found.contains(&m.path) {
                found.push(m.path.clone());
            }
        }
        found.sort_by_key(|p| !p.to_string_lossy().contains("libpython"));
        found
    }

    /// Whether `addr` is a return address: inside mapped code and just after a call instruction.
    /// This is how a caller is picked out of a scan of raw stack words when the code has no CFI.
    pub fn is_return_address(&mut self, addr: u64) -> bool {
        if addr < 7 || self.locate(addr).is_none() {
            return false;
        }
        let mut before = [0u8; 7];
        match &self.mem {
            Some(mem) if mem.read_exact_at(&mut before, addr - 7).is_ok() => follows_call(&before),
            _ => false,
        }
    }

    /// Where the code of `path` is mapped.
    pub fn code_of(&self, path: &Path) -> Vec<psleak_ebpf::Mapping> {
        let mapped = self.code.iter().filter(|m| m.path == path);
        mapped.map(|m| psleak_ebpf::Mapping { start: m.start, end: m.end, file_offset: m.file_offset }).collect()
    }

    /// Whether `addr` lies in code mapped from a file; looks at the mappings again if the
    /// address is new.
    pub fn in_code(&mut self, addr: u64) -> bool {
        self.look_again_for(addr);
        self.code_at(addr).is_some()
    }

    /// The process mapped memory (an mmap event): code may be there that the mappings as last
    /// read do not have.
    pub fn mapped(&mut self) {
        self.mapped_since = true;
    }

    /// Reads the mappings again when `addr` is not in them, but not more often than every
    /// REFRESH_PERIOD unless the process mapped something since: events may carry any words,
    /// and each new one would have /proc read again. (Right after an exec the new program's
    /// libraries are mapped and called within the period.)
    fn look_again_for(&mut self, addr: u64) {
        if self.code_at(addr).is_none() && (self.mapped_since || self.last_refresh.elapsed() >= REFRESH_PERIOD) {
            let _ = self.refresh_mappings();
        }
    }

    fn code_at(&self, addr: u64) -> Option<&CodeMapping> {
        let at = self.code.partition_point(|m| m.end <= addr);
        self.code.get(at).filter(|m| m.start <= addr)
    }

    /// The file mapped at a code address, and the address's offset in that file; looks at the
    /// mappings again if the address is new.
    pub fn locate(&mut self, addr: u64) -> Option<(PathBuf, u64)> {
        self.look_again_for(addr);
        self.file_location(addr).map(|(path, offset)| (path.to_path_buf(), offset))
    }

    /// Like `locate`, from the mappings as last seen (they outlive the process).
    pub fn file_location(&self, addr: u64) -> Option<(&Path, u64)> {
        self.code_at(addr).map(|m| (m.path.as_path(), addr - m.start + m.file_offset))
    }

    /// `len` bytes of the process's memory at `addr`, if it has them all (the target's to
    /// forge: callers bound `len`).
    pub fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        self.mem.as_ref()?.read_exact_at(&mut bytes, addr).ok()?;
        Some(bytes)
    }

    /// What an open fd refers to: a path, `socket:[inode]`, `pipe:[inode]`, `anon_inode:[eventfd]`.
    pub fn fd_target(&self, fd: i32) -> Option<String> {
        fs::read_link(format!("/proc/{}/fd/{fd}", self.pid)).ok().map(|p| p.to_string_lossy().into_owned())
    }

    /// The name of a thread (its comm), while it is alive.
    pub fn thread_name(&self, tid: u32) -> Option<String> {
        read_trimmed(format!("/proc/{}/task/{tid}/comm", self.pid))
    }
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// [`Process::check_traceable_by`], of the process that has the number `pid` now: only what
/// a process held by a pidfd and checked alive afterwards is asked of is known to be its.
pub fn check_traceable(pid: u32, tracer: &Credentials) -> Result<(), Error> {
    let uid = tracer.uid;
    if uid == 0 {
        return Ok(());
    }
    let root = PathBuf::from(format!("/proc/{pid}"));
    let status = fs::read_to_string(root.join("status")).map_err(|e| proc_error(pid, "status", e))?;
    let ids = |field: &str| -> Option<Vec<u32>> {
        let line = status.lines().find_map(|l| l.strip_prefix(field))?;
        line.split_whitespace().map(|id| id.parse().ok()).collect()
    };
    let (Some(uids), Some(gids)) = (ids("Uid:"), ids("Gid:")) else {
        return Err(Error::NotTraceable(pid, "its credentials cannot be read".into()));
    };
    let owner = fs::metadata(&root).map_err(|e| proc_error(pid, "owner", e))?.uid();
    let real = uids.first().copied().unwrap_or(owner);
    if real != uid {
        return Err(Error::NotTraceable(pid, format!("it belongs to uid {real}, and you are uid {uid}")));
    }
    if uids.iter().any(|&u| u != uid) || gids.windows(2).any(|g| g[0] != g[1]) || owner != uid {
        let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join("/");
        return Err(Error::NotTraceable(
            pid,
            format!(
                "it runs a setuid or setgid program or is not dumpable (uids {}, gids {}), which uid {uid} may not trace",
                list(&uids),
                list(&gids)
            ),
        ));
    }
    // Capabilities the tracer lacks (ambient ones a parent gave it) make it more than its
    // uid, as ptrace sees it; those of a user namespace of its own (a rootless container's
    // root) do not.
    let user_namespace = |of: &str| fs::read_link(format!("/proc/{of}/ns/user")).ok();
    // Unknown capabilities count as all of them.
    let more = capabilities_in(&status).unwrap_or(u64::MAX) & !tracer.capabilities;
    if more != 0 && user_namespace(&pid.to_string()) == user_namespace("self") {
        return Err(Error::NotTraceable(pid, format!("it holds capabilities ({more:#x}) that uid {uid} lacks")));
    }
    Ok(())
}

/// Who traces a process: a uid and the capabilities it holds (CapPrm).
#[derive(Debug, Clone, Copy)]
pub struct Credentials {
    pub uid: u32,
    pub capabilities: u64,
}

impl Credentials {
    /// This process's effective uid and capabilities.
    pub fn own() -> Self {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self { uid, capabilities: capabilities_in(&status).unwrap_or(0) }
    }

    /// A daemon client's: the uid its connection was made with, and the capabilities of its
    /// process (none if it is gone).
    pub fn of_peer(uid: u32, pid: u32) -> Self {
        let status = if pid == 0 {
            String::new()
        } else {
            fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
        };
        Self { uid, capabilities: capabilities_in(&status).unwrap_or(0) }
    }
}

/// The permitted capabilities a /proc/PID/status lists.
fn capabilities_in(status: &str) -> Option<u64> {
    let caps = status.lines().find_map(|l| l.strip_prefix("CapPrm:")).map(str::trim)?;
    u64::from_str_radix(caps, 16).ok()
}

/// The pid, as our pid namespace numbers it, of the process that `peer` (a pid of ours) calls
/// `pid` in its own namespace: a client of the daemon in a container sends its own numbers.
/// Only processes in the peer's namespace itself are found.
pub fn pid_seen_by(peer: u32, pid: u32) -> Result<u32, String> {
    if peer == 0 {
        return Err("your process is in a pid namespace the daemon cannot see into: run the daemon in the \
                    tests' pid namespace or one that contains it"
            .into());
    }
    let namespace = |of: &str| fs::read_link(format!("/proc/{of}/ns/pid")).ok();
    // A peer that is gone (it handed its connection on, or exited) tells no namespace: its
    // numbers are taken as ours, which only decides what is looked at, not who may see it.
    let Some(theirs) = namespace(&peer.to_string()) else { return Ok(pid) };
    if namespace("self").as_ref() == Some(&theirs) {
        return Ok(pid);
    }
    // NSpid: the process's pid in each namespace from ours down to its own, which is last.
    let own_number = |of: &str| -> Option<u32> {
        let status = fs::read_to_string(format!("/proc/{of}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
    };
    // A client mostly asks for itself.
    if own_number(&peer.to_string()) == Some(pid) {
        return Ok(peer);
    }
    let entries = fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(ours) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if own_number(&ours.to_string()) == Some(pid) && namespace(&ours.to_string()).as_ref() == Some(&theirs) {
            return Ok(ours);
        }
    }
    Err(format!("no process with pid {pid} in your pid namespace"))
}

/// A failed read of /proc/PID/`what`: the process is gone, or the reason in words (too many
/// open files, say), never "no such process" for what is not.
fn proc_error(pid: u32, what: &str, err: io::Error) -> Error {
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Error::NoSuchProcess(pid),
        _ => Error::Io(format!("cannot read /proc/{pid}/{what}"), err),
    }
}

/// The task flags of a /proc/PID/stat line (field 9; the comm in parentheses may hold spaces).
fn stat_flags(stat: &str) -> Option<u64> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(6)?.parse().ok()
}

/// The short name (comm) of whatever process has the number `pid` now; empty if none.
pub fn name_of(pid: u32) -> String {
    read_trimmed(format!("/proc/{pid}/comm")).unwrap_or_default()
}

fn read_trimmed(path: String) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim_end().to_string())
}

fn parse_code_mapping(line: &str) -> Option<CodeMapping> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let file_offset = fields.next()?;
    let path = fields.nth(2)?;
    if !perms.contains('x') || !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some(CodeMapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(file_offset, 16).ok()?,
        path: PathBuf::from(path),
    })
}

fn is_dynamic_loader(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))
}

fn is_libc(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    name == "libc.so.6" || (name.starts_with("libc-") && name.ends_with(".so")) || name.starts_with("libc.so")
}

/// Whether the 7 bytes before a return address end with an x86-64 call instruction:
/// `call rel32` (e8, 5 bytes), or `call *r/m` (ff /2) in its 2, 3, 6 and 7-byte forms.
fn follows_call(before: &[u8; 7]) -> bool {
    let indirect = |at: usize| before[at] == 0xff && (before[at + 1] >> 3) & 7 == 2;
    before[2] == 0xe8 || indirect(5) || indirect(4) || indirect(1) || indirect(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_executable_file_mappings() {
        let line = "7f95e701e000-7f95e7044000 r-xp 00028000 fe:00 1234  /usr/lib/x86_64-linux-gnu/libc.so.6";
        let m = parse_code_mapping(line).expect("a code mapping");
        assert_eq!((m.start, m.end, m.file_offset), (0x7f95e701e000, 0x7f95e7044000, 0x28000));
        assert!(is_libc(&m.path));
        assert!(parse_code_mapping(
            "7f95e7000000-7f95e701e000 r--p 00000000 fe:00 1234 /usr/lib/x86_64-linux-gnu/libc.so.6"
        )
        .is_none());
        assert!(parse_code_mapping("7ffd1000-7ffd2000 r-xp 00000000 00:00 0 [vdso]").is_none());
    }

    #[test]
    fn recognises_call_instructions() {
        assert!(follows_call(&[0, 0, 0xe8, 1, 2, 3, 4])); // call rel32
        assert!(follows_call(&[0, 0, 0, 0, 0, 0xff, 0xd0])); // call *%rax
        assert!(follows_call(&[0, 0xff, 0x15, 1, 2, 3, 4])); // call *disp32(%rip)
        assert!(!follows_call(&[0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10])); // mov; sub
    }

    #[test]
    fn refreshed_mappings_replace_only_what_they_overlap() {
        let mut me = Process::open(std::process::id()).unwrap();
        let gone = CodeMapping { start: 0x1000, end: 0x2000, file_offset: 0, path: "/unloaded.so".into() };
        let overlapped = CodeMapping { start: 0x10, end: 0x1100, file_offset: 0, path: "/replaced.so".into() };
        me.code.push(overlapped);
        me.refresh_mappings().unwrap();
        me.code.push(gone);
        me.refresh_mappings().unwrap();
        assert!(me.file_location(0x1800).is_some_and(|(p, _)| p == Path::new("/unloaded.so")), "kept");
        assert!(me.file_location(0x20).is_some_and(|(p, _)| p == Path::new("/replaced.so")), "nothing took its place");
        let count = me.code.len();
        me.refresh_mappings().unwrap();
        assert_eq!(me.code.len(), count, "refreshing twice adds nothing");
    }

    #[test]
    fn code_mapped_since_the_last_look_is_found_at_once() {
        // After an exec the new program's libc is mapped and called within the refresh period.
        let mut me = Process::open(std::process::id()).unwrap();
        let libc = File::open(me.libc().unwrap()).unwrap();
        // SAFETY: a new private read-only mapping of a file, unmapped below; nothing else uses it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE,
                libc.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        me.last_refresh = Instant::now() + Duration::from_secs(3600);
        assert!(!me.in_code(addr as u64), "within the period an unknown address is not looked for");
        me.mapped();
        assert!(me.in_code(addr as u64), "after a mapping it is");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, 4096) };
    }

    #[test]
    fn opens_itself_and_finds_libc() {
        let me = Process::open(std::process::id()).expect("a process can trace itself");
        assert!(me.libc().is_some(), "the test binary links glibc dynamically");
        assert!(me.is_alive());
    }

    #[test]
    fn refuses_missing_and_kernel_processes() {
        assert!(matches!(Process::open(0), Err(Error::NoSuchProcess(0))));
        assert!(matches!(Process::open(i32::MAX as u32), Err(Error::NoSuchProcess(_))));
        assert!(matches!(Process::open(2), Err(Error::NotTraceable(2, _))), "pid 2 is kthreadd");
    }
}
