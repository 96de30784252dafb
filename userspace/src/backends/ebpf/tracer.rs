//! The eBPF backend: checks that probes can be had, attaches them to a process, and turns
//! their ring records into [`Event`]s for the ledger.

use std::collections::HashMap;
use std::fs;
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use psleak_ebpf::types::{self, alloc_domain, event_kind};
use psleak_ebpf::{OpenObject, Options, Probes, Target, EVF_ALLOCATOR_INTERNAL};

use crate::backends::ebpf::python::PythonStacks;
use crate::error::Error;
use crate::model::event::{Change, Domain, Event, FdKind, Origin};
use crate::model::ledger::Ledger;
use crate::process::Process;
use crate::sites::frame::PyFrame;
use crate::sites::unwind::{Stack, Unwinder};

const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// CAP_SYS_ADMIN's bit in /proc/self/status's CapEff. It implies CAP_BPF and CAP_PERFMON, and
/// uprobes need it: with CAP_BPF + CAP_PERFMON alone, perf_event_open refuses them (measured
/// on this project's 6.18 kernel).
const CAP_SYS_ADMIN: u32 = 21;

/// Checks what the kernel side needs before touching it, so each lack gets its own message.
pub fn check_prerequisites(options: &Options) -> Result<(), Error> {
    if !may_load_bpf() {
        return Err(Error::NotPrivileged);
    }
    match &options.btf {
        Some(path) if !path.is_file() => Err(Error::NoBtf(format!("no BTF file at {}", path.display()))),
        Some(path) if !looks_like_btf(path) => Err(Error::NoBtf(format!("{} is not a BTF file", path.display()))),
        None if !Path::new(KERNEL_BTF).exists() => Err(Error::NoBtf(format!("this kernel has no {KERNEL_BTF}"))),
        _ => Ok(()),
    }
}

/// Raw BTF (magic 0xEB9F) or an ELF file, which libbpf searches for a .BTF section.
fn looks_like_btf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    let read = fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    read.is_ok() && (magic[..2] == 0xEB9Fu16.to_le_bytes() || magic == *b"\x7fELF")
}

fn may_load_bpf() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    caps & (1 << CAP_SYS_ADMIN) != 0
}

/// The probe target for an opened process: its libc, and its Python runtime if it has one.
pub fn target_of(process: &mut Process) -> Result<Target, Error> {
    let Some(libc) = process.wait_for_libc(Duration::from_secs(2)) else {
        return Err(if process.is_alive() {
            Error::NoDynamicLibc(process.pid())
        } else {
            Error::NotTraceable(process.pid(), "it has already exited".into())
        });
    };
    let python = process.python_candidates().into_iter().find(|p| psleak_ebpf::exports(p, "PyObject_Malloc"));
    let python_code = python.as_deref().map_or_else(Vec::new, |p| process.code_of(p));
    Ok(Target { pid: process.pid(), libc, python, python_code, python_stack: None })
}

/// Prints where each of psleak's uprobes goes in `pid` (`psleak probes`): nothing is attached.
pub fn print_probe_places(pid: u32, json: bool) -> Result<(), Error> {
    use std::io::Write;
    let target = target_of(&mut Process::open(pid)?)?;
    let plan = psleak_ebpf::probed_functions(&target, &Options::default())?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| writeln!(out, "{line}").map_err(|_| Error::OutputClosed);
    if !json {
        say(format!("{:<18} {:>22}  {:<15} binary", "function", "at", "instruction"))?;
    }
    for probed in plan {
        let at = probed.place.past_entry();
        let (function, binary, instruction) = (&probed.function, probed.binary.display(), probed.place.on.name());
        // A Py*_Free probed in the free it jumps to: the offset is into that one.
        let within = &probed.within;
        say(if json {
            let emulated = probed.place.on != psleak_ebpf::Instruction::Stepped;
            serde_json::json!({"function": function, "within": within, "binary": binary.to_string(), "offset": at,
                "instruction": instruction, "emulated": emulated})
            .to_string()
        } else {
            let at = format!("{}+{at}", within.as_deref().unwrap_or_default());
            format!("{function:<18} {at:>22}  {instruction:<15} {binary}")
        })?;
    }
    Ok(())
}

/// Loads and attaches the probes to `process`; fails if it died meanwhile.
pub fn attach<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    process: &Process,
    target: &Target,
    options: &Options,
) -> Result<Probes<'obj>, Error> {
    let probes = Probes::attach(storage, target, options).map_err(|err| {
        if process.is_alive() {
            Error::Attach(err)
        } else {
            Error::Attach(psleak_ebpf::AttachError::TargetGone)
        }
    })?;
    if !process.is_alive() {
        return Err(Error::Attach(psleak_ebpf::AttachError::TargetGone));
    }
    Ok(probes)
}

