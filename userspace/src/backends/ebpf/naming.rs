//! Naming creation sites: the stack a resource was created with, symbolized, and the frame to
//! blame — the first one outside the runtime (libc and its kin, the compilers' runtimes,
//! libffi, the Python interpreter and its own extension modules), where the program itself asked.

use std::path::{Path, PathBuf};

use psleak_ebpf::Target;

use crate::backends::ebpf::tracer::{Collector, RecordDecoder};
use crate::model::event::Origin;
use crate::sites::frame::{blame, Describe, Frame, PyFrame};
use crate::sites::symbols::Symbols;

/// The file names of the runtime's libraries, whatever their version suffix: what they call
/// was asked for by someone else (ctypes' malloc by libffi's caller, an fstream's open by the
/// C++ constructor).
const RUNTIME_LIBRARIES: &[&str] = &[
    "libc.so",
    "libm.so",
    "ld-linux",
    "libpthread.so",
    "libdl.so",
    "libstdc++.so",
    "libgcc_s.so",
    "libffi.so",
    "libpython",
];

/// Whether `module` is one of the runtime's libraries by its name, or one of CPython's own
/// extension modules.
fn is_runtime_library(module: &str) -> bool {
    let name = Path::new(module).file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    RUNTIME_LIBRARIES.iter().any(|library| name.starts_with(library)) || module.contains("/lib-dynload/")
}

pub struct SiteNamer {
    /// libc and the interpreter psleak probes (where they are, whatever their names), and a
    /// Python target's executable.
    runtime_modules: Vec<PathBuf>,
    symbols: Symbols,
}

impl SiteNamer {
    pub fn new(target: &Target) -> Self {
        let executable =
            target.python.as_ref().and_then(|_| std::fs::read_link(format!("/proc/{}/exe", target.pid)).ok());
        let runtime_modules =
            [Some(target.libc.clone()), target.python.clone(), executable].into_iter().flatten().collect();
        Self { runtime_modules, symbols: Symbols::default() }
    }

    fn is_runtime(&self, module: &str) -> bool {
        self.runtime_modules.iter().any(|r| r == Path::new(module)) || is_runtime_library(module)
    }

    /// Return addresses from the creating call outwards.
    fn stack_of(origin: Origin, decoder: &RecordDecoder) -> Vec<u64> {
        match origin.chain {
            Some(chain) => decoder.chain(chain).to_vec(),
            None => origin.caller.into_iter().collect(),
        }
    }

    /// The site to blame and the symbolized stack it was found in.
    pub fn name(&mut self, origin: Origin, decoder: &RecordDecoder) -> (Option<Frame>, Vec<Frame>) {
        let addrs = Self::stack_of(origin, decoder);
        let frames = self.symbols.frames(&addrs, &decoder.process);
        let site = blame(&frames, |m| self.is_runtime(m));
        (site, frames)
    }
}

/// Names sites for a report from what the collector saw of the target.
pub struct Described<'r> {
    pub sites: &'r mut SiteNamer,
    pub collector: &'r Collector,
}

impl Describe for Described<'_> {
    fn site(&mut self, origin: Origin) -> (Option<Frame>, Vec<Frame>) {
        self.sites.name(origin, &self.collector.decoder)
    }

    fn python(&mut self, origin: Origin) -> Vec<PyFrame> {
        origin.python.map_or_else(Vec::new, |id| self.collector.decoder.python_stack(id).to_vec())
    }

    fn fd_target(&self, fd: i32) -> Option<String> {
        self.collector.decoder.process.fd_target(fd)
    }

    fn thread_name(&self, tid: u32) -> Option<String> {
        self.collector.decoder.process.thread_name(tid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_libraries_by_name() {
        for (module, runtime) in [
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", true),
            ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30", true),
            ("/usr/lib/x86_64-linux-gnu/libffi.so.8.1.2", true),
            ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", true),
            ("/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0", true),
            ("/usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so", true),
            // Names that only begin like a runtime library's.
            ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", false),
            ("/usr/lib/x86_64-linux-gnu/libmagic.so.1", false),
            // The user's code, installed or built in place.
            ("/venv/lib/python3.11/site-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so", false),
            ("/tmp/build/stripped_ext.cpython-313-x86_64-linux-gnu.so", false),
        ] {
            assert_eq!(is_runtime_library(module), runtime, "{module}");
        }
    }
}
