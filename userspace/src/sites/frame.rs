//! A site as psleak names it: the frames of the stack that created a resource, the one to
//! blame, and what a backend must provide to name them.

use std::path::Path;

use serde::Serialize;

use crate::model::event::Origin;

/// One frame of a site's stack, named as far as the symbols allow. Serialized with its
/// address in hex and its `text` (`describe`), so that clients need not format frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The return address in the process (or the call's, for an inlined function's frame).
    pub addr: u64,
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The call's address in the module's own ELF addresses, the same in every run: what
    /// `addr2line -e MODULE` takes.
    pub offset: Option<u64>,
    /// The module's GNU build-id in hex, which names its debug symbols
    /// (`/usr/lib/debug/.build-id/xx/yyyy.debug`, debuginfod).
    pub build_id: Option<String>,
}

impl Serialize for Frame {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut frame = s.serialize_struct("Frame", 8)?;
        frame.serialize_field("addr", &format!("{:#x}", self.addr))?;
        frame.serialize_field("function", &self.function)?;
        frame.serialize_field("module", &self.module)?;
        frame.serialize_field("file", &self.file)?;
        frame.serialize_field("line", &self.line)?;
        frame.serialize_field("offset", &self.offset.map(|o| format!("{o:#x}")))?;
        frame.serialize_field("build_id", &self.build_id)?;
        frame.serialize_field("text", &self.describe())?;
        frame.end()
    }
}

impl Frame {
    /// A frame of which only the address is known.
    pub fn unknown(addr: u64) -> Self {
        Frame { addr, function: None, module: None, file: None, line: None, offset: None, build_id: None }
    }

    /// `leak_bytes (leaky.c:12)`; where no symbol is known, the module and the call's offset in
    /// it (`_core.so+0x1a7c`), else the address.
    pub fn describe(&self) -> String {
        let module = self
            .module
            .as_deref()
            .map(|m| Path::new(m).file_name().map_or(m.into(), |n| n.to_string_lossy()))
            .unwrap_or_default();
        match (&self.function, &self.file) {
            (Some(f), Some(file)) => match self.line {
                Some(line) => format!("{f} ({file}:{line})"),
                None => format!("{f} ({file})"),
            },
            (Some(f), None) => format!("{f} in {module}"),
            _ => match self.offset {
                Some(offset) if !module.is_empty() => format!("{module}+{offset:#x}"),
                _ => format!("{:#x} in {}", self.addr, if module.is_empty() { "?".into() } else { module }),
            },
        }
    }
}

/// A Python frame: the function (its qualified name from 3.11 on), its file and the line the
/// thread was at. Serialized with its `text` (`describe`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub function: String,
    pub file: String,
    pub line: Option<u32>,
}

impl PyFrame {
    /// `test_parse (test_ext.py:12)`: the function's own name and the file's, as a traceback
    /// names them (the JSON has the qualified name and the whole path).
    pub fn describe(&self) -> String {
        let name = self.function.rsplit('.').next().unwrap_or(&self.function);
        let file = Path::new(&self.file).file_name().map_or(self.file.as_str().into(), |f| f.to_string_lossy());
        match self.line {
            Some(line) => format!("{name} ({file}:{line})"),
            None => format!("{name} ({file})"),
        }
    }

    /// Whether it is the program's own code: neither psleak's (its package drives the calls)
    /// nor the standard library's, nor the interpreter's frozen modules.
    pub fn is_users(&self) -> bool {
        let file = self.file.as_str();
        let packaged = file.contains("-packages/");
        let psleak = packaged && file.contains("-packages/psleak/");
        let stdlib = !packaged && file.contains("/lib/python3.");
        !(psleak || stdlib || file.starts_with("<frozen "))
    }
}

impl Serialize for PyFrame {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut frame = s.serialize_struct("PyFrame", 4)?;
        frame.serialize_field("function", &self.function)?;
        frame.serialize_field("file", &self.file)?;
        frame.serialize_field("line", &self.line)?;
        frame.serialize_field("text", &self.describe())?;
        frame.end()
    }
}

/// The frame to blame in a symbolized stack: the first outside the runtime's modules (the
/// allocator, the C library, Python), where the program itself asked; else the innermost.
pub fn blame(frames: &[Frame], is_runtime: impl Fn(&str) -> bool) -> Option<Frame> {
    frames.iter().find(|f| !f.module.as_deref().is_some_and(&is_runtime)).or(frames.first()).cloned()
}

/// What a report needs from the backend besides the ledger: names for creation sites, and
/// what the OS says of an fd or a thread now.
pub trait Describe {
    /// The site's blamed frame and its stack.
    fn site(&mut self, origin: Origin) -> (Option<Frame>, Vec<Frame>);
    /// The Python frames of the thread that made it, innermost first (none where the backend
    /// does not read them).
    fn python(&mut self, _origin: Origin) -> Vec<PyFrame> {
        Vec::new()
    }
    fn fd_target(&self, fd: i32) -> Option<String>;
    fn thread_name(&self, tid: u32) -> Option<String>;
}

/// Turns the target's addresses into frames.
pub trait Symbolize {
    fn frames(&mut self, addrs: &[u64]) -> Vec<Frame>;

    /// Learns the modules the target loaded since.
    fn refresh(&mut self) {}
}

/// Frames that are their address only, where no symbols can be read.
pub struct Addresses;

impl Symbolize for Addresses {
    fn frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        addrs.iter().map(|&addr| Frame::unknown(addr)).collect()
    }
}