fn domain_of(raw: u8) -> Option<Domain> {
    Some(match alloc_domain(u32::from(raw)) {
        alloc_domain::DOMAIN_LIBC => Domain::Libc,
        alloc_domain::DOMAIN_PYMEM_RAW => Domain::PymemRaw,
        alloc_domain::DOMAIN_PYMEM => Domain::Pymem,
        alloc_domain::DOMAIN_PYOBJECT => Domain::Pyobject,
        _ => return None,
    })
}

/// What the ring callback feeds: the ledger, through the decoder of the target's records.
pub struct Collector {
    pub ledger: Ledger,
    pub decoder: RecordDecoder,
    /// Records that could not be decoded.
    pub corrupt: u64,
}

impl Collector {
    /// A collector whose ledger keeps at most `ledger_room` heap blocks and mappings; `python`
    /// names the Python stacks of a Python target.
    pub fn new(process: Process, ledger_room: usize, python: Option<PythonStacks>) -> Self {
        Self { ledger: Ledger::with_room(ledger_room), decoder: RecordDecoder::new(process, python), corrupt: 0 }
    }

    pub fn ingest(&mut self, record: &[u8]) {
        let event = psleak_ebpf::decode(record).and_then(|record| self.decoder.event(&record));
        match event {
            Some(event) => {
                match event.change {
                    Change::Exec => self.decoder.forget_code(),
                    Change::Map { .. } | Change::Remap { .. } => self.decoder.process.mapped(),
                    _ => {}
                }
                self.ledger.apply(&event);
            }
            None => self.corrupt += 1,
        }
    }
}

/// Distinct stacks kept at most: a target with endless callers (JIT code, or a hostile one)
/// must not grow the table without bound.
const MAX_CHAINS: usize = 1 << 20;

/// Stacks by id, each kept once.
struct Interned<T> {
    stacks: Vec<Vec<T>>,
    ids: HashMap<Vec<T>, u32>,
}

impl<T> Default for Interned<T> {
    fn default() -> Self {
        Self { stacks: Vec::new(), ids: HashMap::new() }
    }
}

impl<T: Clone + Eq + std::hash::Hash> Interned<T> {
    /// The id of `stack`; None past `MAX_CHAINS` distinct ones (the event keeps the rest).
    fn intern(&mut self, stack: Vec<T>) -> Option<u32> {
        if let Some(&id) = self.ids.get(&stack) {
            return Some(id);
        }
        if self.stacks.len() >= MAX_CHAINS {
            return None;
        }
        let id = self.stacks.len() as u32;
        self.stacks.push(stack.clone());
        self.ids.insert(stack, id);
        Some(id)
    }

