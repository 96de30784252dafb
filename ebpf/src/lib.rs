//! psleak's kernel-side probes and their loader.
//!
//! The probes live in `src/bpf/` (BPF C, CO-RE); `build.rs` compiles them and generates the
//! skeleton, including the Rust twin of every type in `events.h` ([`types::event`], ...).
//! [`Probes::attach`] loads them for one target process; dropping [`Probes`] detaches them all.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, UprobeMultiOpts};

mod skel {
    include!(concat!(env!("OUT_DIR"), "/psleak.skel.rs"));
}
pub use skel::types;
use skel::{PsleakSkel, PsleakSkelBuilder};
use types::{alloc_op, event_flag, free_op, loss_kind};

mod dispatch;
mod elf;
mod placement;
pub use elf::{exports, fd_path, open_mapped, Place};
pub use libbpf_rs::OpenObject;
pub use placement::Instruction;
use placement::Registers;

/// What to probe: one process, its libc, and the object exporting CPython's allocator API.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    /// The libc the process has mapped (its malloc family and pthread_create are probed there).
    pub libc: PathBuf,
    /// The executable or libpython that exports `PyObject_Malloc`, when the process is Python.
    pub python: Option<PathBuf>,
    /// Where `python`'s code is mapped in the process: libc allocations called from there carry
    /// stack words too, since CPython is often built without frame pointers; and its Free
    /// functions' dispatch is followed there (see `dispatch`).
    pub python_code: Vec<Mapping>,
}

impl Target {
    /// The addresses `python`'s code spans (empty when it has none).
    pub fn python_code_span(&self) -> std::ops::Range<u64> {
        let start = self.python_code.iter().map(|m| m.start).min().unwrap_or(0);
        start..self.python_code.iter().map(|m| m.end).max().unwrap_or(0)
    }

    /// Where `python`'s byte at `file_offset` is mapped, if it is.
    fn python_address(&self, file_offset: u64) -> Option<u64> {
        let m = self
            .python_code
            .iter()
            .find(|m| (m.file_offset..m.file_offset + (m.end - m.start)).contains(&file_offset))?;
        Some(m.start + (file_offset - m.file_offset))
    }

    /// The offset in `python`'s file of an address in its code, if it is one.
    fn python_file_offset(&self, addr: u64) -> Option<u64> {
        let m = self.python_code.iter().find(|m| (m.start..m.end).contains(&addr))?;
        Some(addr - m.start + m.file_offset)
    }

    /// A word of the process's memory.
    fn read_word(&self, addr: u64) -> Option<u64> {
        let mut word = [0u8; 8];
        let local = libc::iovec { iov_base: word.as_mut_ptr().cast(), iov_len: word.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: word.len() };
        // SAFETY: one local buffer of the length given; the remote one is only read, by the kernel.
        let read = unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        (read == word.len() as isize).then(|| u64::from_ne_bytes(word))
    }
}

/// A file mapped executable in the process: its addresses, and the file offset of the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the event ring in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Kernel BTF to relocate against, for kernels that do not expose /sys/kernel/btf/vmlinux.
    pub btf: Option<PathBuf>,
    /// Which allocator families to probe (the kernel-side probes are always attached).
    pub allocators: Allocators,
    /// Probe every function at its first instruction rather than where the kernel emulates
    /// the probed instruction (see `placement`): the placement to measure the gain against.
    pub probes_at_entry: bool,
    /// Attach every probe with programs that return at once: the floor of the tracing cost.
    pub empty_programs: bool,
    /// Attach the allocators' entry probes before their return probes (to test that calls under
    /// way at attach leave no thread unseen whatever the order).
    pub entry_probes_first: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ring_bytes: 32 << 20,
            btf: None,
            allocators: Allocators::All,
            probes_at_entry: false,
            empty_programs: false,
            entry_probes_first: false,
        }
    }
}

