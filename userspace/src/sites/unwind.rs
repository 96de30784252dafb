//! DWARF unwinding of copied stack words: creation events carry the user instruction pointer,
//! stack pointer and rbp, and the 2 KiB above the stack pointer; with the CFI (`.eh_frame`) of
//! each module the stack passes through, each frame's caller is read from the exact word its
//! code saved it in — frame pointers or not, where a scan for return-address-looking words
//! would be fooled by stale ones.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::{Object, ObjectSection};

use crate::process::Process;
use crate::sites::elf::Segments;

/// Where a frame's canonical frame address (the caller's stack pointer) is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Sp,
    Bp,
}

/// How to step from one frame to its caller at an instruction: the CFA is `base + cfa`, the
/// return address is saved at CFA + `ra`, and the caller's rbp at CFA + `bp` (else rbp is
/// unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    base: Base,
    cfa: i64,
    ra: i64,
    bp: Option<i64>,
}

/// The `.eh_frame` (and its sorted index, `.eh_frame_hdr`) of one ELF file, and how its file
/// offsets map to addresses.
struct Cfi {
    data: Vec<u8>,
    eh_frame: std::ops::Range<usize>,
    eh_frame_hdr: Option<std::ops::Range<usize>>,
    bases: BaseAddresses,
    segments: Segments,
}

impl Cfi {
    /// The CFI of a file the target mapped. Its headers may lie (it may be anyone's file):
    /// every range is checked against what was read.
    fn load(path: &Path) -> Option<Self> {
        let mut data = Vec::new();
        psleak_ebpf::open_mapped(path).ok()?.read_to_end(&mut data).ok()?;
        let (eh_frame, eh_frame_hdr, bases, segments) = {
            let file = object::File::parse(&*data).ok()?;
            let range = |section: &object::Section<'_, '_>| {
                let (offset, size) = section.file_range()?;
                let end = offset.checked_add(size).filter(|&end| end <= data.len() as u64)?;
                Some(offset as usize..end as usize)
            };
            let section = file.section_by_name(".eh_frame")?;
            let mut bases = BaseAddresses::default().set_eh_frame(section.address());
            if let Some(text) = file.section_by_name(".text") {
                bases = bases.set_text(text.address());
            }
            let hdr = file.section_by_name(".eh_frame_hdr").and_then(|hdr| {
                bases = bases.clone().set_eh_frame_hdr(hdr.address());
                range(&hdr)
            });
            (range(&section)?, hdr, bases, Segments::of(&file))
        };
        Some(Self { data, eh_frame, eh_frame_hdr, bases, segments })
    }

    /// How to find the caller at `vaddr`, an address of the file's own.
    fn step(&self, vaddr: u64) -> Option<Step> {
        let eh_frame = EhFrame::new(&self.data[self.eh_frame.clone()], LittleEndian);
        let mut ctx = UnwindContext::new();
        // The sorted index finds the function's entry at once; without it, a scan of them all.
        let indexed = self.eh_frame_hdr.clone().and_then(|hdr| {
            let hdr = EhFrameHdr::new(&self.data[hdr], LittleEndian).parse(&self.bases, 8).ok()?;
            let table = hdr.table()?;
            Some(table.unwind_info_for_address(&eh_frame, &self.bases, &mut ctx, vaddr, EhFrame::cie_from_offset))
        });
        let row = match indexed {
            Some(row) => row.ok()?,
            None => eh_frame.unwind_info_for_address(&self.bases, &mut ctx, vaddr, EhFrame::cie_from_offset).ok()?,
        };
        let (base, cfa) = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => (Base::Sp, *offset),
            CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => (Base::Bp, *offset),
            _ => return None,
        };
        let ra = match row.register(X86_64::RA) {
            Some(RegisterRule::Offset(offset)) => offset,
            _ => return None,
        };
        let bp = match row.register(X86_64::RBP) {
            Some(RegisterRule::Offset(offset)) => Some(offset),
            None | Some(RegisterRule::SameValue) => None,
            _ => return None,
        };
        Some(Step { base, cfa, ra, bp })
    }
}

/// The registers an unwinding step needs, and the stack copied from `sp` upward (native-endian
/// words).
#[derive(Debug, Clone, Copy)]
pub struct Stack<'w> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub bytes: &'w [u8],
}

