//! Reading the target's ELF files: which symbols they export, and where in a function to put
//! a uprobe.
//!
//! Where in a function the probe goes is `placement`'s business; this reads its code.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use blazesym::inspect::{source::Elf, source::Source, Inspector};
use blazesym::SymType;

use crate::placement::{self, Instruction, Registers};

/// Whether `binary` defines `symbol` in its own symbol tables (false if it cannot be read).
pub fn exports(binary: &Path, symbol: &str) -> bool {
    Binary::open(binary).is_ok_and(|binary| binary.function(symbol).is_ok_and(|f| f.is_some()))
}

/// Where a probe of `func` goes (see `placement`): its file offset, and what sits there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The function's first instruction.
    pub entry: usize,
    /// The probe's instruction, at or after `entry`.
    pub offset: usize,
    pub on: Instruction,
}

impl Place {
    /// How far past the function's entry the probe sits.
    pub fn past_entry(&self) -> usize {
        self.offset - self.entry
    }
}

/// A function of a binary: its file offset, and the first of its code.
#[derive(Debug, Clone)]
pub struct Function {
    pub entry: u64,
    pub code: Vec<u8>,
}

impl Function {
    /// Where to probe it (see `placement::place`); at its entry when `at_entry`.
    pub fn probe_place(&self, reads: Registers, pass_null_check: bool, at_entry: bool) -> Place {
        let (past, on) = if at_entry {
            (0, placement::instruction_at(&self.code))
        } else {
            placement::place(&self.code, reads, pass_null_check)
        };
        Place { entry: self.entry as usize, offset: self.entry as usize + past, on }
    }
}

/// A binary whose functions are being placed: opened once, its symbol tables parsed once
/// (blazesym's inspector keeps them) for all its functions.
pub struct Binary {
    path: PathBuf,
    file: File,
    inspector: Inspector,
}