/// The allocator families probed. An attached uprobe costs its trap at every call whether or
/// not its events can matter, so a question about Python's allocations alone leaves libc's
/// malloc family out, and one about fds and threads leaves every allocator out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocators {
    /// libc's malloc family and CPython's allocator API.
    #[default]
    All,
    /// CPython's allocator API only (and pthread_create, whose thread stacks must not count as
    /// the caller's mappings).
    Python,
    /// None (pthread_create still, as above).
    None,
}

/// By the names the protocol gives them (serde's, so that they are written once).
impl std::str::FromStr for Allocators {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use serde::de::{value, IntoDeserializer};
        serde::Deserialize::deserialize(IntoDeserializer::<value::Error>::into_deserializer(s))
            .map_err(|e| format!("allocators: {e}"))
    }
}

/// Why the probes could not be attached; each says what the user can do about it.
#[derive(Debug)]
pub enum AttachError {
    /// Loading or attaching was refused for lack of privileges.
    Permission(String),
    /// The kernel's verifier refused a program: this kernel does not take psleak's probes.
    Rejected(libbpf_rs::Error),
    /// The target went away while probes were being attached.
    TargetGone,
    /// A required function is missing from the target's libc.
    MissingSymbol { path: PathBuf, symbol: &'static str },
    /// A file the probes go into could not be read.
    Read { path: PathBuf, source: io::Error },
    /// The kernel refused the probes for another reason.
    Kernel { what: String, source: libbpf_rs::Error },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Permission(what) => write!(
                f,
                "not allowed to {what}: run psleak as root, or give it CAP_SYS_ADMIN (the kernel refuses uprobes \
                 to CAP_BPF and CAP_PERFMON alone)"
            ),
            Self::Rejected(source) => {
                write!(f, "this kernel's BPF verifier refused psleak's probes ({source}); {LIBBPF_LOG}=1 shows its log")
            }
            Self::TargetGone => write!(f, "the target process exited while psleak was attaching"),
            Self::MissingSymbol { path, symbol } => write!(
                f,
                "{} has no `{symbol}`: psleak probes glibc's allocator and this libc is not glibc-compatible",
                path.display()
            ),
            Self::Read { path, source } => write!(f, "cannot read {}: {}", path.display(), describe_io(source)),
            Self::Kernel { what, source } if io_errno(source).is_some_and(is_out_of_fds) => {
                write!(f, "cannot {what}: too many open files{FD_ADVICE}")
            }
            Self::Kernel { what, source } => write!(f, "the kernel refused to {what}: {source}"),
        }
    }
}

impl std::error::Error for AttachError {}

/// The environment variable that has libbpf's own diagnostics printed to stderr.
pub const LIBBPF_LOG: &str = "PSLEAK_LIBBPF_LOG";

/// What to do when a process has run out of file descriptors.
pub const FD_ADVICE: &str = " (raise the limit: `ulimit -n`, or LimitNOFILE= in a systemd unit)";

/// EMFILE or ENFILE: the process or the system has no file descriptor left.
pub fn is_out_of_fds(errno: i32) -> bool {
    errno == libc::EMFILE || errno == libc::ENFILE
}

/// An I/O error in words, with advice when it is the lack of file descriptors.
pub fn describe_io(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) if is_out_of_fds(errno) => format!("too many open files{FD_ADVICE}"),
        _ => err.to_string(),
    }
}

/// Events lost in the kernel since attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Events dropped because the ring buffer was full: the ledger misses them.
    pub ring_full: u64,
    /// Events sent without a stack because the stack map was full or the walk failed.
    pub no_stack: u64,
    /// Allocator calls whose result was not seen: their return was missed (a call under way at
    /// attach, a longjmp out of the allocator), or there was no room to follow them.
    pub untracked_calls: u64,
}

/// libc's allocation functions: (function, how its program reads it).
const LIBC_ALLOCATORS: &[(&str, alloc_op)] = &[
    ("malloc", alloc_op::ALLOC_OP_SIZE_ARG1),
    ("calloc", alloc_op::ALLOC_OP_CALLOC),
    ("realloc", alloc_op::ALLOC_OP_REALLOC),
    ("posix_memalign", alloc_op::ALLOC_OP_POSIX_MEMALIGN),
    ("aligned_alloc", alloc_op::ALLOC_OP_SIZE_ARG2),
    ("memalign", alloc_op::ALLOC_OP_SIZE_ARG2),
    ("valloc", alloc_op::ALLOC_OP_SIZE_ARG1),
    ("pvalloc", alloc_op::ALLOC_OP_SIZE_ARG1),
    ("reallocarray", alloc_op::ALLOC_OP_REALLOCARRAY),
];