impl<'w> Stack<'w> {
    /// The copied word at `addr`, if the copy holds it.
    fn word(&self, addr: u64) -> Option<u64> {
        let offset = usize::try_from(addr.checked_sub(self.sp)?).ok()?;
        let bytes = self.bytes.get(offset..offset.checked_add(8)?)?;
        (offset % 8 == 0).then(|| u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// The copied words, from `sp` upward.
    pub fn words(self) -> impl Iterator<Item = u64> + 'w {
        self.bytes.chunks_exact(8).map(|word| u64::from_ne_bytes(word.try_into().expect("8 bytes")))
    }
}

const MAX_STEPS: usize = 1 << 20;
const MAX_FILES: usize = 1024;
/// Frames a chain holds at most (2 KiB of stack holds fewer real ones).
const MAX_FRAMES: usize = 256;

/// Unwinds stacks, caching the CFI per file and the step per instruction pointer.
#[derive(Default)]
pub struct Unwinder {
    files: HashMap<PathBuf, Option<Cfi>>,
    steps: HashMap<u64, Option<Step>>,
}

impl Unwinder {
    /// How to step to the caller when the process is at `ip`; None when the code there has no
    /// usable CFI.
    fn step(&mut self, process: &mut Process, ip: u64) -> Option<Step> {
        if let Some(&step) = self.steps.get(&ip) {
            return step;
        }
        // Bounded caches: a target may run code at endless addresses and map endless files.
        if self.steps.len() >= MAX_STEPS {
            self.steps.clear();
        }
        if self.files.len() >= MAX_FILES {
            self.files.clear();
        }
        // An address in no mapping known yet is not remembered: its code may be mapped a
        // moment later (a dlopen, the new program's libraries after an exec).
        let (path, file_offset) = process.locate(ip)?;
        let cfi = self.files.entry(path.clone()).or_insert_with(|| Cfi::load(&path)).as_ref();
        let step = cfi.and_then(|cfi| cfi.step(cfi.segments.address_of(file_offset)?));
        self.steps.insert(ip, step);
        step
    }

    /// After an exec: the steps were the old program's, by address.
    pub fn forget_addresses(&mut self) {
        self.steps.clear();
    }

    /// The return addresses of `stack`, from the code at its `ip` outwards, as far as the
    /// copied words and the CFI go. The words are the target's, hence anyone's: a chain ends
    /// at the first frame that does not move up the stack or returns outside code.
    /// It also ends before the first return address that `ends` says is where the caller's
    /// frames stop mattering (kept when it is the first).
    pub fn chain(&mut self, process: &mut Process, stack: Stack<'_>, ends: impl Fn(u64) -> bool) -> Vec<u64> {
        let (mut ip, mut sp, mut bp) = (stack.ip, stack.sp, stack.bp);
        let mut chain = Vec::with_capacity(32);
        while chain.len() < MAX_FRAMES {
            // A caller's frame is the call's: its return address may be the next function's first byte.
            let at = if chain.is_empty() { ip } else { ip - 1 };
            let Some(step) = self.step(process, at) else { break };
            let base = match step.base {
                Base::Sp => sp,
                Base::Bp => bp,
            };
            let Some(cfa) = base.checked_add_signed(step.cfa).filter(|&cfa| cfa > sp) else { break };
            let Some(ra) = cfa.checked_add_signed(step.ra).and_then(|at| stack.word(at)) else { break };
            if ra == 0 || (!chain.is_empty() && !process.in_code(ra)) {
                break;
            }
            let last = ends(ra);
            if last && !chain.is_empty() {
                break;
            }
            chain.push(ra);
            if last {
                break;
            }
            if let Some(saved) = step.bp {
                // The caller is known, not how to go past it without its rbp.
                let Some(caller_bp) = cfa.checked_add_signed(saved).and_then(|at| stack.word(at)) else { break };
                bp = caller_bp;
            }
            (ip, sp) = (ra, cfa);
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_return_address_at_libc_functions_entries() {
        let me = Process::open(std::process::id()).unwrap();
        let libc = me.libc().expect("a dynamic libc");
        let cfi = Cfi::load(&libc).expect("libc has .eh_frame");
        // At a function's first instruction the return address is at the stack pointer.
        let entry = |name: &str| -> u64 {
            let file = object::File::parse(&*cfi.data).unwrap();
            object::Object::dynamic_symbols(&file)
                .find(|s| object::ObjectSymbol::name(s) == Ok(name))
                .map(|s| object::ObjectSymbol::address(&s))
                .unwrap()
        };
        let at_entry = Step { base: Base::Sp, cfa: 8, ra: -8, bp: None };
        assert_eq!(cfi.step(entry("socket")), Some(at_entry));
        assert_eq!(cfi.step(entry("malloc")), Some(at_entry));
    }

    #[test]
    fn locates_code_of_this_process() {
        let mut me = Process::open(std::process::id()).unwrap();
        let here = locates_code_of_this_process as *const () as u64;
        let (path, offset) = me.locate(here).expect("this test's own code is mapped from a file");
        assert_eq!(path, std::env::current_exe().unwrap());
        assert!(offset > 0);
        let mut unwinder = Unwinder::default();
        let at_entry = Step { base: Base::Sp, cfa: 8, ra: -8, bp: None };
        assert_eq!(unwinder.step(&mut me, here), Some(at_entry), "at a function's entry");
    }
}
