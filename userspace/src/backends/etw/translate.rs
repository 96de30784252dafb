//! ETW records (decoded by `psleak-etw`) as psleak events, for the ledger. Plain Rust, built
//! and tested everywhere; only the sessions that produce the records need Windows.
//!
//! ETW speaks of heaps where the ledger speaks of blocks: destroying a private heap frees its
//! blocks without a HeapFree each, so the translation remembers which heap each live block
//! belongs to and sends their frees before the heap's end.
//!
//! A site is the stack ETW logged with the event, innermost first, without its kernel-mode
//! frames; a [`Symbolize`] names its frames (dbghelp on Windows), and the site is the first
//! frame outside the Windows runtime.

use std::collections::{HashMap, HashSet};

use psleak_etw::records::{Record, MEM_RELEASE};

use crate::model::event::{Change, Domain, Event, HandleKind, Origin};
use crate::sites::frame::{blame, Describe, Frame, Symbolize};

/// Where kernel space starts in the addresses of ETW's stacks (x64, and WOW64 processes' kernel frames).
const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

/// Turns one process's records into events.
#[derive(Debug, Default)]
pub struct Translation {
    /// Heap of each live block this translation saw allocated.
    blocks_by_heap: HashMap<u64, HashSet<u64>>,
    /// Interned stacks, past their first frame (the site's `caller`), by `Origin::chain`.
    chains: Vec<Vec<u64>>,
    chain_ids: HashMap<Vec<u64>, u32>,
}

impl Translation {
    pub fn new() -> Self {
        Self::default()
    }

    fn origin(&mut self, stack: &[u64]) -> Origin {
        // The kernel's frames (of a syscall's events) come first; the site is in user mode.
        let user = stack.iter().position(|&addr| addr < KERNEL_SPACE).map_or(&[][..], |first| &stack[first..]);
        let Some((&caller, rest)) = user.split_first() else {
            return Origin::default();
        };
        // Looked up by slice: an event whose stack is known copies nothing.
        let chain = match self.chain_ids.get(rest) {
            Some(&id) => id,
            None => {
                let id = self.chains.len() as u32;
                self.chains.push(rest.to_vec());
                self.chain_ids.insert(rest.to_vec(), id);
                id
            }
        };
        Origin { caller: Some(caller), chain: Some(chain), ..Origin::default() }
    }

    /// The events of `record`, logged by thread `tid` at `ts_ns` with `stack`.
    pub fn events(&mut self, record: &Record, ts_ns: u64, tid: u32, stack: &[u64]) -> Vec<Event> {
        let origin = self.origin(stack);
        let event = |change| Event { ts_ns, tid, origin, change };
        let domain = Domain::WinHeap;
        match *record {
            Record::HeapCreate { heap, .. } => vec![event(Change::HeapCreate { heap })],
            Record::HeapDestroy { heap } => {
                let blocks = self.blocks_by_heap.remove(&heap).unwrap_or_default();
                let mut addrs: Vec<u64> = blocks.into_iter().collect();
                addrs.sort_unstable();
                let frees = addrs.into_iter().map(|addr| event(Change::Free { domain, addr }));
                frees.chain([event(Change::HeapDestroy { heap })]).collect()
            }
            Record::HeapAlloc { heap, addr, size } => {
                self.blocks_by_heap.entry(heap).or_default().insert(addr);
                vec![event(Change::Alloc { domain, addr, size })]
            }
            Record::HeapFree { heap, addr } => {
                self.forget(heap, addr);
                vec![event(Change::Free { domain, addr })]
            }
            Record::HeapRealloc { heap, new, old, new_size } => {
                self.forget(heap, old);
                self.blocks_by_heap.entry(heap).or_default().insert(new);
                vec![event(Change::Realloc { domain, old, new, size: new_size })]
            }
            Record::VirtualAlloc { addr, len, .. } => {
                vec![event(Change::Map { addr, len, allocator_internal: false })]
            }
            // Decommitting keeps the reservation: only a release ends the region.
            Record::VirtualFree { addr, len, flags, .. } if flags & MEM_RELEASE != 0 => {
                vec![event(Change::Unmap { addr, len })]
            }
            Record::VirtualFree { .. } => vec![],
            Record::HandleCreate { handle, object_type, ref name, .. } => vec![event(Change::HandleOpen {
                handle: u64::from(handle),
                kind: HandleKind { object_type, name: name.clone() },
            })],
            Record::HandleClose { handle, .. } => vec![event(Change::HandleClose { handle: u64::from(handle) })],
            Record::ThreadStart { tid, .. } => vec![event(Change::ThreadStart { tid })],
            Record::ThreadEnd { tid, .. } => vec![event(Change::ThreadExit { tid })],
        }
    }

