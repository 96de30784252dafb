//! The Python stack of a creation. The probes read the frames of the thread that made it (the
//! code object and instruction of each, events.h `py_layout`); this module knows where CPython
//! 3.9-3.13 keep them, and turns code objects into function, file and line by reading them
//! from the target, while they are alive.
//!
//! The offsets were measured with `offsetof` against each version's own headers (pyenv's 3.9.18,
//! 3.10.13, 3.11.7, 3.12.1, 3.13.0; Debian's 3.11.2 has 3.11.7's) and checked end to end by
//! reading live interpreters. The thread state comes from CPython's pthread key, which is set
//! with the GIL held or released; `_PyRuntime` is in the dynamic symbols of every build here.
//!
//! The target's memory is its own to forge: every read is bounded, and a code object is
//! believed only if its type is `PyCode_Type`, it is alive (a reference count in its first
//! word), and it is the one the probe saw (the frame's stamp, events.h).

use std::collections::HashMap;
use std::path::Path;

use psleak_ebpf::{types, Binary, Mapping};

use crate::process::Process;
use crate::sites::elf::Segments;
use crate::sites::frame::PyFrame;

/// Where one CPython version keeps what the probes and the names need.
struct Layout {
    minor: u32,
    /// `_PyRuntime.autoTSSkey._key`.
    key: u32,
    tstate_frame: u32,
    cframe_frame: i32,
    frame_code: u32,
    frame_back: u32,
    frame_instr: u32,
    frame_owner: i32,
    code_firstlineno: u64,
    code_filename: u64,
    /// `co_qualname` from 3.11 on, `co_name` before.
    code_qualname: u64,
    /// `co_lnotab` (3.9), `co_linetable` (3.10 on).
    code_linetable: u64,
    /// Where the instructions start in the code object (3.11 on: `co_code_adaptive`).
    code_instructions: u64,
    /// Where a compact ASCII str's bytes start (sizeof(PyASCIIObject)).
    ascii_data: u64,
}

/// A field of a span the probes read in one go: its offset in the struct, and its size.
type Field = (u64, u64);

/// The span that holds `fields`: where it starts (8-aligned, at or before the first) and how
/// long it is (to the end of the last).
fn span_of(fields: &[Field]) -> (u64, u64) {
    let start = fields.iter().map(|&(at, _)| at).min().unwrap_or(0) & !7;
    let end = fields.iter().map(|&(at, size)| at + size).max().unwrap_or(start);
    (start, end - start)
}

/// Where a str's span starts (its length, after the object's header); the probes read a
/// qualname's from there.
const STR_SPAN: u64 = 0x10;
/// Where a str keeps its hash (-1 until computed) and its state bits.
const STR_HASH: u64 = 0x18;
const STR_STATE: u64 = 0x20;
/// Its state bits that say how its text is kept: compact and ascii (the others change).
const STR_COMPACT_ASCII: u32 = 0x20 | 0x40;
/// Bytes of an ASCII qualname's text in a stamp, at most: its first ones.
const NAME_TEXT: u64 = types::py_span::PSLEAK_NAME_TEXT.0 as u64;
/// A stamp made from the qualname's text, which had no hash yet.
const FROM_TEXT: u64 = types::py_stamp_flag::PY_STAMP_FROM_TEXT.0 as u64;

impl Layout {
    /// The frame's fields the probes read (events.h `py_layout`).
    fn frame_fields(&self) -> Vec<Field> {
        let instr_size = if self.minor >= 11 { 8 } else { 4 }; // f_lasti: an int
        let mut fields =
            vec![(self.frame_code.into(), 8), (self.frame_back.into(), 8), (self.frame_instr.into(), instr_size)];
        if let Ok(owner) = u64::try_from(self.frame_owner) {
            fields.push((owner, 1));
        }
        fields
    }

    /// The code object's fields that make its stamp.
    fn code_fields(&self) -> [Field; 3] {
        [(self.code_qualname, 8), (self.code_filename, 8), (self.code_firstlineno, 4)]
    }

