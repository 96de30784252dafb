//! Names for code addresses: function, module and file:line, through blazesym. Done lazily,
//! only for the sites that are reported, and cached per address.

use std::collections::HashMap;
use std::path::Path;

use blazesym::symbolize::source::{Process as ProcessSource, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use blazesym::Pid;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

fn hex<S: serde::Serializer>(addr: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{addr:#x}"))
}

impl Frame {
    /// `leak_bytes (leaky.c:12)`, or the module and address when no symbol is known.
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
            _ => format!("{:#x} in {}", self.addr, if module.is_empty() { "?".into() } else { module }),
        }
    }
}

pub struct Symbols {
    pid: u32,
    symbolizer: Symbolizer,
    cache: HashMap<u64, Frame>,
}

impl Symbols {
    pub fn new(pid: u32) -> Self {
        Self { pid, symbolizer: Symbolizer::new(), cache: HashMap::new() }
    }

    /// Frames for return addresses (each names the call instruction just before it).
    pub fn frames(&mut self, return_addrs: &[u64]) -> Vec<Frame> {
        let missing: Vec<u64> = return_addrs.iter().copied().filter(|a| !self.cache.contains_key(a)).collect();
        if !missing.is_empty() {
            self.resolve(&missing);
        }
        return_addrs.iter().map(|a| self.cache[a].clone()).collect()
    }

    fn resolve(&mut self, addrs: &[u64]) {
        let src = Source::Process(ProcessSource::new(Pid::from(self.pid)));
        // A return address belongs to the instruction after the call: look up the call itself.
        let calls: Vec<u64> = addrs.iter().map(|a| a.saturating_sub(1)).collect();
        let resolved = self.symbolizer.symbolize(&src, Input::AbsAddr(&calls)).unwrap_or_default();
        for (i, &addr) in addrs.iter().enumerate() {
            let mut frame = Frame { addr, function: None, module: None, file: None, line: None };
            if let Some(Symbolized::Sym(sym)) = resolved.get(i) {
                frame.function = Some(sym.name.to_string());
                frame.module = sym.module.as_ref().map(|m| m.to_string_lossy().into_owned());
                if let Some(code) = &sym.code_info {
                    frame.file = Some(code.file.to_string_lossy().into_owned());
                    frame.line = code.line;
                }
            }
            self.cache.insert(addr, frame);
        }
    }
}