/// The allocation functions a glibc-compatible libc must have (and free and pthread_create).
const LIBC_REQUIRED: &[&str] = &["malloc", "calloc", "realloc", "posix_memalign"];

/// CPython's allocator families: (prefix, domain). Each has Malloc, Calloc, Realloc and Free.
const PYTHON_FAMILIES: &[(&str, types::alloc_domain)] = &[
    ("PyMem_Raw", types::alloc_domain::DOMAIN_PYMEM_RAW),
    ("PyMem_", types::alloc_domain::DOMAIN_PYMEM),
    ("PyObject_", types::alloc_domain::DOMAIN_PYOBJECT),
];

const PYTHON_ALLOCATORS: &[(&str, alloc_op)] = &[
    ("Malloc", alloc_op::ALLOC_OP_SIZE_ARG1),
    ("Calloc", alloc_op::ALLOC_OP_CALLOC),
    ("Realloc", alloc_op::ALLOC_OP_REALLOC),
];

/// The argument registers the entry program reads for `op` (see alloc_enter).
fn registers_read(op: alloc_op) -> Registers {
    match op {
        alloc_op::ALLOC_OP_SIZE_ARG1 => Registers::RDI,
        alloc_op::ALLOC_OP_CALLOC | alloc_op::ALLOC_OP_REALLOC => Registers::RDI.and(Registers::RSI),
        alloc_op::ALLOC_OP_REALLOCARRAY => Registers::RDI.and(Registers::RSI).and(Registers::RDX),
        alloc_op::ALLOC_OP_POSIX_MEMALIGN => Registers::RDI.and(Registers::RDX),
        alloc_op::ALLOC_OP_SIZE_ARG2 => Registers::RSI,
        _ => Registers::NONE,
    }
}

/// Which program a probed function gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// alloc_enter and alloc_exit, at the same place.
    Allocator,
    /// free_enter.
    Free,
}

/// One function psleak probes in a target, and where.
#[derive(Debug, Clone)]
pub struct Probed {
    pub binary: PathBuf,
    pub function: String,
    /// The function the probe sits in when it is not `function`: the allocator's free a
    /// Py*_Free hands its calls on to (see `dispatch`).
    pub within: Option<String>,
    pub role: Role,
    pub place: Place,
    cookie: u64,
}

fn unreadable(path: &Path, source: io::Error) -> AttachError {
    AttachError::Read { path: path.to_path_buf(), source }
}