    /// A str's fields that go into a stamp (or an ASCII one's text, read apart).
    fn name_fields(&self) -> [Field; 3] {
        [(STR_SPAN, 8), (STR_HASH, 8), (STR_STATE, 4)]
    }
}

const LAYOUTS: [Layout; 5] = [
    Layout {
        minor: 9,
        key: 0x24c,
        tstate_frame: 0x18,
        cframe_frame: -1,
        frame_code: 0x20,
        frame_back: 0x18,
        frame_instr: 0x68,
        frame_owner: -1,
        code_firstlineno: 0x28,
        code_filename: 0x68,
        code_qualname: 0x70,
        code_linetable: 0x78,
        code_instructions: 0,
        ascii_data: 48,
    },
    Layout {
        minor: 10,
        key: 0x24c,
        tstate_frame: 0x18,
        cframe_frame: -1,
        frame_code: 0x20,
        frame_back: 0x18,
        frame_instr: 0x60,
        frame_owner: -1,
        code_firstlineno: 0x28,
        code_filename: 0x68,
        code_qualname: 0x70,
        code_linetable: 0x78,
        code_instructions: 0,
        ascii_data: 48,
    },
    Layout {
        minor: 11,
        key: 0x254,
        tstate_frame: 0x38,
        cframe_frame: 0x08,
        frame_code: 0x20,
        frame_back: 0x30,
        frame_instr: 0x38,
        frame_owner: 0x45,
        code_firstlineno: 0x48,
        code_filename: 0x70,
        code_qualname: 0x80,
        code_linetable: 0x88,
        code_instructions: 0xb8,
        ascii_data: 48,
    },
    Layout {
        minor: 12,
        key: 0x60c,
        tstate_frame: 0x38,
        cframe_frame: 0x00,
        frame_code: 0x00,
        frame_back: 0x08,
        frame_instr: 0x38,
        frame_owner: 0x46,
        code_firstlineno: 0x44,
        code_filename: 0x70,
        code_qualname: 0x80,
        code_linetable: 0x88,
        code_instructions: 0xc0,
        ascii_data: 40,
    },
    Layout {
        minor: 13,
        key: 0x874,
        tstate_frame: 0x48,
        cframe_frame: -1,
        frame_code: 0x00,
        frame_back: 0x08,
        frame_instr: 0x38,
        frame_owner: 0x46,
        code_firstlineno: 0x44,
        code_filename: 0x70,
        code_qualname: 0x80,
        code_linetable: 0x88,
        code_instructions: 0xc8,
        ascii_data: 40,
    },
];

/// CPython's evaluation loop, the C function every Python function runs in (3.9-3.13), and the
/// part of it gcc moved out of line (its error paths, which allocate too).
const EVAL_LOOP: [&str; 2] = ["_PyEval_EvalFrameDefault", "_PyEval_EvalFrameDefault.cold"];

/// glibc's private offsets, from the descriptors libc exports for debuggers (`_thread_db_*`:
/// bits, count and offset of a field).
const PTHREAD_SPECIFIC: &str = "_thread_db_pthread_specific";
const KEY_DATA_DATA: &str = "_thread_db_pthread_key_data_data";
const KEY_DATA_SIZE: &str = "_thread_db_sizeof_pthread_key_data";

/// What the probes and the names need of one Python target.
pub struct PythonStacks {
    layout: &'static Layout,
    probes: types::py_layout,
    /// `PyCode_Type`'s address: what a code object's type must be.
    code_type: u64,
    /// Where the interpreter's evaluation loop is in the process (none if not found).
    eval_loop: Vec<std::ops::Range<u64>>,
    /// By address and stamp: a code object freed and another put at its address is another.
    codes: HashMap<(u64, u64), Option<Code>>,
}

/// What a code object names, read once.
struct Code {
    qualname: String,
    filename: String,
    firstlineno: i64,
    linetable: Vec<u8>,
}

/// Strings and line tables read at most: a forged one must not make us read without bound.
const MAX_STRING: usize = 4096;
const MAX_LINETABLE: usize = 1 << 20;

/// Code objects remembered at most.
const MAX_CODES: usize = 1 << 16;