    fn forget(&mut self, heap: u64, addr: u64) {
        if let Some(blocks) = self.blocks_by_heap.get_mut(&heap) {
            blocks.remove(&addr);
        }
    }
}

impl Translation {
    /// The user-mode return addresses of `origin`, innermost first.
    pub fn stack(&self, origin: Origin) -> Vec<u64> {
        let rest = origin.chain.and_then(|id| self.chains.get(id as usize)).map_or(&[][..], Vec::as_slice);
        origin.caller.into_iter().chain(rest.iter().copied()).collect()
    }
}

/// The modules of the Windows runtime, whose frames are never a site: the heap (ntdll,
/// kernelbase, kernel32), the C runtime (ucrtbase, msvcrt, vcruntime*) and CPython (python3*.dll).
pub fn is_runtime_module(path: &str) -> bool {
    let name = path.rsplit(['\\', '/']).next().unwrap_or(path).to_ascii_lowercase();
    matches!(
        name.as_str(),
        "ntdll.dll" | "kernelbase.dll" | "kernel32.dll" | "ucrtbase.dll" | "ucrtbased.dll" | "msvcrt.dll"
    ) || name.starts_with("vcruntime")
        || (name.starts_with("python3") && name.ends_with(".dll"))
}

/// Names the sites of an ETW session's ledger; ETW says nothing of fds, nor names threads.
pub struct Sites<'a, S: ?Sized> {
    pub translation: &'a Translation,
    pub symbols: &'a mut S,
}