/// Every function psleak probes in `target` under `options`, and where each probe goes.
pub fn probed_functions(target: &Target, options: &Options) -> Result<Vec<Probed>, AttachError> {
    let mut plan: Vec<Probed> = Vec::new();
    let mut add = |binary: &elf::Binary, function: String, within, role, place: Place, cookie| {
        // One function under two names (glibc's memalign and aligned_alloc; pymalloc's free, to
        // which PyMem_Free and PyObject_Free both jump) is probed once: twice, its entry program
        // would take its own call for one that ended unseen.
        if !plan.iter().any(|p| p.place.offset == place.offset && p.binary == binary.path()) {
            plan.push(Probed { binary: binary.path().to_path_buf(), function, within, role, place, cookie });
        }
    };
    let place = |binary: &elf::Binary, function: &str, reads, role| {
        binary
            .probe_place(function, reads, role == Role::Free, options.probes_at_entry)
            .map_err(|source| unreadable(binary.path(), source))
    };
    let python = match (&target.python, options.allocators) {
        (Some(p), Allocators::All | Allocators::Python) => Some(elf::Binary::open(p).map_err(|e| unreadable(p, e))?),
        _ => None,
    };
    let libc = &elf::Binary::open(&target.libc).map_err(|e| unreadable(&target.libc, e))?;
    let missing = |symbol: &'static str| AttachError::MissingSymbol { path: target.libc.clone(), symbol };
    let libc_domain = types::alloc_domain::DOMAIN_LIBC;
    let spawn = allocator_cookie(alloc_op::ALLOC_OP_SPAWN, libc_domain);
    let Some(at) = place(libc, "pthread_create", Registers::NONE, Role::Allocator)? else {
        return Err(missing("pthread_create"));
    };
    add(libc, "pthread_create".into(), None, Role::Allocator, at, spawn);
    if options.allocators == Allocators::All {
        for &(func, op) in LIBC_ALLOCATORS {
            match place(libc, func, registers_read(op), Role::Allocator)? {
                Some(at) => add(libc, func.into(), None, Role::Allocator, at, allocator_cookie(op, libc_domain)),
                None if LIBC_REQUIRED.contains(&func) => return Err(missing(func)),
                None => {}
            }
        }
        let Some(at) = place(libc, "free", Registers::RDI, Role::Free)? else { return Err(missing("free")) };
        add(libc, "free".into(), None, Role::Free, at, free_cookie(free_op::FREE_OP_PTR_ARG1, libc_domain));
    }
    if let Some(python) = &python {
        for &(prefix, domain) in PYTHON_FAMILIES {
            for &(suffix, op) in PYTHON_ALLOCATORS {
                let func = format!("{prefix}{suffix}");
                if let Some(at) = place(python, &func, registers_read(op), Role::Allocator)? {
                    add(python, func, None, Role::Allocator, at, allocator_cookie(op, domain));
                }
            }
            let func = format!("{prefix}Free");
            let Some(at) = place(python, &func, Registers::RDI, Role::Free)? else { continue };
            let followed = if at.on == Instruction::Stepped && !options.probes_at_entry {
                followed_free(python, &func, target).map_err(|source| unreadable(python.path(), source))?
            } else {
                None
            };
            match followed {
                Some((within, at)) => {
                    add(python, func, Some(within), Role::Free, at, free_cookie(free_op::FREE_OP_PTR_ARG2, domain))
                }
                None => add(python, func, None, Role::Free, at, free_cookie(free_op::FREE_OP_PTR_ARG1, domain)),
            }
        }
    }
    Ok(plan)
}

/// Where to probe the Py*_Free `func`, whose own probe would be single-stepped, instead: in the
/// function its dispatch jumps to in the running process, when that is one of `python`'s (see
/// `dispatch`), with its name.
fn followed_free(python: &elf::Binary, func: &str, target: &Target) -> io::Result<Option<(String, Place)>> {
    let Some(free) = python.function(func)? else { return Ok(None) };
    let jumps_to = target
        .python_address(free.entry)
        .and_then(|entry| dispatch::tail_target(&free.code, entry, |addr| target.read_word(addr)))
        .and_then(|addr| target.python_file_offset(addr));
    let Some(entry) = jumps_to else { return Ok(None) };
    Ok(python.function_at(entry)?.map(|(name, function)| (name, function.probe_place(Registers::RSI, true, false))))
}

/// The loaded and attached probes of one target. Dropping it detaches and unloads everything.
pub struct Probes<'obj> {
    skel: PsleakSkel<'obj>,
    links: Vec<Link>,
    probe_count: usize,
}