impl PythonStacks {
    /// For `python` (libpython or the executable that has CPython), mapped at `code` in the
    /// process, with `libc`: None for a version psleak has no layout of, or a build without
    /// the symbols it needs.
    pub fn of(python: &Path, code: &[Mapping], libc: &Path) -> Option<Self> {
        let minor = minor_version(python)?;
        let layout = LAYOUTS.iter().find(|l| l.minor == minor)?;
        let python_binary = Binary::open(python).ok()?;
        let bias = load_bias(python, code)?;
        let runtime = bias.checked_add(python_binary.symbol_address("_PyRuntime").ok()??)?;
        let code_type = bias.checked_add(python_binary.symbol_address("PyCode_Type").ok()??)?;
        let eval_loop = EVAL_LOOP
            .iter()
            .filter_map(|part| python_binary.function_span(part).ok().flatten())
            .filter_map(|span| Some(bias.checked_add(span.start)?..bias.checked_add(span.end)?))
            .collect();
        let libc_binary = Binary::open(libc).ok()?;
        let field = |name: &str, index: u64| -> Option<u32> {
            let bytes = libc_binary.symbol_bytes(name, 12).ok()??;
            let at = index as usize * 4;
            Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        let (frame_span, frame_span_len) = span_of(&layout.frame_fields());
        let (code_span, code_span_len) = span_of(&layout.code_fields());
        // Offsets in a span; small by construction (`each_span_holds_its_fields_where_the_probes_read_them`).
        let within = |at: u64, span: u64| (at - span) as u32;
        let probes = types::py_layout {
            runtime,
            key: layout.key,
            tstate_frame: layout.tstate_frame,
            cframe_frame: layout.cframe_frame,
            instr_is_pointer: u32::from(minor >= 11),
            pthread_specific: field(PTHREAD_SPECIFIC, 2)?,
            key_data_size: field(KEY_DATA_SIZE, 0)?,
            key_data_data: field(KEY_DATA_DATA, 2)?,
            frame_span: frame_span as u32,
            frame_span_len: frame_span_len as u32,
            frame_code: within(layout.frame_code.into(), frame_span),
            frame_back: within(layout.frame_back.into(), frame_span),
            frame_instr: within(layout.frame_instr.into(), frame_span),
            frame_owner: u64::try_from(layout.frame_owner).map_or(-1, |owner| within(owner, frame_span) as i32),
            code_span: code_span as u32,
            code_span_len: code_span_len as u32,
            code_qualname: within(layout.code_qualname, code_span),
            code_filename: within(layout.code_filename, code_span),
            code_firstlineno: within(layout.code_firstlineno, code_span),
            name_span_len: span_of(&layout.name_fields()).1 as u32,
            name_hash: within(STR_HASH, STR_SPAN),
            name_state: within(STR_STATE, STR_SPAN),
            name_ascii: within(layout.ascii_data, STR_SPAN),
        };
        Some(Self { layout, probes, code_type, eval_loop, codes: HashMap::new() })
    }

    /// Whether a native chain ends before `return_address`: a return into the evaluation loop.
    /// Past it the Python frames say where the program was, and the loop's own return address
    /// changes as the interpreter specializes a call (3.11+), which would split one leak in two
    /// sites. Unwinding no further also spares the collector the interpreter's deep frames.
    pub fn ends_native_chain(&self, return_address: u64) -> bool {
        self.eval_loop.iter().any(|part| part.contains(&return_address))
    }

    /// What the probes are given to read the stacks.
    pub fn probes(&self) -> types::py_layout {
        self.probes
    }

    /// The frames of a stack the probes read, innermost first; a frame whose code object is
    /// gone (or never was one) is left out.
    pub fn frames(&mut self, stack: &types::py_stack, process: &Process) -> Vec<PyFrame> {
        let depth = (stack.depth as usize).min(stack.frames.len());
        stack.frames[..depth].iter().filter_map(|f| self.frame(f, process)).collect()
    }

    fn frame(&mut self, frame: &types::py_frame, process: &Process) -> Option<PyFrame> {
        let (code, instr) = (frame.code, frame.instr);
        let key = (code, frame.stamp);
        if !self.codes.contains_key(&key) {
            if self.codes.len() >= MAX_CODES {
                self.codes.clear();
            }
            // The code the probe saw, or nothing: not what came to its address since.
            let read = self.read_code(code, frame.stamp & FROM_TEXT != 0, process);
            let read = read.filter(|(_, stamp)| *stamp == frame.stamp);
            self.codes.insert(key, read.map(|(info, _)| info));
        }
        let layout = self.layout;
        let info = self.codes.get(&key)?.as_ref()?;
        let line = match layout.minor {
            9 => lnotab_line(&info.linetable, info.firstlineno, instr),
            10 => linetable_line_310(&info.linetable, info.firstlineno, instr.saturating_mul(2)),
            _ => {
                let units = instr.checked_sub(code + layout.code_instructions)? / 2;
                location_line(&info.linetable, info.firstlineno, units)
            }
        };
        Some(PyFrame {
            function: info.qualname.clone(),
            file: info.filename.clone(),
            line: line.and_then(|l| u32::try_from(l).ok()),
        })
    }

    /// The code object at `code`, and its stamp (from its qualname's text, not its hash, if
    /// `from_text`).
    fn read_code(&self, code: u64, from_text: bool, process: &Process) -> Option<(Code, u64)> {
        let layout = self.layout;
        let word = |addr: u64| process.read(addr, 8).map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()));
        // A live code object: its type, after a reference count (1 to 2^32 - 1, which marks the
        // immortal ones of 3.12+). A freed one may look intact while its strings and line table
        // are already another's: in its first word, an allocator keeps a pointer or 0.
        let alive = || Some((1..=u64::from(u32::MAX)).contains(&word(code)?) && word(code + 8)? == self.code_type);
        if !alive()? {
            return None;
        }
        let firstlineno = process.read(code + layout.code_firstlineno, 4)?;
        let firstlineno = u32::from_ne_bytes(firstlineno.try_into().ok()?);
        let (qualname, filename) = (word(code + layout.code_qualname)?, word(code + layout.code_filename)?);
        let stamp = self.stamp(qualname, filename, firstlineno, from_text, process);
        let (qualname, filename) = (self.read_str(qualname, process)?, self.read_str(filename, process)?);
        let table = word(code + layout.code_linetable)?;
        // A bytes object: its size (ob_size) at 0x10, its bytes (ob_sval) at 0x20.
        let size = usize::try_from(word(table + 0x10)?).ok()?.min(MAX_LINETABLE);
        let linetable = process.read(table + 0x20, size)?;
        let firstlineno = i64::from(firstlineno as i32);
        // Still so once all of it was read: it was not freed meanwhile.
        alive()?.then_some((Code { qualname, filename, firstlineno, linetable }, stamp))
    }

    /// The stamp of a code object (common.bpf.h `code_stamp`), from its fields and its
    /// qualname's, read as the probe reads them: what cannot be read counts as zeros. From the
    /// qualname's text if `from_text` (the probe found it had no hash yet), else from its hash.
    fn stamp(&self, qualname: u64, filename: u64, firstlineno: u32, from_text: bool, process: &Process) -> u64 {
        let read = |addr: u64, len: usize| process.read(addr, len).unwrap_or_else(|| vec![0; len]);
        let word = |bytes: &[u8], at: usize| {
            let mut word = [0u8; 8];
            let field = bytes.get(at..).unwrap_or_default();
            let n = field.len().min(8);
            word[..n].copy_from_slice(&field[..n]);
            u64::from_ne_bytes(word)
        };
        let str = qualname.wrapping_add(STR_SPAN);
        let name = read(str, self.probes.name_span_len as usize);
        let length = word(&name, 0);
        let mut stamp = mix(mix(mix(qualname, filename), u64::from(firstlineno)), length);
        if !from_text {
            return mix(stamp, word(&name, self.probes.name_hash as usize)) & !FROM_TEXT;
        }
        let state = word(&name, self.probes.name_state as usize) as u32;
        if state & STR_COMPACT_ASCII == STR_COMPACT_ASCII {
            let mut text = read(str.wrapping_add(self.probes.name_ascii.into()), length.min(NAME_TEXT) as usize);
            text.resize(NAME_TEXT as usize, 0);
            stamp = text.chunks_exact(8).fold(stamp, |stamp, w| mix(stamp, word(w, 0)));
        }
        stamp | FROM_TEXT
    }

    /// A compact str: its length, then its state; ASCII ones only are read here (the names and
    /// paths of code), others are said as such.
    fn read_str(&self, obj: u64, process: &Process) -> Option<String> {
        let header = process.read(obj + STR_SPAN, (STR_STATE - STR_SPAN + 4) as usize)?;
        let length = usize::try_from(u64::from_ne_bytes(header[..8].try_into().ok()?)).ok()?;
        let state = u32::from_ne_bytes(header[(STR_STATE - STR_SPAN) as usize..].try_into().ok()?);
        if state & STR_COMPACT_ASCII != STR_COMPACT_ASCII {
            return Some("<non-ASCII>".into());
        }
        let bytes = process.read(obj + self.layout.ascii_data, length.min(MAX_STRING))?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// events.h's PY_STAMP_MIX.
fn mix(stamp: u64, word: u64) -> u64 {
    stamp.rotate_left(13) ^ word
}

/// `3.12` from `libpython3.12.so.1.0` or `python3.12`.
fn minor_version(python: &Path) -> Option<u32> {
    let name = python.file_name()?.to_str()?;
    let rest = &name[name.find("python3.")? + "python3.".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

/// What to add to the addresses of the file `path`, whose code is mapped at `code`, to have
/// where they are in the process.
fn load_bias(path: &Path, code: &[Mapping]) -> Option<u64> {
    let file = psleak_ebpf::open_mapped(path).ok()?;
    let data = object::ReadCache::new(&file);
    let elf = object::File::parse(&data).ok()?;
    let mapping = code.first()?;
    let address = Segments::of(&elf).address_of(mapping.file_offset)?;
    mapping.start.checked_sub(address)
}

/// 3.9's `co_lnotab`: (address delta in bytes, line delta) pairs, from `co_firstlineno`.
fn lnotab_line(table: &[u8], first: i64, lasti: u64) -> Option<i64> {
    let (mut line, mut addr) = (first, 0u64);
    for pair in table.chunks_exact(2) {
        addr += u64::from(pair[0]);
        if addr > lasti {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    Some(line)
}

/// 3.10's `co_linetable`: (bytes delta, line delta) pairs; -128 says the range has no line.
fn linetable_line_310(table: &[u8], first: i64, offset: u64) -> Option<i64> {
    let (mut line, mut end) = (first, 0u64);
    for pair in table.chunks_exact(2) {
        let start = end;
        end += u64::from(pair[0]);
        let delta = pair[1] as i8;
        if delta != -128 {
            line += i64::from(delta);
        }
        if (start..end).contains(&offset) {
            return (delta != -128).then_some(line);
        }
    }
    None
}

/// 3.11+'s location table: entries of a header byte (code, length in code units) and varints.
fn location_line(table: &[u8], first: i64, unit: u64) -> Option<i64> {
    let mut bytes = table.iter().copied();
    let varint = |bytes: &mut dyn Iterator<Item = u8>| -> Option<u64> {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let b = bytes.next()?;
            value |= u64::from(b & 0x3f) << shift;
            if b & 0x40 == 0 || shift > 56 {
                return Some(value);
            }
            shift += 6;
        }
    };
    let signed = |v: u64| if v & 1 != 0 { -((v >> 1) as i64) } else { (v >> 1) as i64 };
    let (mut line, mut addr) = (first, 0u64);
    while let Some(header) = bytes.next() {
        let code = (header >> 3) & 15;
        let length = u64::from(header & 7) + 1;
        let delta = match code {
            15 => None,
            14 => {
                let delta = signed(varint(&mut bytes)?);
                for _ in 0..3 {
                    varint(&mut bytes)?;
                }
                Some(delta)
            }
            13 => Some(signed(varint(&mut bytes)?)),
            10..=12 => {
                bytes.next()?;
                bytes.next()?;
                Some(i64::from(code) - 10)
            }
            _ => {
                bytes.next()?;
                Some(0)
            }
        };
        if let Some(delta) = delta {
            line += delta;
        }
        if (addr..addr + length).contains(&unit) {
            return delta.map(|_| line);
        }
        addr += length;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eval_loops_out_of_line_part_is_found() {
        // pyenv's 3.11 (gcc) moved the loop's error paths to `.cold`, a local symbol: a chain
        // returning there must be cut as in the loop itself.
        let pyenv = std::env::var_os("PYENV_ROOT").map_or_else(|| "/root/.pyenv".into(), std::path::PathBuf::from);
        let versions = std::fs::read_dir(pyenv.join("versions")).expect("pyenv's CPythons are on this machine kind");
        let libpython = versions
            .flatten()
            .map(|v| v.path().join("lib/libpython3.11.so.1.0"))
            .find(|p| p.exists())
            .expect("pyenv's 3.11");
        let binary = Binary::open(&libpython).unwrap();
        let [hot, cold] = EVAL_LOOP.map(|part| binary.function_span(part).unwrap());
        assert!(hot.is_some() && cold.is_some(), "{}: {hot:?} {cold:?}", libpython.display());
    }

    #[test]
    fn each_span_holds_its_fields_where_the_probes_read_them() {
        // The probes read each span into a buffer of events.h's PSLEAK_*_SPAN bytes and mask
        // each field's offset to a place in it aligned to the field's size: a field out of its
        // span, or not so aligned, would be read from elsewhere.
        let size = |span: types::py_span| u64::from(span.0);
        for layout in &LAYOUTS {
            let spans = [
                (layout.frame_fields(), size(types::py_span::PSLEAK_FRAME_SPAN)),
                (layout.code_fields().to_vec(), size(types::py_span::PSLEAK_CODE_SPAN)),
            ];
            let name = (layout.name_fields().to_vec(), size(types::py_span::PSLEAK_NAME_SPAN));
            for (fields, buffer) in spans.into_iter().chain([name]) {
                let (start, len) = span_of(&fields);
                assert!(len < buffer, "3.{}: a span of {len} bytes", layout.minor);
                for (at, size) in fields {
                    let within = at - start;
                    let aligned = within % size.min(8) == 0;
                    assert!(aligned && within + size <= len, "3.{}: {at:#x} in {start:#x}+{len}", layout.minor);
                }
            }
        }
    }

    #[test]
    fn versions_are_read_from_the_file_name() {
        assert_eq!(minor_version(Path::new("/x/lib/libpython3.12.so.1.0")), Some(12));
        assert_eq!(minor_version(Path::new("/usr/bin/python3.11")), Some(11));
        assert_eq!(minor_version(Path::new("/usr/bin/python3")), None);
    }

    #[test]
    fn line_tables_of_each_format() {
        // 3.9: line 10, +2 bytes -> 11, +4 bytes -> 13.
        assert_eq!(lnotab_line(&[2, 1, 4, 2], 10, 0), Some(10));
        assert_eq!(lnotab_line(&[2, 1, 4, 2], 10, 3), Some(11));
        assert_eq!(lnotab_line(&[2, 1, 4, 2], 10, 9), Some(13));
        // 3.10: [0,2) line 11, [2,6) no line, [6,8) line 12.
        let table = [2, 1, 4, 0x80, 2, 1];
        assert_eq!(linetable_line_310(&table, 10, 0), Some(11));
        assert_eq!(linetable_line_310(&table, 10, 4), None);
        assert_eq!(linetable_line_310(&table, 10, 7), Some(12));
        // 3.11+: a one-line-form entry (code 10 = same line) of 2 units, then code 11 (+1) of 1
        // unit, then a no-location entry.
        let table = [(10 << 3) | 1 | 0x80, 0, 0, (11 << 3) | 0x80, 0, 0, (15 << 3) | 0x80];
        assert_eq!(location_line(&table, 5, 0), Some(5));
        assert_eq!(location_line(&table, 5, 1), Some(5));
        assert_eq!(location_line(&table, 5, 2), Some(6));
        assert_eq!(location_line(&table, 5, 3), None);
    }
}
