//! Names for code addresses: function, module and file:line, through blazesym. Done lazily,
//! only for the sites that are reported, and cached per address. Addresses are resolved in
//! the ELF files psleak saw mapped, by file offset, so that sites can still be named after
//! the target has exited.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::process::Process;
use crate::sites::frame::Frame;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};

#[derive(Default)]
pub struct Symbols {
    symbolizer: Symbolizer,
    cache: HashMap<u64, Frame>,
    /// The files symbols are read from, opened once each with `open_mapped` (the target's
    /// user may have put anything at their paths) and kept open: blazesym reads them through
    /// /proc/self/fd, whose numbers must not be reused for another file.
    files: HashMap<PathBuf, Option<File>>,
}

impl Symbols {
    /// Frames for return addresses of `process` (each names the call instruction before it).
    pub fn frames(&mut self, return_addrs: &[u64], process: &Process) -> Vec<Frame> {
        let missing: Vec<u64> = return_addrs.iter().copied().filter(|a| !self.cache.contains_key(a)).collect();
        self.resolve(&missing, process);
        return_addrs.iter().map(|a| self.cache[a].clone()).collect()
    }

    fn resolve(&mut self, addrs: &[u64], process: &Process) {
        // A return address belongs to the instruction after the call: look up the call itself.
        let mut by_file: HashMap<&Path, Vec<(u64, u64)>> = HashMap::new();
        for &addr in addrs {
            self.cache.insert(addr, Frame { addr, function: None, module: None, file: None, line: None });
            if let Some((path, offset)) = process.file_location(addr.saturating_sub(1)) {
                by_file.entry(path).or_default().push((addr, offset));
            }
        }
        for (path, wanted) in by_file {
            let opened = self.files.entry(path.to_path_buf()).or_insert_with(|| psleak_ebpf::open_mapped(path).ok());
            let Some(file) = opened else { continue };
            let src = Source::Elf(Elf::new(psleak_ebpf::fd_path(file)));
            let offsets: Vec<u64> = wanted.iter().map(|&(_, offset)| offset).collect();
            let resolved = self.symbolizer.symbolize(&src, Input::FileOffset(&offsets)).unwrap_or_default();
            for (&(addr, _), symbol) in wanted.iter().zip(&resolved) {
                let frame = self.cache.get_mut(&addr).expect("inserted above");
                frame.module = Some(path.to_string_lossy().into_owned());
                if let Symbolized::Sym(sym) = symbol {
                    frame.function = Some(sym.name.to_string());
                    if let Some(code) = &sym.code_info {
                        frame.file = Some(code.file.to_string_lossy().into_owned());
                        frame.line = code.line;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn named_for_the_test() -> u64 {
        named_for_the_test as *const () as u64
    }

    #[test]
    fn names_this_process_own_functions() {
        let me = Process::open(std::process::id()).unwrap();
        let mut symbols = Symbols::default();
        // An address inside the function, as a return address would be (+1 for the call lookup).
        let frames = symbols.frames(&[named_for_the_test() + 2], &me);
        let name = frames[0].function.as_deref().unwrap_or_default();
        assert!(name.contains("named_for_the_test"), "{frames:?}");
        assert!(frames[0].file.as_deref().is_some_and(|f| f.ends_with("symbols.rs")), "{frames:?}");
        assert_eq!(symbols.frames(&[0x10], &me)[0].function, None, "no code there");
    }
}