impl<'obj> Probes<'obj> {
    /// Loads the probes for `target` and attaches them. `storage` holds libbpf's object and
    /// must outlive the probes.
    pub fn attach(
        storage: &'obj mut MaybeUninit<OpenObject>,
        target: &Target,
        options: &Options,
    ) -> Result<Self, AttachError> {
        // libbpf would print its own diagnostics to stderr; ours say it in one line, unless its
        // are asked for (a verifier's refusal is explained in them).
        fn print(_: libbpf_rs::PrintLevel, text: String) {
            eprint!("{text}");
        }
        libbpf_rs::set_print(std::env::var_os(LIBBPF_LOG).map(|_| (libbpf_rs::PrintLevel::Info, print as _)));
        let btf_path = match &options.btf {
            Some(path) => Some(CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
                kernel_error("read the BTF path", libbpf_rs::Error::from(io::Error::from(io::ErrorKind::InvalidInput)))
            })?),
            None => None,
        };
        let open_opts = libbpf_rs::libbpf_sys::bpf_object_open_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_object_open_opts>() as _,
            btf_custom_path: btf_path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            ..Default::default()
        };
        let mut open = PsleakSkelBuilder::default()
            .open_opts(open_opts, storage)
            .map_err(|e| kernel_error("open the probe object", e))?;
        let rodata = open.maps.rodata_data.as_deref_mut().expect("the probes have read-only data");
        rodata.target_tgid = target.pid;
        rodata.empty_programs = options.empty_programs;
        let python_code = target.python_code_span();
        (rodata.python_code_start, rodata.python_code_end) = (python_code.start, python_code.end);
        // The pid given is a number of our pid namespace; the kernel's own are the initial one's.
        if let Some((dev, ino)) = own_pid_namespace()
            .map_err(|source| AttachError::Read { path: PathBuf::from(OWN_PID_NAMESPACE), source })?
        {
            (rodata.pidns_dev, rodata.pidns_ino) = (dev, ino);
        }
        open.maps.events.set_max_entries(options.ring_bytes).map_err(|e| kernel_error("size the event ring", e))?;
        let skel = open.load().map_err(classify_load)?;

        let mut probes = Self { skel, links: Vec::new(), probe_count: 0 };
        probes.attach_kernel_side()?;
        // Allocator probes go in after their return probes: a call whose entry is seen then
        // always has its return seen too (alloc.bpf.h copes with the reverse, and counts it).
        let plan = probed_functions(target, options)?;
        for binary in [Some(&target.libc), target.python.as_ref()].into_iter().flatten() {
            let (mut allocators, mut frees) = (Places::default(), Places::default());
            for probed in plan.iter().filter(|p| &p.binary == binary) {
                let places = if probed.role == Role::Free { &mut frees } else { &mut allocators };
                places.add(probed.place.offset, probed.cookie);
            }
            probes.attach_places(target.pid, binary, &allocators, &frees, options)?;
        }
        Ok(probes)
    }

    fn attach_kernel_side(&mut self) -> Result<(), AttachError> {
        let progs = &self.skel.progs;
        let mut links = Vec::new();
        for prog in [&progs.syscall_exit, &progs.thread_start, &progs.thread_exit, &progs.target_exec] {
            links.push(prog.attach().map_err(|e| classify(&format!("attach {}", prog.name().to_string_lossy()), e))?);
        }
        links.into_iter().for_each(|link| self.keep((link, 1)));
        Ok(())
    }

    /// The allocators' returns, the frees and the allocators' entries of one binary, in that
    /// order (see `attach`): a link for each that has places.
    fn attach_places(
        &mut self,
        pid: u32,
        binary: &Path,
        allocators: &Places,
        frees: &Places,
        options: &Options,
    ) -> Result<(), AttachError> {
        let progs = &self.skel.progs;
        let mut order = [
            (&progs.alloc_exit, allocators, true),
            (&progs.free_enter, frees, false),
            (&progs.alloc_enter, allocators, false),
        ];
        if options.entry_probes_first {
            order.reverse();
        }
        let mut links = Vec::new();
        for (prog, places, retprobe) in order.into_iter().filter(|(_, places, _)| !places.offsets.is_empty()) {
            links.push(attach_multi(prog, pid, binary, places, retprobe)?);
        }
        links.into_iter().for_each(|link| self.keep(link));
        Ok(())
    }

    fn keep(&mut self, (link, probes): (Link, usize)) {
        self.links.push(link);
        self.probe_count += probes;
    }

    /// The ring buffer map the events arrive in.
    pub fn events(&self) -> &dyn MapCore {
        &self.skel.maps.events
    }

    /// Number of probes attached (uprobes count once per function and direction).
    pub fn attachments(&self) -> usize {
        self.probe_count
    }

    /// The user stack recorded under `id`, innermost frame first.
    pub fn user_stack(&self, id: u32) -> Vec<u64> {
        let Ok(Some(bytes)) = self.skel.maps.stacks.lookup(&id.to_ne_bytes(), MapFlags::ANY) else {
            return Vec::new();
        };
        bytes
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8-byte chunk")))
            .take_while(|&addr| addr != 0)
            .collect()
    }

    /// Events lost in the kernel since attach, summed over CPUs.
    pub fn losses(&self) -> Losses {
        let sum = |kind: loss_kind| -> u64 {
            match self.skel.maps.losses.lookup_percpu(&kind.0.to_ne_bytes(), MapFlags::ANY) {
                Ok(Some(per_cpu)) => per_cpu
                    .iter()
                    .filter_map(|v| v.get(..8).and_then(|word| word.try_into().ok()).map(u64::from_ne_bytes))
                    .sum(),
                _ => 0,
            }
        };
        Losses {
            ring_full: sum(loss_kind::LOSS_RING_FULL),
            no_stack: sum(loss_kind::LOSS_NO_STACK),
            untracked_calls: sum(loss_kind::LOSS_UNTRACKED_CALL),
        }
    }

    /// How many times the target has exec'd since attach, as the kernel counts them: unlike the
    /// EV_EXEC events of the ring, no full ring can drop one.
    pub fn execs(&self) -> u64 {
        let bss = self.skel.maps.bss_data.as_deref().expect("the probes have a .bss");
        // SAFETY: a u64 in the map's memory, mapped for as long as the skeleton lives; the
        // kernel writes it concurrently, hence the volatile read.
        unsafe { std::ptr::read_volatile(&bss.target_execs) }
    }
}

