//! Names for code addresses: function, module and file:line, through blazesym. Done lazily,
//! only for the sites that are reported, and cached per address. Addresses are resolved in
//! the ELF files psleak saw mapped, by file offset, so that sites can still be named after
//! the target has exited.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::process::Process;
use crate::sites::elf::Segments;
use crate::sites::frame::Frame;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Sym, Symbolized, Symbolizer};
use object::{Object, ReadCache};

#[derive(Default)]
pub struct Symbols {
    symbolizer: Symbolizer,
    /// The frames of each return address: more than one where the call was inlined.
    cache: HashMap<u64, Vec<Frame>>,
    /// The files symbols are read from, opened once each with `open_mapped` (the target's
    /// user may have put anything at their paths) and kept open: blazesym reads them through
    /// /proc/self/fd, whose numbers must not be reused for another file.
    files: HashMap<PathBuf, Option<File>>,
    modules: HashMap<PathBuf, Module>,
}

impl Symbols {
    /// Frames for return addresses of `process` (each names the call instruction before it),
    /// innermost first: a call inside an inlined function gives a frame for it, then for each
    /// function it was inlined into (as `addr2line -i`).
    pub fn frames(&mut self, return_addrs: &[u64], process: &Process) -> Vec<Frame> {
        let missing: Vec<u64> = return_addrs.iter().copied().filter(|a| !self.cache.contains_key(a)).collect();
        self.resolve(&missing, process);
        return_addrs.iter().flat_map(|a| self.cache[a].iter().cloned()).collect()
    }

    fn resolve(&mut self, addrs: &[u64], process: &Process) {
        // A return address belongs to the instruction after the call: look up the call itself.
        let mut by_file: HashMap<&Path, Vec<(u64, u64)>> = HashMap::new();
        for &addr in addrs {
            self.cache.insert(addr, vec![Frame::unknown(addr)]);
            if let Some((path, offset)) = process.file_location(addr.saturating_sub(1)) {
                by_file.entry(path).or_default().push((addr, offset));
            }
        }
        for (path, wanted) in by_file {
            let opened = self.files.entry(path.to_path_buf()).or_insert_with(|| psleak_ebpf::open_mapped(path).ok());
            let Some(file) = opened else { continue };
            let module = self.modules.entry(path.to_path_buf()).or_insert_with(|| Module::read(file));
            let src = Source::Elf(Elf::new(psleak_ebpf::fd_path(file)));
            let offsets: Vec<u64> = wanted.iter().map(|&(_, offset)| offset).collect();
            let resolved = self.symbolizer.symbolize(&src, Input::FileOffset(&offsets)).unwrap_or_default();
            for (&(addr, file_offset), symbol) in wanted.iter().zip(&resolved) {
                let unnamed = Frame {
                    module: Some(path.to_string_lossy().into_owned()),
                    offset: module.segments.address_of(file_offset),
                    build_id: module.build_id.clone(),
                    ..Frame::unknown(addr)
                };
                let frames = match symbol {
                    Symbolized::Sym(sym) => named(sym, &unnamed),
                    _ => vec![unnamed],
                };
                self.cache.insert(addr, frames);
            }
        }
    }
}

/// The frames of one symbolized call, innermost first. blazesym gives the symbol (the function
/// the code is in) with the line there, then the functions inlined at it, outermost first,
/// each with its own line there (measured on tests/targets/inlined.c, as `addr2line -i`).
fn named(sym: &Sym<'_>, unnamed: &Frame) -> Vec<Frame> {
    let functions = std::iter::once(&sym.name).chain(sym.inlined.iter().map(|f| &f.name));
    let places = std::iter::once(sym.code_info.as_deref()).chain(sym.inlined.iter().map(|f| f.code_info.as_ref()));
    let mut frames: Vec<Frame> = functions
        .zip(places)
        .map(|(function, place)| Frame {
            function: Some(function.to_string()),
            file: place.map(|code| code.file.to_string_lossy().into_owned()),
            line: place.and_then(|code| code.line),
            ..unnamed.clone()
        })
        .collect();
    frames.reverse();
    frames
}

/// What a module's frames say beyond its symbols: its build-id, and where its file offsets sit
/// in its own addresses. Read from the ELF headers and notes only, never mapped: the target's
/// user owns the file, and could truncate a mapping under us.
#[derive(Default)]
struct Module {
    build_id: Option<String>,
    segments: Segments,
}

impl Module {
    fn read(file: &File) -> Self {
        let data = ReadCache::new(file);
        let Ok(elf) = object::File::parse(&data) else { return Self::default() };
        let build_id = elf.build_id().ok().flatten().map(|id| id.iter().map(|b| format!("{b:02x}")).collect());
        Self { build_id, segments: Segments::of(&elf) }
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
