//! The ledger: every resource created since attach that is still live, keyed by address, fd
//! or tid, each with the site that created it. Resources that existed before attach are
//! unknown to it, and their release is ignored.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::event::{Change, Domain, Event, FdKind, HandleKind, Origin};

/// An interned creation site.
pub type SiteId = u32;

/// A point in the event stream; resources created after it are "since" it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Mark(u64);

/// What a byte-counted resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "domain")]
pub enum Memory {
    Heap(Domain),
    Mmap,
}

#[derive(Debug, Clone, Copy)]
struct Created {
    site: SiteId,
    seq: u64,
    ts_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    domain: Domain,
    size: u64,
    created: Created,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    end: u64,
    allocator_internal: bool,
    created: Created,
}

#[derive(Debug, Clone, Copy)]
pub struct OpenFd {
    pub kind: FdKind,
    pub site: SiteId,
    pub ts_ns: u64,
    seq: u64,
}

#[derive(Debug, Clone)]
pub struct OpenHandle {
    pub kind: HandleKind,
    pub site: SiteId,
    pub ts_ns: u64,
    seq: u64,
}

/// A live thread or Windows heap.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub site: SiteId,
    pub ts_ns: u64,
    seq: u64,
}

/// Which live memory a query counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    /// Only what was created at or after this mark.
    pub since: Mark,
    /// Only what was created before this mark (None: up to now).
    pub until: Option<Mark>,
    /// Only what was created at or before this CLOCK_MONOTONIC time (a minimum age).
    pub created_by_ns: Option<u64>,
    pub min_size: u64,
    pub max_size: Option<u64>,
}

impl Filter {
    fn admits(&self, created: &Created, size: u64) -> bool {
        created.seq >= self.since.0
            && self.until.is_none_or(|until| created.seq < until.0)
            && self.created_by_ns.is_none_or(|t| created.ts_ns <= t)
            && size >= self.min_size
            && self.max_size.is_none_or(|max| size <= max)
    }
}

/// Live memory created at one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SiteTotals {
    pub memory: Memory,
    #[serde(skip)]
    pub site: SiteId,
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Ledger {
    seq: u64,
    sites: Vec<Origin>,
    site_ids: HashMap<Origin, SiteId>,
    /// Live heap blocks by address. One address holds one live block, whichever allocator
    /// made it: a free or a new block at that address ends the old one. CPython built with LTO
    /// (Debian's) inlines PyMem_Free into its callers, which then call free() directly on a
    /// block that PyMem_Calloc made.
    heap: HashMap<u64, Block>,
    mappings: BTreeMap<u64, Mapping>,
    fds: BTreeMap<i32, OpenFd>,
    threads: BTreeMap<u32, Live>,
    heaps: BTreeMap<u64, Live>,
    handles: BTreeMap<u64, OpenHandle>,
    /// Releases of resources the ledger never saw created (made before attach).
    pub untracked_releases: u64,
    /// At most this many heap blocks and mappings are kept: a runaway or hostile target must
    /// not take the collector's memory with it (~150 bytes each). Past it a new one is counted
    /// in `dropped_for_room` instead, and the reports say that the ledger is incomplete.
    room: usize,
    pub dropped_for_room: u64,
    /// Execs of the process seen: each ended the old program's resources.
    pub execs: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_room(usize::MAX)
    }
}

const PAGE: u64 = 4096;

