//! One step of DWARF unwinding: where, relative to the stack pointer, a function keeps its
//! return address at a given instruction. Syscall-side events carry the user instruction
//! pointer and the words above the stack pointer; with the CFI of the code there (libc's
//! syscall wrapper, say, which may have pushed a frame), the caller is read from the exact
//! word, where a scan for return-address-looking words would be fooled by stale ones.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use gimli::{BaseAddresses, CfaRule, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64};
use object::{Object, ObjectSection};

use crate::process::Process;
use crate::sites::elf::Segments;

/// The `.eh_frame` of one ELF file, and how its file offsets map to addresses.
struct Cfi {
    data: Vec<u8>,
    eh_frame: std::ops::Range<usize>,
    bases: BaseAddresses,
    segments: Segments,
}

impl Cfi {
    /// The CFI of a file the target mapped. Its headers may lie (it may be anyone's file):
    /// every range is checked against what was read.
    fn load(path: &Path) -> Option<Self> {
        let mut data = Vec::new();
        psleak_ebpf::open_mapped(path).ok()?.read_to_end(&mut data).ok()?;
        let (eh_frame, bases, segments) = {
            let file = object::File::parse(&*data).ok()?;
            let section = file.section_by_name(".eh_frame")?;
            let (offset, size) = section.file_range()?;
            let end = offset.checked_add(size).filter(|&end| end <= data.len() as u64)?;
            let mut bases = BaseAddresses::default().set_eh_frame(section.address());
            if let Some(text) = file.section_by_name(".text") {
                bases = bases.set_text(text.address());
            }
            (offset as usize..end as usize, bases, Segments::of(&file))
        };
        Some(Self { data, eh_frame, bases, segments })
    }

    /// Offset from the stack pointer, in words, of the return address at `vaddr`.
    fn return_address_slot(&self, vaddr: u64) -> Option<usize> {
        let eh_frame = EhFrame::new(&self.data[self.eh_frame.clone()], LittleEndian);
        let mut ctx = UnwindContext::new();
        let row = eh_frame.unwind_info_for_address(&self.bases, &mut ctx, vaddr, EhFrame::cie_from_offset).ok()?;
        let cfa_offset = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => *offset,
            _ => return None,
        };
        let ra_offset = match row.register(X86_64::RA) {
            Some(RegisterRule::Offset(offset)) => offset,
            _ => return None,
        };
        let slot = cfa_offset.checked_add(ra_offset)?;
        (slot >= 0 && slot % 8 == 0).then_some(slot as usize / 8)
    }
}

const MAX_SLOTS: usize = 1 << 20;
const MAX_FILES: usize = 1024;

/// Finds return-address slots, caching per file and per instruction pointer.
#[derive(Default)]
pub struct Unwinder {
    files: HashMap<PathBuf, Option<Cfi>>,
    slots: HashMap<u64, Option<usize>>,
}

impl Unwinder {
    /// The index, in words above the stack pointer, of the return address when the process
    /// is at `ip`; None when the code there has no usable CFI.
    pub fn return_address_slot(&mut self, process: &mut Process, ip: u64) -> Option<usize> {
        if let Some(&slot) = self.slots.get(&ip) {
            return slot;
        }
        // Bounded caches: a target may run code at endless addresses and map endless files.
        if self.slots.len() >= MAX_SLOTS {
            self.slots.clear();
        }
        if self.files.len() >= MAX_FILES {
            self.files.clear();
        }
        let slot = process.locate(ip).and_then(|(path, file_offset)| {
            let cfi = self.files.entry(path.clone()).or_insert_with(|| Cfi::load(&path)).as_ref()?;
            cfi.return_address_slot(cfi.segments.address_of(file_offset)?)
        });
        self.slots.insert(ip, slot);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_return_address_of_libc_syscall_wrappers() {
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
        assert_eq!(cfi.return_address_slot(entry("socket")), Some(0));
        assert_eq!(cfi.return_address_slot(entry("malloc")), Some(0));
    }

    #[test]
    fn locates_code_of_this_process() {
        let mut me = Process::open(std::process::id()).unwrap();
        let here = locates_code_of_this_process as *const () as u64;
        let (path, offset) = me.locate(here).expect("this test's own code is mapped from a file");
        assert_eq!(path, std::env::current_exe().unwrap());
        assert!(offset > 0);
        let mut unwinder = Unwinder::default();
        assert_eq!(unwinder.return_address_slot(&mut me, here), Some(0), "at a function's entry");
    }
}
