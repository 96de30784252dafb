//! Naming creation sites: the stack a resource was created with, symbolized, and the frame to
//! blame — the first one outside libc and the Python runtime, where the program itself asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use psleak_ebpf::{Probes, Target};

use crate::backends::ebpf::tracer::{Collector, RecordDecoder};
use crate::model::event::Origin;
use crate::sites::frame::{blame, Describe, Frame, PyFrame};
use crate::sites::symbols::Symbols;

pub struct SiteNamer {
    runtime_modules: Vec<PathBuf>,
    symbols: Symbols,
    stacks: HashMap<u32, Vec<u64>>,
}

impl SiteNamer {
    pub fn new(target: &Target) -> Self {
        let runtime_modules = [Some(&target.libc), target.python.as_ref()].into_iter().flatten().cloned().collect();
        Self { runtime_modules, symbols: Symbols::default(), stacks: HashMap::new() }
    }

    /// Return addresses from the creating call outwards: the chain unwound from stack words
    /// when there is one; else the exact caller first, then the
    /// recorded stack without its innermost frame (the probed function itself), up to the
    /// first address outside code (a frame-pointer walk through code built without frame
    /// pointers goes astray there).
    fn stack_of(&mut self, origin: Origin, probes: &Probes<'_>, decoder: &RecordDecoder) -> Vec<u64> {
        if let Some(chain) = origin.chain {
            return decoder.chain(chain).to_vec();
        }
        let process = &decoder.process;
        let recorded = match origin.stack_id {
            Some(id) => self.stacks.entry(id).or_insert_with(|| probes.user_stack(id)).clone(),
            None => Vec::new(),
        };
        let mut stack: Vec<u64> = origin.caller.into_iter().collect();
        for addr in recorded.into_iter().skip(1).take_while(|&a| process.in_code(a)) {
            if stack.last() != Some(&addr) {
                stack.push(addr);
            }
        }
        stack
    }

    /// The site to blame and the symbolized stack it was found in.
    pub fn name(
        &mut self,
        origin: Origin,
        probes: &Probes<'_>,
        decoder: &RecordDecoder,
    ) -> (Option<Frame>, Vec<Frame>) {
        let addrs = self.stack_of(origin, probes, decoder);
        let frames = self.symbols.frames(&addrs, &decoder.process);
        let site = blame(&frames, |m| self.runtime_modules.iter().any(|r| r == Path::new(m)));
        (site, frames)
    }
}

/// Names sites for a report from what the collector saw of the target.
pub struct Described<'r> {
    pub sites: &'r mut SiteNamer,
    pub probes: &'r Probes<'r>,
    pub collector: &'r Collector,
}

impl Describe for Described<'_> {
    fn site(&mut self, origin: Origin) -> (Option<Frame>, Vec<Frame>) {
        self.sites.name(origin, self.probes, &self.collector.decoder)
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