fn page_align(len: u64) -> u64 {
    len.div_ceil(PAGE).saturating_mul(PAGE)
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger that keeps at most `room` heap blocks and mappings.
    pub fn with_room(room: usize) -> Self {
        Self {
            seq: 0,
            sites: Vec::new(),
            site_ids: HashMap::new(),
            heap: HashMap::new(),
            mappings: BTreeMap::new(),
            fds: BTreeMap::new(),
            threads: BTreeMap::new(),
            heaps: BTreeMap::new(),
            handles: BTreeMap::new(),
            untracked_releases: 0,
            room,
            dropped_for_room: 0,
            execs: 0,
        }
    }

    /// The current point of the stream.
    pub fn mark(&self) -> Mark {
        Mark(self.seq)
    }

    /// Number of events applied.
    pub fn events(&self) -> u64 {
        self.seq
    }

    pub fn origin(&self, site: SiteId) -> Origin {
        self.sites[site as usize]
    }

    /// The site of `origin`. Past `room` distinct sites (a target with endless callers: JIT
    /// code, or a hostile one) every new one is the same, the empty origin, which names nothing:
    /// the table must not grow without bound, and what it stands for is still counted.
    fn intern(&mut self, origin: Origin) -> SiteId {
        if let Some(&id) = self.site_ids.get(&origin) {
            return id;
        }
        if self.sites.len() >= self.room && origin != Origin::default() {
            return self.intern(Origin::default());
        }
        let id = self.sites.len() as SiteId;
        self.sites.push(origin);
        self.site_ids.insert(origin, id);
        id
    }

    pub fn apply(&mut self, event: &Event) {
        // Only what creates a resource needs a site; a release is not interned.
        let creates = !matches!(
            event.change,
            Change::Free { .. }
                | Change::Unmap { .. }
                | Change::FdClose { .. }
                | Change::ThreadExit { .. }
                | Change::HeapDestroy { .. }
                | Change::HandleClose { .. }
                | Change::Exec
        );
        let site = if creates { self.intern(event.origin) } else { 0 };
        let created = Created { site, seq: self.seq, ts_ns: event.ts_ns };
        self.seq += 1;
        let live = Live { site: created.site, ts_ns: event.ts_ns, seq: created.seq };
        match event.change {
            Change::Alloc { domain, addr, size } => self.insert_block(addr, Block { domain, size, created }),
            Change::Free { addr, .. } => self.release_block(addr),
            Change::Realloc { domain, old, new, size } => {
                if old != 0 {
                    self.release_block(old);
                }
                self.insert_block(new, Block { domain, size, created });
            }
            Change::Map { addr, len, allocator_internal } => {
                self.unmap(addr, len);
                self.insert_mapping(addr, len, Mapping { end: 0, allocator_internal, created });
            }
            Change::Unmap { addr, len } => {
                if !self.unmap(addr, len) {
                    self.untracked_releases += 1;
                }
            }
            Change::Remap { old, old_len, new, new_len, allocator_internal } => {
                self.unmap(old, old_len);
                self.unmap(new, new_len);
                self.insert_mapping(new, new_len, Mapping { end: 0, allocator_internal, created });
            }
            Change::FdOpen { fd, kind } => {
                // A live fd reopened under the same number was closed implicitly (dup2).
                self.fds.insert(fd, OpenFd { kind, site: created.site, ts_ns: event.ts_ns, seq: created.seq });
            }
            Change::FdClose { first, last } if first <= last => {
                let closed: Vec<i32> = self.fds.range(first..=last).map(|(&fd, _)| fd).collect();
                if closed.is_empty() && first == last {
                    self.untracked_releases += 1;
                }
                for fd in closed {
                    self.fds.remove(&fd);
                }
            }
            Change::FdClose { .. } => {}
            Change::ThreadStart { tid } => {
                self.threads.insert(tid, live);
            }
            Change::ThreadExit { tid } => {
                let tracked = self.threads.remove(&tid).is_some();
                self.release(tracked);
            }
            Change::HeapCreate { heap } => {
                self.heaps.insert(heap, live);
            }
            Change::HeapDestroy { heap } => {
                let tracked = self.heaps.remove(&heap).is_some();
                self.release(tracked);
            }
            Change::HandleOpen { handle, ref kind } => {
                let open = OpenHandle { kind: kind.clone(), site: live.site, ts_ns: live.ts_ns, seq: live.seq };
                self.handles.insert(handle, open);
            }
            Change::HandleClose { handle } => {
                let tracked = self.handles.remove(&handle).is_some();
                self.release(tracked);
            }
            Change::Exec => {
                // Memory went with the old address space, threads with de_thread(). The fds
                // that outlive an exec are the new program's inheritance, like those it had
                // before attach; the kernel closed the others (close-on-exec) without a word.
                self.execs += 1;
                self.heap.clear();
                self.mappings.clear();
                self.fds.clear();
                self.threads.clear();
            }
        }
    }

    /// Whether one more block or mapping fits; counts it as dropped if not.
    fn has_room(&mut self) -> bool {
        let fits = self.heap.len() + self.mappings.len() < self.room;
        if !fits {
            self.dropped_for_room += 1;
        }
        fits
    }

    fn insert_block(&mut self, addr: u64, block: Block) {
        // A block at an address already held replaces it and takes no more room.
        if self.heap.contains_key(&addr) || self.has_room() {
            self.heap.insert(addr, block);
        }
    }

    fn insert_mapping(&mut self, addr: u64, len: u64, mapping: Mapping) {
        if self.has_room() {
            let end = addr.saturating_add(page_align(len));
            self.mappings.insert(addr, Mapping { end, ..mapping });
        }
    }

    /// Counts the release of a resource the ledger never saw created.
    fn release(&mut self, was_tracked: bool) {
        if !was_tracked {
            self.untracked_releases += 1;
        }
    }

    fn release_block(&mut self, addr: u64) {
        let was_tracked = self.heap.remove(&addr).is_some();
        self.release(was_tracked);
    }

    /// Removes `[addr, addr+len)` from the tracked mappings, splitting those that straddle it.
    /// Returns whether any tracked mapping was touched.
    fn unmap(&mut self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(page_align(len));
        let overlapping: Vec<(u64, Mapping)> =
            self.mappings.range(..end).rev().take_while(|(_, m)| m.end > addr).map(|(&start, &m)| (start, m)).collect();
        for (start, m) in &overlapping {
            self.mappings.remove(start);
            if *start < addr {
                self.mappings.insert(*start, Mapping { end: addr, ..*m });
            }
            if m.end > end {
                self.mappings.insert(end, Mapping { end: m.end, ..*m });
            }
        }
        !overlapping.is_empty()
    }

    /// Live memory admitted by `filter`, one entry per (kind of memory, site), largest first.
    /// Mappings made inside the allocator are left out: their bytes are heap already.
    pub fn memory_by_site(&self, filter: &Filter) -> Vec<SiteTotals> {
        let mut totals: HashMap<(Memory, SiteId), (u64, u64)> = HashMap::new();
        let mut add = |memory, created: &Created, size| {
            if filter.admits(created, size) {
                let entry = totals.entry((memory, created.site)).or_default();
                entry.0 += 1;
                // Sizes are what the allocator was asked for: a hostile one may ask for anything.
                entry.1 = entry.1.saturating_add(size);
            }
        };
        for block in self.heap.values() {
            add(Memory::Heap(block.domain), &block.created, block.size);
        }
        for (&start, m) in self.mappings.iter().filter(|(_, m)| !m.allocator_internal) {
            add(Memory::Mmap, &m.created, m.end - start);
        }
        let mut sites: Vec<SiteTotals> = totals
            .into_iter()
            .map(|((memory, site), (count, bytes))| SiteTotals { memory, site, count, bytes })
            .collect();
        sites.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)).then(a.site.cmp(&b.site)));
        sites
    }

    /// Fds opened since `since` and still open, by fd number.
    pub fn open_fds(&self, since: Mark) -> impl Iterator<Item = (i32, &OpenFd)> {
        self.fds.iter().filter(move |(_, f)| f.seq >= since.0).map(|(&fd, f)| (fd, f))
    }

    /// Threads started since `since` and still alive, by tid.
    pub fn live_threads(&self, since: Mark) -> impl Iterator<Item = (u32, &Live)> {
        self.threads.iter().filter(move |(_, t)| t.seq >= since.0).map(|(&tid, t)| (tid, t))
    }

    /// Windows heaps created since `since` and not destroyed, by handle.
    pub fn live_heaps(&self, since: Mark) -> impl Iterator<Item = (u64, &Live)> {
        self.heaps.iter().filter(move |(_, h)| h.seq >= since.0).map(|(&heap, h)| (heap, h))
    }

    /// Windows handles opened since `since` and still open, by handle value.
    pub fn open_handles(&self, since: Mark) -> impl Iterator<Item = (u64, &OpenHandle)> {
        self.handles.iter().filter(move |(_, h)| h.seq >= since.0).map(|(&handle, h)| (handle, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(caller: u64, change: Change) -> Event {
        Event { ts_ns: 1, tid: 1, origin: Origin { caller: Some(caller), ..Origin::default() }, change }
    }

    fn heap_bytes(ledger: &Ledger) -> u64 {
        ledger.memory_by_site(&Filter::default()).iter().filter(|s| s.memory != Memory::Mmap).map(|s| s.bytes).sum()
    }

    #[test]
    fn frees_cancel_allocations_and_unknown_frees_are_ignored() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 100 }));
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x20, size: 50 }));
        l.apply(&at(1, Change::Free { domain: Domain::Libc, addr: 0x10 }));
        l.apply(&at(1, Change::Free { domain: Domain::Libc, addr: 0x999 }));
        assert_eq!(heap_bytes(&l), 50);
        assert_eq!(l.untracked_releases, 1);
    }

    #[test]
    fn a_free_ends_the_block_whichever_allocator_made_it() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Alloc { domain: Domain::Pymem, addr: 0x10, size: 32 }));
        l.apply(&at(1, Change::Free { domain: Domain::Libc, addr: 0x10 }));
        assert_eq!(heap_bytes(&l), 0, "PyMem_Free inlined into free() releases a PyMem block");
        l.apply(&at(1, Change::Alloc { domain: Domain::Pyobject, addr: 0x20, size: 32 }));
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x20, size: 64 }));
        assert_eq!(heap_bytes(&l), 64, "an address holds one live block: the newest");
    }

    #[test]
    fn realloc_moves_the_block_to_the_new_site() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 8 }));
        l.apply(&at(2, Change::Realloc { domain: Domain::Libc, old: 0x10, new: 0x40, size: 64 }));
        let sites = l.memory_by_site(&Filter::default());
        assert_eq!(sites.len(), 1);
        assert_eq!((sites[0].count, sites[0].bytes), (1, 64));
        assert_eq!(l.origin(sites[0].site).caller, Some(2));
    }

    #[test]
    fn groups_by_site_and_filters_by_mark_and_size() {
        let mut l = Ledger::new();
        for i in 0..10 {
            l.apply(&at(7, Change::Alloc { domain: Domain::Libc, addr: 0x1000 + i, size: 16 }));
        }
        let mid = l.mark();
        l.apply(&at(8, Change::Alloc { domain: Domain::Libc, addr: 0x9000, size: 4096 }));
        let all = l.memory_by_site(&Filter::default());
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].count, all[0].bytes), (1, 4096));
        assert_eq!((all[1].count, all[1].bytes), (10, 160));
        assert_eq!(l.memory_by_site(&Filter { since: mid, ..Filter::default() }).len(), 1);
        assert_eq!(l.memory_by_site(&Filter { until: Some(mid), ..Filter::default() })[0].count, 10);
        assert_eq!(l.memory_by_site(&Filter { min_size: 100, ..Filter::default() })[0].bytes, 4096);
    }

    #[test]
    fn partial_munmap_splits_mappings() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Map { addr: 0x10000, len: 4 * PAGE, allocator_internal: false }));
        l.apply(&at(1, Change::Unmap { addr: 0x10000 + PAGE, len: PAGE }));
        let sites = l.memory_by_site(&Filter::default());
        assert_eq!((sites[0].count, sites[0].bytes), (2, 3 * PAGE));
        l.apply(&at(1, Change::Unmap { addr: 0x10000, len: 4 * PAGE }));
        assert!(l.memory_by_site(&Filter::default()).is_empty());
    }

    #[test]
    fn allocator_mappings_are_not_counted_twice() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Map { addr: 0x10000, len: 200_000, allocator_internal: true }));
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10010, size: 200_000 }));
        let sites = l.memory_by_site(&Filter::default());
        assert_eq!(sites.len(), 1);
        assert_eq!(sites[0].memory, Memory::Heap(Domain::Libc));
    }

    #[test]
    fn an_exec_ends_what_the_old_program_made() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 100 }));
        l.apply(&at(1, Change::Map { addr: 0x10000, len: PAGE, allocator_internal: false }));
        l.apply(&at(1, Change::FdOpen { fd: 3, kind: FdKind::File }));
        l.apply(&at(1, Change::ThreadStart { tid: 100 }));
        let before_exec = l.mark();
        l.apply(&at(1, Change::Exec));
        l.apply(&at(2, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 8 }));
        let sites = l.memory_by_site(&Filter::default());
        assert_eq!(sites.len(), 1, "only the new program's block: {sites:?}");
        assert_eq!((l.origin(sites[0].site).caller, sites[0].bytes), (Some(2), 8));
        assert_eq!(l.open_fds(Mark::default()).count() + l.live_threads(Mark::default()).count(), 0);
        assert_eq!(l.execs, 1);
        assert!(l.mark() > before_exec, "marks stay comparable across the exec");
        l.apply(&at(1, Change::Free { domain: Domain::Libc, addr: 0x10 }));
        assert_eq!(heap_bytes(&l), 0);
    }

    #[test]
    fn a_full_ledger_counts_what_it_drops() {
        let mut l = Ledger::with_room(2);
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 1 }));
        l.apply(&at(1, Change::Map { addr: 0x10000, len: PAGE, allocator_internal: false }));
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x20, size: 1 }));
        l.apply(&at(1, Change::Map { addr: 0x20000, len: PAGE, allocator_internal: false }));
        assert_eq!(l.dropped_for_room, 2);
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x10, size: 5 }));
        assert_eq!((l.dropped_for_room, heap_bytes(&l)), (2, 5), "a held address takes no more room");
        l.apply(&at(1, Change::Free { domain: Domain::Libc, addr: 0x10 }));
        l.apply(&at(1, Change::Alloc { domain: Domain::Libc, addr: 0x30, size: 7 }));
        assert_eq!((l.dropped_for_room, heap_bytes(&l)), (2, 7), "a free makes room");
    }

    #[test]
    fn endless_callers_share_one_site_past_the_room() {
        let mut l = Ledger::with_room(3);
        for caller in 1..=10 {
            l.apply(&at(caller, Change::FdOpen { fd: caller as i32, kind: FdKind::File }));
            l.apply(&at(caller + 100, Change::FdClose { first: caller as i32, last: caller as i32 }));
        }
        assert_eq!(l.sites.len(), 4, "three sites, then the one that names nothing: {:?}", l.sites);
        assert_eq!(l.origin(3), Origin::default());
    }

    #[test]
    fn hostile_lengths_do_not_overflow() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::Map { addr: u64::MAX - PAGE, len: u64::MAX, allocator_internal: false }));
        l.apply(&at(1, Change::Unmap { addr: u64::MAX - 1, len: u64::MAX }));
        assert!(l.memory_by_site(&Filter::default()).iter().all(|s| s.count == 1));
    }

    #[test]
    fn fds_and_threads() {
        let mut l = Ledger::new();
        l.apply(&at(1, Change::FdOpen { fd: 3, kind: FdKind::File }));
        l.apply(&at(1, Change::FdOpen { fd: 4, kind: FdKind::Pipe }));
        l.apply(&at(1, Change::FdOpen { fd: 9, kind: FdKind::Pipe }));
        l.apply(&at(1, Change::FdClose { first: 4, last: i32::MAX }));
        l.apply(&at(1, Change::FdClose { first: 8, last: 2 })); // inverted: nothing
        l.apply(&at(2, Change::FdOpen { fd: 3, kind: FdKind::Pipe })); // dup2 over 3
        let open: Vec<_> = l.open_fds(Mark::default()).map(|(fd, f)| (fd, f.kind)).collect();
        assert_eq!(open, vec![(3, FdKind::Pipe)]);
        l.apply(&at(1, Change::ThreadStart { tid: 100 }));
        l.apply(&at(1, Change::ThreadStart { tid: 101 }));
        l.apply(&at(1, Change::ThreadExit { tid: 100 }));
        assert_eq!(l.live_threads(Mark::default()).map(|(t, _)| t).collect::<Vec<_>>(), vec![101]);
    }
}
