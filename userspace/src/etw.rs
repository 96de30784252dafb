//! ETW records (decoded by `psleak-etw`) as psleak events, for the ledger. Plain Rust, built
//! and tested everywhere; only the sessions that produce the records need Windows.
//!
//! ETW speaks of heaps where the ledger speaks of blocks: destroying a private heap frees its
//! blocks without a HeapFree each, so the translation remembers which heap each live block
//! belongs to and sends their frees before the heap's end.
//!
//! A site is the stack ETW logged with the event, innermost first; its frames are addresses
//! (Windows symbols are not read yet).

use std::collections::{HashMap, HashSet};

use psleak_etw::records::{Record, MEM_RELEASE};

use crate::event::{Change, Domain, Event, HandleKind, Origin};
use crate::report::{Describe, Frame};

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
        let Some((&caller, rest)) = stack.split_first() else {
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
        Origin { caller: Some(caller), stack_id: None, chain: Some(chain) }
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

/// Sites as the addresses of their stack; ETW says nothing of fds, nor names threads.
impl Describe for Translation {
    fn site(&mut self, origin: Origin) -> (Option<Frame>, Vec<Frame>) {
        let frame = |addr| Frame { addr, function: None, module: None, file: None, line: None };
        let rest = origin.chain.and_then(|id| self.chains.get(id as usize)).map_or(&[][..], Vec::as_slice);
        let stack = origin.caller.into_iter().chain(rest.iter().copied()).map(frame).collect();
        (origin.caller.map(frame), stack)
    }

    fn fd_target(&self, _: i32) -> Option<String> {
        None
    }

    fn thread_name(&self, _: u32) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use psleak_etw::records::{decode, Provider};

    use std::time::Duration;

    use super::*;
    use crate::ledger::{Filter, Ledger, Memory};
    use crate::report::{Lost, Reporter, Selection};

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
        let handle = |opcode, value: u32, name: &str| {
            let mut data = payload(&[0xffff_a000_1234_5670]);
            data.extend(value.to_le_bytes());
            data.extend(37u16.to_le_bytes());
            data.extend(name.encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
            decode(Provider::Object, opcode, 8, &data).unwrap().unwrap()
        };
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
        let handle = {
            let mut data = payload(&[0xffff_a000_1234_5670]);
            data.extend(0x1a4u32.to_le_bytes());
            data.extend(37u16.to_le_bytes());
            data.extend(r"\Device\Afd".encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
            decode(Provider::Object, 32, 8, &data).unwrap().unwrap()
        };
        feed(&mut ledger, &mut translation, &[handle, heap(32, &[0x2a0000]), heap(33, &[0x2a0000, 64, 0x2a1000])]);
        let selection = Selection { top: 5, min_size: 0, max_size: None, min_age: Duration::ZERO };
        let mut reporter = Reporter::new(std::process::id(), selection);
        let report = reporter.report(&ledger, &mut translation, 10, true, Lost::default(), None);
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
}