impl Binary {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { path: path.to_path_buf(), file: open_mapped(path)?, inspector: Inspector::new() })
    }

    /// Where to probe `func` (see `placement::place`); at its entry when `at_entry`. None when
    /// the binary does not define it.
    pub fn probe_place(
        &self,
        func: &str,
        reads: Registers,
        pass_null_check: bool,
        at_entry: bool,
    ) -> io::Result<Option<Place>> {
        let Some(function) = self.function(func)? else { return Ok(None) };
        Ok(Some(function.probe_place(reads, pass_null_check, at_entry)))
    }

    /// The function `func`, if the binary defines it.
    pub fn function(&self, func: &str) -> io::Result<Option<Function>> {
        // The binary's own symbol tables: a separate debug file knows no file offsets.
        let found = self.inspector.lookup(&self.own_symbols(), &[func]).ok();
        let symbol = found.as_ref().and_then(|found| found.first()).and_then(|symbols| symbols.first());
        match symbol.and_then(|s| Some((s.file_offset?, s.size))) {
            Some((entry, size)) => self.read_function(entry, size).map(Some),
            None => Ok(None),
        }
    }

    /// The address `symbol` has in the binary's own addresses (st_value), if it defines it.
    pub fn symbol_address(&self, symbol: &str) -> io::Result<Option<u64>> {
        Ok(self.symbol(symbol).map(|(addr, _)| addr))
    }

    /// The addresses the function `symbol` spans in the binary's own addresses, if it defines
    /// it with a size.
    pub fn function_span(&self, symbol: &str) -> io::Result<Option<std::ops::Range<u64>>> {
        let found = self.inspector.lookup(&self.own_symbols(), &[symbol]).ok();
        let info = found.as_ref().and_then(|found| found.first()).and_then(|symbols| symbols.first());
        Ok(info.and_then(|s| Some(s.addr..s.addr.checked_add(u64::try_from(s.size?).ok()?)?)))
    }

    /// The first `len` bytes of the data symbol `symbol` as the file holds them, if it defines
    /// it there (not in .bss).
    pub fn symbol_bytes(&self, symbol: &str, len: usize) -> io::Result<Option<Vec<u8>>> {
        let Some((_, Some(offset))) = self.symbol(symbol) else { return Ok(None) };
        let mut bytes = vec![0u8; len];
        self.file.read_exact_at(&mut bytes, offset)?;
        Ok(Some(bytes))
    }

    /// The address and file offset of `symbol`, from the binary's own symbol tables.
    fn symbol(&self, symbol: &str) -> Option<(u64, Option<u64>)> {
        let found = self.inspector.lookup(&self.own_symbols(), &[symbol]).ok()?;
        let info = found.first()?.first()?;
        Some((info.addr, info.file_offset))
    }

    /// The function that starts at file offset `entry`, and its name, if one does.
    pub fn function_at(&self, entry: u64) -> io::Result<Option<(String, Function)>> {
        let mut found = None;
        let _ = self.inspector.for_each(&self.own_symbols(), |symbol| {
            if symbol.sym_type == SymType::Function && symbol.file_offset == Some(entry) {
                found = Some((symbol.name.to_string(), symbol.size));
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        match found {
            Some((name, size)) => Ok(Some((name, self.read_function(entry, size)?))),
            None => Ok(None),
        }
    }

    fn own_symbols(&self) -> Source {
        let mut elf = Elf::new(fd_path(&self.file));
        elf.debug_syms = false;
        Source::Elf(elf)
    }

    /// The code of the function at `entry` of `size` bytes, as much of it as placement reads.
    fn read_function(&self, entry: u64, size: Option<usize>) -> io::Result<Function> {
        // The walk stays inside the function: past its end is another's code.
        let mut code = vec![0u8; size.filter(|&size| size > 0).map_or(PROLOGUE_BYTES, |size| size.min(PROLOGUE_BYTES))];
        let read = self.file.read_at(&mut code, entry)?;
        code.truncate(read);
        Ok(Function { entry, code })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Bytes read from a function's entry on: enough for any prologue the placement walks.
const PROLOGUE_BYTES: usize = 64;

/// Mapped files larger than this are not read (no code file of a real program comes close).
pub const MAX_MAPPED_FILE: u64 = 2 << 30;

/// Opens, for reading, a file that a traced process has mapped, by the path its
/// /proc/PID/maps gives. psleak runs as root and the process may be another user's, who may
/// have put something else at that path since: a symlink (to a file of root's), a FIFO that
/// would block the reader, a device whose very opening does something. The path is resolved
/// without following any symlink (maps paths are canonical), then the file must be a regular
/// one of at most `MAX_MAPPED_FILE` bytes, and only then is it opened for reading.
pub fn open_mapped(path: &Path) -> io::Result<File> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain integers, for which zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a NUL-terminated path and an open_how of the size given; the result is checked.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, name.as_ptr(), &how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let located = unsafe { File::from_raw_fd(fd as i32) };
    let meta = located.metadata()?;
    if !meta.file_type().is_file() || meta.size() > MAX_MAPPED_FILE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file of a sensible size"));
    }
    File::open(fd_path(&located))
}

/// A path that reaches the open file itself (through /proc/self/fd), for libraries that take
/// paths: valid for as long as `file` stays open.
pub fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_machines_free() {
        // As /proc/PID/maps names it: canonical (/lib is a symlink on Debian).
        let libc = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let libc = Binary::open(libc).unwrap();
        let free = libc.probe_place("free", Registers::RDI, true, false).unwrap().expect("free is in libc");
        assert!(free.offset > free.entry, "glibc's free starts with its NULL check");
        assert_eq!(free.on, Instruction::Emulated("push"));
        let at_entry = libc.probe_place("free", Registers::RDI, true, true).unwrap().unwrap();
        assert_eq!((at_entry.offset, at_entry.on), (free.entry, Instruction::Stepped));
        assert!(exports(libc.path(), "malloc"));
        assert!(!exports(libc.path(), "PyObject_Malloc"));
    }

    #[test]
    fn only_regular_files_reached_without_symlinks_are_opened() {
        let dir = std::env::temp_dir().join(format!("psleak-open-mapped-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let lib = dir.join("lib.so");
        std::fs::write(&lib, b"\x7fELF").unwrap();
        assert!(open_mapped(&lib).is_ok());
        let link = dir.join("link.so");
        std::os::unix::fs::symlink(&lib, &link).unwrap();
        assert!(open_mapped(&link).is_err(), "a symlink put at a mapped file's path");
        let linked_dir = dir.join("linked");
        std::os::unix::fs::symlink(&dir, &linked_dir).unwrap();
        assert!(open_mapped(&linked_dir.join("lib.so")).is_err(), "a symlink on the way");
        let fifo = CString::new(dir.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(open_mapped(&dir.join("fifo")).is_err(), "a FIFO, which would block the reader");
        assert!(open_mapped(Path::new("/dev/zero")).is_err(), "a device");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error_not_a_missing_symbol() {
        let err = Binary::open(Path::new("/nonexistent/libc.so.6")).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