impl<S: Symbolize + ?Sized> Describe for Sites<'_, S> {
    fn site(&mut self, origin: Origin) -> (Option<Frame>, Vec<Frame>) {
        let frames = self.symbols.frames(&self.translation.stack(origin));
        (blame(&frames, is_runtime_module), frames)
    }

    fn fd_target(&self, _: i32) -> Option<String> {
        None
    }

    fn thread_name(&self, _: u32) -> Option<String> {
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use psleak_etw::records::{decode, Provider};

    use std::time::Duration;

    use super::*;
    use crate::model::ledger::{Filter, Ledger, Memory};
    use crate::model::lost::Lost;
    use crate::report::{Reporter, Selection, SortKey};
    use crate::sites::frame::Addresses;

    fn payload(fields: &[u64]) -> Vec<u8> {
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// Decodes byte-exact heap payloads (64-bit: pointers and sizes are 8 bytes, Source 4).
    fn heap(opcode: u8, pointers: &[u64]) -> Record {
        let mut data = payload(pointers);
        if opcode != 32 && opcode != 35 {
            data.extend(3u32.to_le_bytes()); // Source
        } else if opcode == 32 {
            data.truncate(8);
            data.extend(0u32.to_le_bytes()); // HeapFlags
        }
        decode(Provider::Heap, opcode, 8, &data).unwrap().unwrap()
    }

    /// A handle event (opcode 32 created, 33 closed) of object type 37, byte-exact (64-bit).
    pub(crate) fn handle(opcode: u8, value: u32, name: &str) -> Record {
        let mut data = payload(&[0xffff_a000_1234_5670]);
        data.extend(value.to_le_bytes());
        data.extend(37u16.to_le_bytes());
        data.extend(name.encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
        decode(Provider::Object, opcode, 8, &data).unwrap().unwrap()
    }

    fn feed(ledger: &mut Ledger, translation: &mut Translation, records: &[Record]) {
        for (i, record) in records.iter().enumerate() {
            let stack = [0x7ff6_0000_1000 + i as u64, 0x7ff6_0000_9000];
            for event in translation.events(record, i as u64, 7, &stack) {
                ledger.apply(&event);
            }
        }
    }

    #[test]
    fn heap_blocks_reach_the_ledger_and_a_destroyed_heap_frees_its_own() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let records = [
            heap(32, &[0x2a0000]),                             // HeapCreate
            heap(33, &[0x2a0000, 100, 0x2a1000]),              // HeapAlloc in the private heap
            heap(33, &[0x2a0000, 200, 0x2a2000]),              // and another
            heap(33, &[0x1d0000, 24, 0x1d0a40]),               // HeapAlloc in the process heap
            heap(34, &[0x1d0000, 0x1d0b00, 0x1d0a40, 48, 24]), // HeapReAlloc moves it
            heap(36, &[0x2a0000, 0x2a1000]),                   // HeapFree of the first block
            heap(35, &[0x2a0000]),                             // HeapDestroy
        ];
        feed(&mut ledger, &mut translation, &records);
        let live = ledger.memory_by_site(&Filter::default());
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!((live[0].memory, live[0].count, live[0].bytes), (Memory::Heap(Domain::WinHeap), 1, 48));
        assert_eq!(ledger.live_heaps(ledger.mark()).count(), 0);
        assert_eq!(ledger.untracked_releases, 0);
    }

    #[test]
    fn a_heap_never_destroyed_stays_live() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        feed(&mut ledger, &mut translation, &[heap(32, &[0x2a0000]), heap(32, &[0x3b0000]), heap(35, &[0x2a0000])]);
        let live: Vec<u64> = ledger.live_heaps(Default::default()).map(|(h, _)| h).collect();
        assert_eq!(live, [0x3b0000]);
    }

    #[test]
    fn virtual_memory_is_released_only_by_mem_release() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let region = |opcode, flags: u32| {
            let mut data = payload(&[0x7ff0_0000_0000, 1 << 16]);
            data.extend(4242u32.to_le_bytes());
            data.extend(flags.to_le_bytes());
            decode(Provider::PageFault, opcode, 8, &data).unwrap().unwrap()
        };
        feed(&mut ledger, &mut translation, &[region(98, 0x3000), region(99, 0x4000)]); // MEM_DECOMMIT
        assert_eq!(ledger.memory_by_site(&Filter::default())[0].bytes, 1 << 16);
        feed(&mut ledger, &mut translation, &[region(99, MEM_RELEASE)]);
        assert!(ledger.memory_by_site(&Filter::default()).is_empty());
    }

    #[test]
    fn handles_and_threads() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let thread = |opcode, tid: u32| {
            let mut data = 4242u32.to_le_bytes().to_vec();
            data.extend(tid.to_le_bytes());
            data.extend(payload(&[0; 9]));
            decode(Provider::Thread, opcode, 8, &data).unwrap().unwrap()
        };
        feed(
            &mut ledger,
            &mut translation,
            &[
                handle(32, 0x1a4, r"\Device\Afd"),
                handle(32, 0x1a8, ""),
                handle(33, 0x1a8, ""),
                thread(1, 77),
                thread(1, 78),
                thread(2, 77),
            ],
        );
        let open: Vec<(u64, String)> =
            ledger.open_handles(Default::default()).map(|(h, o)| (h, o.kind.describe())).collect();
        assert_eq!(open, [(0x1a4, r"type 37 \Device\Afd".to_string())]);
        let threads: Vec<u32> = ledger.live_threads(Default::default()).map(|(t, _)| t).collect();
        assert_eq!(threads, [78]);
    }

    #[test]
    fn a_report_shows_handles_and_heaps_with_the_stack_that_made_them() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let handle = handle(32, 0x1a4, r"\Device\Afd");
        feed(&mut ledger, &mut translation, &[handle, heap(32, &[0x2a0000]), heap(33, &[0x2a0000, 64, 0x2a1000])]);
        let selection =
            Selection { top: 5, sort: SortKey::Bytes, min_size: 0, max_size: None, min_age: Duration::ZERO };
        let mut reporter = Reporter::new(std::process::id(), selection);
        let mut sites = Sites { translation: &translation, symbols: &mut Addresses };
        let report = reporter.report(&ledger, &mut sites, 10, &|| true, Lost::default(), None);
        let text = report.to_text();
        for line in [
            r"1 handle (type 37 \Device\Afd) open for up to 0.0s, opened at 0x7ff600001000 in ?: 0x1a4",
            "1 heap not destroyed for up to 0.0s, created at 0x7ff600001001 in ?: 0x2a0000",
            "#1 64B live in 1 HeapAlloc blocks",
            "0x7ff600009000 in ?",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["handles"][0]["kind"], r"type 37 \Device\Afd");
        assert_eq!(json["heaps"][0]["heap"], 0x2a0000);
    }

    /// Stands in for dbghelp, which only Windows has: names each address by its module, as
    /// dbghelp would for a leak in an extension (ntdll's heap under ucrtbase's malloc).
    struct Modules(&'static [(u64, &'static str, &'static str)]);

    impl Symbolize for Modules {
        fn frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
            addrs
                .iter()
                .map(|&addr| {
                    let (_, module, function) = self.0.iter().find(|(a, ..)| *a == addr).expect("a known address");
                    let (module, function) = (Some(module.to_string()), Some(function.to_string()));
                    Frame { function, module, ..Frame::unknown(addr) }
                })
                .collect()
        }
    }

    const NTDLL_ALLOC: u64 = 0x7ffb_0000_1000;
    const MALLOC: u64 = 0x7ffa_0000_2000;
    const LEAKY: u64 = 0x7ff9_0000_3000;
    const PYTHON: u64 = 0x7ff8_0000_4000;
    const FRAMES: Modules = Modules(&[
        (NTDLL_ALLOC, r"C:\Windows\SYSTEM32\ntdll.dll", "RtlAllocateHeap"),
        (MALLOC, r"C:\Windows\System32\ucrtbase.dll", "malloc"),
        (LEAKY, r"C:\src\leaky\leaky.cp312-win_amd64.pyd", "leak_bytes"),
        (PYTHON, r"C:\Python312\python312.dll", "_PyEval_EvalFrameDefault"),
    ]);

    #[test]
    fn the_site_is_the_first_user_mode_frame_outside_the_runtime() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let alloc = heap(33, &[0x1d0000, 64, 0x1d0a40]);
        let kernel = 0xffff_f800_1234_0000;
        let stack = [kernel, kernel + 8, NTDLL_ALLOC, MALLOC, LEAKY, PYTHON];
        for event in translation.events(&alloc, 1, 7, &stack) {
            ledger.apply(&event);
        }
        let site = ledger.memory_by_site(&Filter::default())[0].site;
        assert_eq!(translation.stack(ledger.origin(site)), &stack[2..], "kernel frames are dropped");
        let mut symbols = FRAMES;
        let mut sites = Sites { translation: &translation, symbols: &mut symbols };
        let (blamed, frames) = sites.site(ledger.origin(site));
        assert_eq!(blamed.unwrap().function.as_deref(), Some("leak_bytes"));
        assert_eq!(frames.len(), 4);
        // A stack wholly in the runtime blames its innermost frame.
        let (blamed, _) = sites.site(Origin { caller: Some(MALLOC), ..Origin::default() });
        assert_eq!(blamed.unwrap().function.as_deref(), Some("malloc"));
        assert!(is_runtime_module("KERNELBASE.dll") && is_runtime_module("vcruntime140_1.dll"));
        assert!(!is_runtime_module(r"C:\python312\DLLs\_socket.pyd"));
    }

    /// The Windows collector's replies: what the Python package asks, answered from ETW records.
    #[test]
    fn the_collector_names_what_a_call_left_from_etw_records() {
        let (mut ledger, mut translation) = (Ledger::new(), Translation::new());
        let mut answerer = crate::serve::answer::Answerer::new(None);
        let mut ask = |request: &str, ledger: &Ledger, translation: &Translation| {
            let mut symbols = FRAMES;
            let mut sites = Sites { translation, symbols: &mut symbols };
            let reply = answerer.handle(
                request,
                ledger,
                &mut sites,
                &crate::serve::answer::Moment::without_reports(Lost::default()),
            );
            serde_json::from_str::<serde_json::Value>(&reply).unwrap()
        };
        let stack = [NTDLL_ALLOC, MALLOC, LEAKY, PYTHON];
        let mark = ask(r#"{"op":"mark"}"#, &ledger, &translation)["mark"].clone();
        for record in [handle(32, 0x1a4, r"\Device\Afd"), heap(32, &[0x2a0000])] {
            for event in translation.events(&record, 1, 7, &stack) {
                ledger.apply(&event);
            }
        }
        let created = ask(&format!(r#"{{"op":"created","since":{mark}}}"#), &ledger, &translation);
        assert_eq!(created["ok"], true, "{created}");
        assert_eq!(created["handles"][0]["handle"], 0x1a4);
        assert_eq!(created["handles"][0]["kind"], r"type 37 \Device\Afd");
        assert_eq!(created["handles"][0]["site"]["function"], "leak_bytes");
        // Rendered by the collector, so that the Python package formats no site.
        let site_text = created["handles"][0]["site"]["text"].as_str().unwrap().to_string();
        assert!(site_text.starts_with("leak_bytes"), "{created}");
        assert_eq!(created["handles"][0]["site_text"], site_text.as_str(), "{created}");
        assert_eq!(created["heaps"][0]["heap"], 0x2a0000);
        assert_eq!(created["fds"], serde_json::json!([]));

        let measurement = ask(r#"{"op":"begin"}"#, &ledger, &translation)["measurement"].clone();
        let mut verdict = serde_json::Value::Null;
        for batch in 0..3u64 {
            ask(&format!(r#"{{"op":"window","measurement":{measurement}}}"#), &ledger, &translation);
            for call in 0..10 {
                let block = heap(33, &[0x1d0000, 100, 0x1d_0000 + 0x1000 * (batch * 10 + call + 1)]);
                for event in translation.events(&block, 2, 7, &stack) {
                    ledger.apply(&event);
                }
            }
            let request = format!(r#"{{"op":"batch","measurement":{measurement},"calls":10,"confirm":3}}"#);
            verdict = ask(&request, &ledger, &translation);
        }
        assert_eq!(verdict["verdict"], "leak", "{verdict}");
        assert_eq!(verdict["live"]["heap_blocks"], 30, "{verdict}");
        assert_eq!(verdict["sites"][0]["site"]["function"], "leak_bytes", "{verdict}");
        assert_eq!(verdict["sites"][0]["bytes_growth"], 1000, "{verdict}");
        let line = verdict["sites"][0]["text"].as_str().unwrap();
        let expected = format!(
            "{site_text}: 30 blocks, 2.9K live (HeapAlloc), +1000B in the last batch, grown 3 batches in a row, ~100.0B per call"
        );
        assert_eq!(line, expected, "the site's line, per call over the measurement's 30 calls");
    }
}