/// One record from the ring: the event, and the stack words that follow it when it has
/// `EVF_STACK_SCAN`. `None` for a record too short to be an event (a corrupt message).
pub fn decode(record: &[u8]) -> Option<(types::event, Option<types::stack_scan>)> {
    if record.len() < size_of::<types::event>() {
        return None;
    }
    // SAFETY: the length is checked and every bit pattern is a valid `event` (plain integers).
    let event: types::event = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    if event.flags & EVF_STACK_SCAN == 0 {
        return Some((event, None));
    }
    if record.len() < size_of::<types::event_with_scan>() {
        return None;
    }
    // SAFETY: as above, for the larger record.
    let full: types::event_with_scan = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    Some((event, Some(full.scan)))
}

/// `events.h`: the mapping was made inside an allocator call.
pub const EVF_ALLOCATOR_INTERNAL: u8 = event_flag::EVF_ALLOCATOR_INTERNAL.0 as u8;
/// `events.h`: a stack scan follows the event.
pub const EVF_STACK_SCAN: u8 = event_flag::EVF_STACK_SCAN.0 as u8;

const OWN_PID_NAMESPACE: &str = "/proc/self/ns/pid";

/// The inode the kernel gives the initial pid namespace (PROC_PID_INIT_INO).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// The nsfs device and inode of our pid namespace, when it is not the initial one.
fn own_pid_namespace() -> io::Result<Option<(u64, u64)>> {
    let ns = std::fs::metadata(OWN_PID_NAMESPACE)?;
    Ok((ns.ino() != INITIAL_PID_NAMESPACE).then(|| (ns.dev(), ns.ino())))
}

/// Where one program goes in one binary: file offsets, each with its attach cookie.
#[derive(Default)]
struct Places {
    offsets: Vec<usize>,
    cookies: Vec<u64>,
}

impl Places {
    fn add(&mut self, offset: usize, cookie: u64) {
        self.offsets.push(offset);
        self.cookies.push(cookie);
    }
}

impl Drop for Probes<'_> {
    fn drop(&mut self) {
        // Detaching a uprobe link waits for an RCU grace period (30-75 ms each here): dropped
        // together, the waits overlap (measured: 0.32 s one after the other).
        std::thread::scope(|scope| {
            for link in self.links.drain(..) {
                scope.spawn(move || drop(link));
            }
        });
    }
}

