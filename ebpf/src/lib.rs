//! psleak's kernel-side probes and their loader.
//!
//! The probes live in `src/bpf/` (BPF C, CO-RE); `build.rs` compiles them and generates the
//! skeleton, including the Rust twin of every type in `events.h` ([`types::event`], ...).
//! [`Probes::attach`] loads them for one target process; dropping [`Probes`] detaches them all.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, UprobeOpts};

mod skel {
    include!(concat!(env!("OUT_DIR"), "/psleak.skel.rs"));
}
pub use skel::types;
use skel::{PsleakSkel, PsleakSkelBuilder};
use types::alloc_op;

mod elf;
pub use elf::exports;
pub use libbpf_rs::OpenObject;

/// What to probe: one process, its libc, and the object exporting CPython's allocator API.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    /// The libc the process has mapped (its malloc family and pthread_create are probed there).
    pub libc: PathBuf,
    /// The executable or libpython that exports `PyObject_Malloc`, when the process is Python.
    pub python: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the event ring in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Kernel BTF to relocate against, for kernels that do not expose /sys/kernel/btf/vmlinux.
    pub btf: Option<PathBuf>,
    /// Probe `free` at its first instruction rather than past its NULL check (to measure the gain).
    pub free_probe_at_entry: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { ring_bytes: 32 << 20, btf: None, free_probe_at_entry: false }
    }
}

/// Why the probes could not be attached; each says what the user can do about it.
#[derive(Debug)]
pub enum AttachError {
    /// Loading or attaching was refused for lack of privileges.
    Permission(String),
    /// The target went away while probes were being attached.
    TargetGone,
    /// A required function is missing from the target's libc.
    MissingSymbol { path: PathBuf, symbol: &'static str },
    /// The kernel refused the probes for another reason.
    Kernel { what: String, source: libbpf_rs::Error },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Permission(what) => {
                write!(f, "not allowed to {what}: run psleak as root, or give it CAP_BPF and CAP_PERFMON")
            }
            Self::TargetGone => write!(f, "the target process exited while psleak was attaching"),
            Self::MissingSymbol { path, symbol } => write!(
                f,
                "{} has no `{symbol}`: psleak probes glibc's allocator and this libc is not glibc-compatible",
                path.display()
            ),
            Self::Kernel { what, source } => write!(f, "the kernel refused to {what}: {source}"),
        }
    }
}

impl std::error::Error for AttachError {}

/// Events lost in the kernel since attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Events dropped because the ring buffer was full: the ledger misses them.
    pub ring_full: u64,
    /// Events sent without a stack because the stack map was full or the walk failed.
    pub no_stack: u64,
}

const LIBC_ALLOCATORS: &[(&str, alloc_op, bool)] = &[
    // (function, how to read it, required)
    ("malloc", alloc_op::ALLOC_OP_SIZE_ARG1, true),
    ("calloc", alloc_op::ALLOC_OP_CALLOC, true),
    ("realloc", alloc_op::ALLOC_OP_REALLOC, true),
    ("posix_memalign", alloc_op::ALLOC_OP_POSIX_MEMALIGN, true),
    ("aligned_alloc", alloc_op::ALLOC_OP_SIZE_ARG2, false),
    ("memalign", alloc_op::ALLOC_OP_SIZE_ARG2, false),
    ("valloc", alloc_op::ALLOC_OP_SIZE_ARG1, false),
    ("pvalloc", alloc_op::ALLOC_OP_SIZE_ARG1, false),
    ("reallocarray", alloc_op::ALLOC_OP_REALLOCARRAY, false),
    ("pthread_create", alloc_op::ALLOC_OP_SPAWN, true),
];

/// CPython's allocator families: (prefix, domain). Each has Malloc, Calloc, Realloc and Free.
const PYTHON_FAMILIES: &[(&str, types::alloc_domain)] = &[
    ("PyMem_Raw", types::alloc_domain::DOMAIN_PYMEM_RAW),
    ("PyMem_", types::alloc_domain::DOMAIN_PYMEM),
    ("PyObject_", types::alloc_domain::DOMAIN_PYOBJECT),
];

/// The loaded and attached probes of one target. Dropping it detaches and unloads everything.
pub struct Probes<'obj> {
    skel: PsleakSkel<'obj>,
    links: Vec<Link>,
}

impl<'obj> Probes<'obj> {
    /// Loads the probes for `target` and attaches them. `storage` holds libbpf's object and
    /// must outlive the probes.
    pub fn attach(
        storage: &'obj mut MaybeUninit<OpenObject>,
        target: &Target,
        options: &Options,
    ) -> Result<Self, AttachError> {
        // libbpf would print its own diagnostics to stderr; ours say it in one line.
        libbpf_rs::set_print(None);
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
        open.maps.rodata_data.as_deref_mut().expect("the probes have read-only data").target_tgid = target.pid;
        open.maps.events.set_max_entries(options.ring_bytes).map_err(|e| kernel_error("size the event ring", e))?;
        let skel = open.load().map_err(|e| classify("load the probes", e))?;

        let mut probes = Self { skel, links: Vec::new() };
        probes.attach_kernel_side()?;
        probes.attach_libc(target, options)?;
        if let Some(python) = &target.python {
            probes.attach_python(target.pid, python)?;
        }
        Ok(probes)
    }