    fn get(&self, id: u32) -> &[T] {
        self.stacks.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

/// Turns probe records into events, finding the callers of syscall-side events in the
/// target's stack.
pub struct RecordDecoder {
    pub process: Process,
    unwinder: Unwinder,
    chains: Interned<u64>,
    python: Option<PythonStacks>,
    python_stacks: Interned<PyFrame>,
}

impl RecordDecoder {
    pub fn new(process: Process, python: Option<PythonStacks>) -> Self {
        let (chains, python_stacks) = (Interned::default(), Interned::default());
        Self { process, unwinder: Unwinder::default(), chains, python, python_stacks }
    }

    /// After an exec: the old program's code is unmapped, its addresses name nothing now.
    pub fn forget_code(&mut self) {
        self.process.forget_mappings();
        self.unwinder.forget_addresses();
    }

    /// The event of a record; `None` for a record that does not make sense.
    pub fn event(&mut self, record: &psleak_ebpf::Record) -> Option<Event> {
        let raw = &record.event;
        let change = change_of(raw)?;
        // Named now, while the code objects are alive (the thread is still in them).
        let python = match (&record.python, &mut self.python) {
            (Some(stack), Some(names)) => Some(names.frames(stack, &self.process)).filter(|frames| !frames.is_empty()),
            _ => None,
        };
        let (caller, chain) = match &record.scan {
            Some(scan) => {
                let interpreter = self.python.as_ref().filter(|_| python.is_some());
                let ends = |ra: u64| interpreter.is_some_and(|names| names.ends_native_chain(ra));
                let chain = unwind(&mut self.unwinder, &mut self.process, scan, ends);
                (chain.first().copied(), if chain.len() > 1 { self.chains.intern(chain) } else { None })
            }
            None => (None, None),
        };
        let python = python.and_then(|frames| self.python_stacks.intern(frames));
        let origin = Origin { caller, chain, python };
        Some(Event { ts_ns: raw.ts_ns, tid: raw.tid, origin, change })
    }

    /// The return addresses unwound under `Origin::chain`.
    pub fn chain(&self, id: u32) -> &[u64] {
        self.chains.get(id)
    }

    /// The Python frames under `Origin::python`, innermost first.
    pub fn python_stack(&self, id: u32) -> &[PyFrame] {
        self.python_stacks.get(id)
    }
}

/// Return addresses in a stack scan, from the code at `scan.ip` outwards, unwound with each
/// module's CFI until `ends`. Without usable CFI at `scan.ip`, the first word that follows a
/// call instruction.
fn unwind(
    unwinder: &mut Unwinder,
    process: &mut Process,
    scan: &psleak_ebpf::Scan<'_>,
    ends: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let stack = Stack { ip: scan.ip, sp: scan.sp, bp: scan.bp, bytes: scan.words };
    let chain = unwinder.chain(process, stack, ends);
    if !chain.is_empty() {
        return chain;
    }
    stack.words().find(|&w| process.is_return_address(w)).into_iter().collect()
}

fn change_of(raw: &types::event) -> Option<Change> {
    let domain = || domain_of(raw.domain);
    let internal = raw.flags & EVF_ALLOCATOR_INTERNAL != 0;
    let fd = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    Some(match event_kind(u32::from(raw.kind)) {
        event_kind::EV_ALLOC => Change::Alloc { domain: domain()?, addr: raw.addr, size: raw.size },
        event_kind::EV_FREE => Change::Free { domain: domain()?, addr: raw.addr },
        event_kind::EV_REALLOC => {
            Change::Realloc { domain: domain()?, old: raw.old_addr, new: raw.addr, size: raw.size }
        }
        event_kind::EV_MMAP => Change::Map { addr: raw.addr, len: raw.size, allocator_internal: internal },
        event_kind::EV_MUNMAP => Change::Unmap { addr: raw.addr, len: raw.size },
        event_kind::EV_MREMAP => Change::Remap {
            old: raw.old_addr,
            old_len: raw.aux,
            new: raw.addr,
            new_len: raw.size,
            allocator_internal: internal,
        },
        event_kind::EV_FD_OPEN => {
            Change::FdOpen { fd: fd(raw.addr), kind: FdKind::from_mode(raw.aux, raw.sock_family, raw.sock_type) }
        }
        event_kind::EV_FD_CLOSE => Change::FdClose { first: fd(raw.addr), last: fd(raw.aux) },
        event_kind::EV_THREAD_START => Change::ThreadStart { tid: u32::try_from(raw.addr).ok()? },
        event_kind::EV_THREAD_EXIT => Change::ThreadExit { tid: u32::try_from(raw.addr).ok()? },
        event_kind::EV_EXEC => Change::Exec,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: event_kind, domain: alloc_domain) -> psleak_ebpf::Record<'static> {
        let event =
            types::event { kind: kind.0 as u8, domain: domain.0 as u8, addr: 0x1000, size: 24, ..Default::default() };
        psleak_ebpf::Record { event, ..Default::default() }
    }

    fn decoder() -> RecordDecoder {
        RecordDecoder::new(Process::open(std::process::id()).unwrap(), None)
    }

    #[test]
    fn decodes_every_kind() {
        let mut d = decoder();
        let alloc = d.event(&record(event_kind::EV_ALLOC, alloc_domain::DOMAIN_PYOBJECT)).unwrap();
        assert_eq!(alloc.change, Change::Alloc { domain: Domain::Pyobject, addr: 0x1000, size: 24 });
        assert_eq!(alloc.origin, Origin::default(), "a record without stack words has no origin");
        let mut close = record(event_kind::EV_FD_CLOSE, alloc_domain::DOMAIN_LIBC);
        close.event.aux = u64::from(u32::MAX);
        assert_eq!(d.event(&close).unwrap().change, Change::FdClose { first: 0x1000, last: i32::MAX });
        assert!(d.event(&record(event_kind(99), alloc_domain::DOMAIN_LIBC)).is_none(), "unknown kind");
        assert!(d.event(&record(event_kind::EV_ALLOC, alloc_domain(7))).is_none(), "unknown domain");
    }

    #[test]
    fn reads_the_caller_from_the_slot_the_cfi_names() {
        let mut d = decoder();
        // At a function's entry, the return address is the word at the stack pointer; the
        // stale words above it must not be taken for it.
        let entry = reads_the_caller_from_the_slot_the_cfi_names as *const () as u64;
        let words: Vec<u8> = [0xdead_beef, entry + 1].iter().flat_map(|w: &u64| w.to_ne_bytes()).collect();
        let mut scan = psleak_ebpf::Scan { ip: entry, sp: 0x7000_0000, bp: 0, words: &words };
        let mut raw = record(event_kind::EV_MMAP, alloc_domain::DOMAIN_LIBC);
        raw.scan = Some(scan);
        assert_eq!(d.event(&raw).unwrap().origin.caller, Some(0xdead_beef));
        // Without CFI (an address in no file), only a word that follows a call qualifies.
        scan.ip = 0x10;
        raw.scan = Some(scan);
        assert_eq!(d.event(&raw).unwrap().origin.caller, None);
    }
}