/// One uprobe-multi link for all `places`, with the number of probes it holds. Detaching it
/// waits for the kernel once, where a link per function waits ~0.1 s each (measured: 4.4 s to
/// detach 40 single links). Offsets are resolved here (blazesym), not by libbpf, whose lookup
/// wants a .symtab that Debian's stripped libc lacks.
fn attach_multi(
    prog: &libbpf_rs::ProgramMut<'_>,
    pid: u32,
    binary: &Path,
    places: &Places,
    retprobe: bool,
) -> Result<(Link, usize), AttachError> {
    let what = format!("probe {} in {}", prog.name().to_string_lossy(), binary.display());
    let (offsets, cookies) = (places.offsets.clone(), places.cookies.clone());
    let opts = UprobeMultiOpts { offsets, cookies, retprobe, ..Default::default() };
    let link = prog.attach_uprobe_multi_with_opts(pid as i32, binary, "", opts).map_err(|e| classify(&what, e))?;
    Ok((link, places.offsets.len()))
}

fn allocator_cookie(op: alloc_op, domain: types::alloc_domain) -> u64 {
    u64::from(op.0) | (u64::from(domain.0) << 8)
}

fn free_cookie(op: free_op, domain: types::alloc_domain) -> u64 {
    u64::from(op.0) | (u64::from(domain.0) << 8)
}

fn kernel_error(what: &str, source: libbpf_rs::Error) -> AttachError {
    AttachError::Kernel { what: what.to_string(), source }
}

/// Sorts a libbpf error into what the user should be told.
fn classify(what: &str, err: libbpf_rs::Error) -> AttachError {
    match err.kind() {
        libbpf_rs::ErrorKind::PermissionDenied => AttachError::Permission(what.to_string()),
        _ if matches!(io_errno(&err), Some(libc::EPERM)) => AttachError::Permission(what.to_string()),
        _ if matches!(io_errno(&err), Some(libc::ESRCH)) => AttachError::TargetGone,
        _ => kernel_error(what, err),
    }
}

/// Sorts an error of loading the programs: EACCES is the verifier's answer (a lack of
/// privilege is EPERM there).
fn classify_load(err: libbpf_rs::Error) -> AttachError {
    match io_errno(&err) {
        Some(libc::EACCES) => AttachError::Rejected(err),
        _ => classify("load the probes", err),
    }
}