    fn attach_kernel_side(&mut self) -> Result<(), AttachError> {
        let progs = &self.skel.progs;
        for prog in [&progs.syscall_exit, &progs.thread_start, &progs.thread_exit] {
            let link = prog.attach().map_err(|e| classify(&format!("attach {}", prog.name().to_string_lossy()), e))?;
            self.links.push(link);
        }
        Ok(())
    }

    fn attach_libc(&mut self, target: &Target, options: &Options) -> Result<(), AttachError> {
        let domain = types::alloc_domain::DOMAIN_LIBC;
        for &(func, op, required) in LIBC_ALLOCATORS {
            match self.attach_allocator(target.pid, &target.libc, func, op, domain) {
                Err(AttachError::Kernel { source, .. }) if is_not_found(&source) => {
                    if required {
                        return Err(AttachError::MissingSymbol { path: target.libc.clone(), symbol: func });
                    }
                }
                result => result?,
            }
        }
        let free_offset = if options.free_probe_at_entry { 0 } else { elf::free_probe_offset(&target.libc, "free") };
        self.attach_free(target.pid, &target.libc, "free", free_offset, domain)
    }

    fn attach_python(&mut self, pid: u32, python: &Path) -> Result<(), AttachError> {
        for &(prefix, domain) in PYTHON_FAMILIES {
            for (suffix, op) in [
                ("Malloc", alloc_op::ALLOC_OP_SIZE_ARG1),
                ("Calloc", alloc_op::ALLOC_OP_CALLOC),
                ("Realloc", alloc_op::ALLOC_OP_REALLOC),
            ] {
                self.attach_allocator(pid, python, &format!("{prefix}{suffix}"), op, domain)?;
            }
            self.attach_free(pid, python, &format!("{prefix}Free"), 0, domain)?;
        }
        Ok(())
    }

    fn attach_allocator(
        &mut self,
        pid: u32,
        binary: &Path,
        func: &str,
        op: alloc_op,
        domain: types::alloc_domain,
    ) -> Result<(), AttachError> {
        let cookie = u64::from(op.0) | (u64::from(domain.0) << 8);
        let progs = &self.skel.progs;
        let enter = self
            .attach_uprobe(&progs.alloc_enter, pid, binary, func, 0, cookie, false)
            .map_err(|e| classify(&format!("probe {func}"), e))?;
        let exit = self
            .attach_uprobe(&progs.alloc_exit, pid, binary, func, 0, cookie, true)
            .map_err(|e| classify(&format!("probe {func}'s return"), e))?;
        self.links.extend([enter, exit]);
        Ok(())
    }

    fn attach_free(
        &mut self,
        pid: u32,
        binary: &Path,
        func: &str,
        offset: usize,
        domain: types::alloc_domain,
    ) -> Result<(), AttachError> {
        let cookie = u64::from(domain.0) << 8;
        let link = self
            .attach_uprobe(&self.skel.progs.free_enter, pid, binary, func, offset, cookie, false)
            .map_err(|e| classify(&format!("probe {func}"), e))?;
        self.links.push(link);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_uprobe(
        &self,
        prog: &libbpf_rs::ProgramMut<'_>,
        pid: u32,
        binary: &Path,
        func: &str,
        offset: usize,
        cookie: u64,
        retprobe: bool,
    ) -> libbpf_rs::Result<Link> {
        let opts = UprobeOpts { cookie, retprobe, func_name: Some(func.to_string()), ..Default::default() };
        prog.attach_uprobe_with_opts(pid as i32, binary, offset, opts)
    }

    /// The ring buffer map the events arrive in.
    pub fn events(&self) -> &dyn MapCore {
        &self.skel.maps.events
    }

    /// Number of programs attached (uprobes count once per function and direction).
    pub fn attachments(&self) -> usize {
        self.links.len()
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
        let sum = |index: u32| -> u64 {
            match self.skel.maps.losses.lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY) {
                Ok(Some(per_cpu)) => {
                    per_cpu.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().expect("u64 value"))).sum()
                }
                _ => 0,
            }
        };
        Losses { ring_full: sum(0), no_stack: sum(1) }
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
pub const EVF_ALLOCATOR_INTERNAL: u8 = 1;
/// `events.h`: a stack scan follows the event.
pub const EVF_STACK_SCAN: u8 = 2;

fn is_not_found(err: &libbpf_rs::Error) -> bool {
    matches!(err.kind(), libbpf_rs::ErrorKind::NotFound)
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

fn io_errno(err: &libbpf_rs::Error) -> Option<i32> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<io::Error>()).and_then(io::Error::raw_os_error)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        with_scan.extend((0..=32u64).flat_map(u64::to_ne_bytes));
        let (decoded, scan) = decode(&with_scan).expect("a full record");
        assert_eq!(decoded.flags, EVF_STACK_SCAN);
        let scan = scan.expect("a stack scan");
        assert_eq!((scan.ip, scan.words[31]), (0, 32));
    }
}