/// The OS error behind a libbpf error. libbpf-rs keeps it only in words ("... (os error 24)")
/// when no context wraps it as a source, so those are read too.
fn io_errno(err: &libbpf_rs::Error) -> Option<i32> {
    let source = std::error::Error::source(err).and_then(|s| s.downcast_ref::<io::Error>());
    source.and_then(io::Error::raw_os_error).or_else(|| {
        let text = format!("{err:#}");
        let (_, after) = text.rsplit_once("(os error ")?;
        after.split(')').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_error_of_a_libbpf_error_is_found() {
        let err = libbpf_rs::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(io_errno(&err), Some(libc::EMFILE));
        let shown = AttachError::Kernel { what: "load the probes".into(), source: err }.to_string();
        assert!(shown.starts_with("cannot load the probes: too many open files (raise the limit"), "{shown}");
    }

    #[test]
    fn a_program_the_verifier_refuses_is_not_called_a_lack_of_privilege() {
        let refused = classify_load(libbpf_rs::Error::from_raw_os_error(libc::EACCES)).to_string();
        assert!(refused.starts_with("this kernel's BPF verifier refused psleak's probes"), "{refused}");
        assert!(refused.ends_with("PSLEAK_LIBBPF_LOG=1 shows its log"), "{refused}");
        let denied = classify_load(libbpf_rs::Error::from_raw_os_error(libc::EPERM)).to_string();
        assert!(denied.starts_with("not allowed to load the probes: run psleak as root"), "{denied}");
    }

    /// The CPythons of this machine kind: Debian's (its allocator API in the executable) and
    /// pyenv's (in libpython). Their allocator functions differ by version and build.
    fn this_machines_pythons() -> Vec<PathBuf> {
        let mut found = vec![PathBuf::from("/usr/bin/python3.11")];
        let pyenv = std::env::var_os("PYENV_ROOT").map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from);
        for version in ["3.9", "3.10", "3.11", "3.12", "3.13"] {
            let libs = std::fs::read_dir(pyenv.join("versions")).into_iter().flatten().flatten();
            found.extend(
                libs.filter(|v| v.file_name().to_string_lossy().starts_with(&format!("{version}.")))
                    .map(|v| v.path().join(format!("lib/libpython{version}.so.1.0")))
                    .filter(|lib| lib.exists()),
            );
        }
        found
    }

    #[test]
    fn every_probe_sits_on_an_instruction_the_kernel_emulates_where_the_function_allows() {
        let libc = PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let pythons = this_machines_pythons();
        assert!(pythons.len() >= 6, "Debian's python3.11 and pyenv's 3.9-3.13 are on this machine kind: {pythons:?}");
        for python in pythons {
            let target = Target { pid: 0, libc: libc.clone(), python: Some(python.clone()), python_code: Vec::new() };
            let plan = probed_functions(&target, &Options::default()).unwrap();
            // glibc's memalign and aligned_alloc are one function, probed once.
            assert_eq!(plan.len(), 10 + 12, "{}: {plan:?}", python.display());
            for probed in plan {
                // These have no emulated instruction before their argument is overwritten or
                // they branch: reallocarray multiplies into its third argument's register at
                // once; pyenv's builds of the Free functions are `mov %rdi,%rsi; mov ctx,%rdi;
                // jmp *free` (and, from 3.12, a load into rax first), and without a process
                // there is no dispatch to follow (userspace/tests/probes.rs has them followed).
                let stepped = probed.function == "reallocarray"
                    || (probed.function.ends_with("Free") && python.starts_with("/root/.pyenv"));
                let on = probed.place.on;
                let what = format!(
                    "{} in {}: {on:?} at +{}",
                    probed.function,
                    probed.binary.display(),
                    probed.place.past_entry()
                );
                assert_eq!(on == Instruction::Stepped, stepped, "{what}");
            }
        }
    }

    #[test]
    fn a_question_about_python_or_no_allocations_leaves_the_other_allocators_unprobed() {
        let target = Target {
            pid: 0,
            libc: PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            python: Some(PathBuf::from("/usr/bin/python3.11")),
            python_code: Vec::new(),
        };
        let functions = |allocators| {
            let plan = probed_functions(&target, &Options { allocators, ..Options::default() }).unwrap();
            plan.into_iter().map(|p| p.function).collect::<Vec<_>>()
        };
        let python = functions(Allocators::Python);
        assert_eq!(python.len(), 13, "{python:?}");
        assert!(python.contains(&"pthread_create".to_string()) && !python.contains(&"malloc".to_string()));
        assert_eq!(functions(Allocators::None), ["pthread_create"]);
    }

    #[test]
    fn allocators_are_named_as_the_protocol_names_them() {
        assert_eq!("python".parse(), Ok(Allocators::Python));
        assert_eq!("none".parse(), Ok(Allocators::None));
        let refused = "heap".parse::<Allocators>().unwrap_err();
        assert!(refused.contains("unknown variant `heap`"), "{refused}");
    }

    #[test]
    fn decode_rejects_short_records() {
        assert!(decode(&[0u8; 8]).is_none());
        let event = types::event { flags: EVF_STACK_SCAN, ..Default::default() };
        // SAFETY: `event` is plain old data; this views its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&event as *const types::event).cast::<u8>(), size_of::<types::event>())
        };
        assert!(decode(bytes).is_none(), "flags announce a scan that is missing");
        let mut with_scan = bytes.to_vec();
        let words = types::stack_scan::default().words.len() as u64;
        with_scan.extend((0..=words).flat_map(u64::to_ne_bytes));
        let (decoded, scan) = decode(&with_scan).expect("a full record");
        assert_eq!(decoded.flags, EVF_STACK_SCAN);
        let scan = scan.expect("a stack scan");
        assert_eq!((scan.ip, scan.words[words as usize - 1]), (0, words));
    }
}
