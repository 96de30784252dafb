//! The memory verdict, one for every backend, judged once per batch of calls (psleak's batches:
//! `times` calls, growing by half, up to `retries`).
//!
//! **Counters judge** (`Judge`). Exact counters — the allocator's bytes in use, its mmap'd
//! chunks, the mappings outside the allocator, CPython's allocated blocks — are read around
//! every batch without any probe: a counter that grows in `confirm` batches in a row, keeping
//! up with the calls and not fading, is a leak; a batch in which none grows (and the inexact
//! vms, uss and rss fade, as a second opinion) is clean. Readings the judge cannot trust to be
//! exact (a caller's own, psleak 0.1.6's tests feed those) are judged by 0.1.6's heuristic
//! alone: growth per call must fade, twice in a row, or the batches run out.
//!
//! **The tracer names** (`Measurement`). Once the counters have found a leak, a few traced
//! batches say which creation sites keep growing: live allocations per site, batch after batch.
//! A site that grows once (a cache filling) and stops is not named.
//!
//! Growth must keep up with the calls: at least a byte, or a block every other call, on
//! average. The interpreter's free lists fill a block at a time whatever the batch size (a
//! dict per batch of a hundred calls), and a real leak, however small, grows with every call.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::model::ledger::{Mark, Memory, SiteId, SiteTotals};

/// Growth allowed per batch before it counts, in bytes (psleak's `tolerance`, for the metrics
/// the ledger measures exactly).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tolerance {
    #[serde(default)]
    pub heap: u64,
    #[serde(default)]
    pub mmap: u64,
}

impl Tolerance {
    fn of(&self, memory: Memory) -> u64 {
        match memory {
            Memory::Heap(_) => self.heap,
            Memory::Mmap => self.mmap,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Some site grew in each of the last `confirm` batches.
    Leak,
    /// No site grew in the last batch.
    Clean,
    /// Some site grew, but not yet long enough to call it a leak.
    Undecided,
}

/// How one site's live memory changed in the last batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteGrowth {
    pub totals: SiteTotals,
    pub count_growth: i64,
    pub bytes_growth: i64,
    /// Consecutive batches, up to this one, in which the site grew.
    pub streak: u32,
}

/// One `execute()`'s series of batches. Only what the batches themselves created counts: the
/// checker's own bookkeeping between batches is outside every window.
#[derive(Debug, Default)]
pub struct Measurement {
    /// Each batch's [start, end) in the event stream.
    pub windows: Vec<(Mark, Mark)>,
    /// The start of the batch under way.
    pub open_window: Option<Mark>,
    /// The calls of all batches so far, which the live memory in the windows came from.
    pub calls: u64,
    last: HashMap<(Memory, SiteId), (u64, u64)>,
    streaks: HashMap<(Memory, SiteId), u32>,
}

impl Measurement {
    /// Judges the batch that just ended from the live memory created in all windows, by site.
    /// Returns the verdict and the sites that grew, longest streak first.
    pub fn batch(
        &mut self,
        live: &[SiteTotals],
        calls: u64,
        tolerance: &Tolerance,
        confirm: u32,
    ) -> (Verdict, Vec<SiteGrowth>) {
        self.calls = self.calls.saturating_add(calls);
        let calls = calls as i64;
        let mut growth: Vec<SiteGrowth> = live
            .iter()
            .map(|t| {
                let (count, bytes) = self.last.get(&(t.memory, t.site)).copied().unwrap_or((0, 0));
                SiteGrowth {
                    totals: *t,
                    count_growth: (t.count as i64).saturating_sub(count as i64),
                    // Sizes come from the target's allocator calls: any value, never an overflow.
                    bytes_growth: (t.bytes as i64).saturating_sub(bytes as i64),
                    streak: 0,
                }
            })
            .filter(|g| (g.count_growth > 0 || g.bytes_growth > 0) && keeps_up(g, calls))
            .collect();
        // Tolerance excuses a kind of memory whose whole growth in this batch stays within it.
        let grown = |heap: bool| -> u64 {
            let of_kind = |g: &&SiteGrowth| matches!(g.totals.memory, Memory::Heap(_)) == heap;
            growth.iter().filter(of_kind).fold(0u64, |sum, g| sum.saturating_add(g.bytes_growth.max(0) as u64))
        };
        let (heap_excused, mmap_excused) = (grown(true) <= tolerance.heap, grown(false) <= tolerance.mmap);
        let tolerated =
            |m: Memory| tolerance.of(m) > 0 && if matches!(m, Memory::Heap(_)) { heap_excused } else { mmap_excused };
        growth.retain(|g| !tolerated(g.totals.memory));

        let mut streaks = HashMap::with_capacity(growth.len());
        for g in &mut growth {
            let key = (g.totals.memory, g.totals.site);
            g.streak = self.streaks.get(&key).copied().unwrap_or(0) + 1;
            streaks.insert(key, g.streak);
        }
        self.streaks = streaks;
        self.last = live.iter().map(|t| ((t.memory, t.site), (t.count, t.bytes))).collect();
        growth.sort_by(|a, b| b.streak.cmp(&a.streak).then(b.totals.bytes.cmp(&a.totals.bytes)));

        let verdict = match growth.first() {
            None => Verdict::Clean,
            Some(g) if g.streak >= confirm.max(1) => Verdict::Leak,
            Some(_) => Verdict::Undecided,
        };
        (verdict, growth)
    }
}

/// Whether a site grew at least a byte, or a block every other call, per call of the batch.
fn keeps_up(g: &SiteGrowth, calls: i64) -> bool {
    g.bytes_growth >= calls || g.count_growth * 2 >= calls
}

/// What the judge reads around a batch. Exact counters first, then the inexact ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The allocator's bytes in use (glibc's mallinfo2 `uordblks`, read with every thread
    /// cache class filled: exact for a batch that keeps nothing).
    Heap,
    /// Bytes in the allocator's own mmap'd chunks.
    Mmap,
    /// The mappings the code made itself: vms less all the allocator holds from the system.
    /// An `mmap` without its `munmap` shows here, and nowhere else.
    Mapped,
    /// The mapped total: the allocator's heap moves it too (a batch that keeps nothing may
    /// leave the heap's top a few pages further up), so only a second opinion.
    Vms,
    /// CPython's allocated blocks (`sys.getallocatedblocks()`): objects that never reach
    /// malloc under pymalloc. A count, not bytes.
    PyBlocks,
    /// Pages touched: grow with first use of memory mapped earlier, so only a second opinion.
    Uss,
    Rss,
}

impl Metric {
    pub const ALL: [Metric; 7] =
        [Metric::Heap, Metric::Mmap, Metric::Mapped, Metric::Vms, Metric::PyBlocks, Metric::Uss, Metric::Rss];

    /// Whether a batch that keeps nothing leaves the metric exactly where it was.
    pub fn is_exact(self) -> bool {
        !matches!(self, Metric::Vms | Metric::Uss | Metric::Rss)
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Heap => "heap",
            Metric::Mmap => "mmap",
            Metric::Mapped => "mapped",
            Metric::Vms => "vms",
            Metric::PyBlocks => "py_blocks",
            Metric::Uss => "uss",
            Metric::Rss => "rss",
        }
    }

    pub fn named(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Per-call growth at or below this many bytes is noise to psleak 0.1.6's heuristic. A real
/// once-per-call malloc leak cannot stay under it (glibc's smallest chunk is 32).
pub const NOISE_FLOOR: f64 = 16.0;

/// A batch's growth per call must fall below this share of the previous batch's to fade.
const FADE_RATIO: f64 = 0.8;

/// One batch's readings: how much each metric grew, and whether the exact ones can be trusted
/// as exact (psleak read them itself, around the batch and nothing else).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings {
    pub calls: u64,
    pub growth: Vec<(Metric, i64)>,
    pub exact: bool,
    /// The tracer's verdict on the batch's sites (`Measurement`), when the batch ran traced
    /// because other threads share the counters: their allocations and frees are in every
    /// process-wide figure (a thread freeing as fast as the call leaks hides the leak), never
    /// in the sites of the calls.
    pub sites: Option<Verdict>,
}

/// The outcome of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub verdict: Verdict,
    /// The exact counters that grew in this batch: what the tracer is asked to name.
    pub grown: Vec<Metric>,
    /// The batches ran out without a clean one: a leak by exhaustion, not by confirmation.
    pub exhausted: bool,
}

/// How an exact counter has grown: batches in a row in which it grew (and did not fade), the
/// least it grew per call in any of them, and batches in a row in which its growth faded.
#[derive(Debug, Default, Clone, Copy)]
struct CounterGrowth {
    streak: u32,
    least_per_call: Option<f64>,
    fades: u32,
}

/// One `execute()`'s memory check: its batches, judged on counters.
#[derive(Debug)]
pub struct Judge {
    tolerance: HashMap<Metric, u64>,
    retries: u32,
    confirm: u32,
    batches: u32,
    /// Each exact counter's growth so far.
    counters: HashMap<Metric, CounterGrowth>,
    /// psleak 0.1.6's state: growth per call in the last batch, and fading batches in a row.
    last_per_call: HashMap<Metric, f64>,
    fading_streak: u32,
}

impl Judge {
    /// `tolerance`: growth per batch allowed per metric (bytes; blocks for `PyBlocks`). Blocks
    /// are the heap of CPython's objects: unless told, as many are allowed as the heap's
    /// tolerance holds of the smallest (16 B). The code's own mappings are part of vms (psleak
    /// 0.1.6's metric): unless told, they are allowed what vms is.
    pub fn new(mut tolerance: HashMap<Metric, u64>, retries: u32, confirm: u32) -> Self {
        let heap = tolerance.get(&Metric::Heap).copied().unwrap_or(0);
        tolerance.entry(Metric::PyBlocks).or_insert(heap / 16);
        let vms = tolerance.get(&Metric::Vms).copied().unwrap_or(0);
        tolerance.entry(Metric::Mapped).or_insert(vms);
        Self {
            tolerance,
            retries: retries.max(1),
            confirm: confirm.max(1),
            batches: 0,
            counters: HashMap::new(),
            last_per_call: HashMap::new(),
            fading_streak: 0,
        }
    }

    fn tolerance(&self, metric: Metric) -> i64 {
        self.tolerance.get(&metric).copied().unwrap_or(0).min(i64::MAX as u64) as i64
    }

    pub fn batch(&mut self, readings: &Readings) -> Judged {
        self.batches += 1;
        let calls = readings.calls.max(1);
        // Without exact readings, everything is judged as 0.1.6 judged it; with the sites, the
        // exact counters are not judged at all (other threads move them).
        let traced = readings.sites.is_some();
        let (exact, inexact): (Vec<_>, Vec<_>) =
            readings.growth.iter().copied().partition(|(m, _)| readings.exact && m.is_exact());
        let exact = if traced { Vec::new() } else { exact };
        // With exact readings, vms is no second opinion: it is the code's mappings (Mapped) and
        // what the allocator holds from the system, whose bytes in use are judged exactly; its
        // heap's top moving up while nothing is kept is no leak (a clean function's batches
        // under load moved it in every batch, and the batches ran out: a false leak).
        let second_opinion = |m: Metric| if readings.exact { m != Metric::Vms } else { m != Metric::PyBlocks };
        let inexact: Vec<_> = inexact.into_iter().filter(|&(m, _)| second_opinion(m)).collect();

        let mut grown = Vec::new();
        let mut settled = true;
        for (metric, growth) in exact {
            let keeps_up = if metric == Metric::PyBlocks { growth * 2 >= calls as i64 } else { growth >= calls as i64 };
            let tolerated = growth <= self.tolerance(metric);
            let counter = self.counters.entry(metric).or_default();
            if tolerated || !keeps_up {
                *counter = CounterGrowth::default();
                continue;
            }
            let per_call = growth as f64 / calls as f64;
            // Against the least it grew per call so far: a batch that others' noise swelled
            // must not make the next one look faded.
            if counter.least_per_call.is_some_and(|least| per_call < least * FADE_RATIO) {
                counter.streak = 0;
                counter.fades += 1;
            } else {
                counter.streak += 1;
                counter.fades = 0;
                grown.push(metric);
            }
            counter.least_per_call = Some(counter.least_per_call.map_or(per_call, |least| least.min(per_call)));
            // Growth that fades, batch after batch, is noise spread over more calls (0.1.6's rule).
            settled &= counter.fades >= 2;
        }
        let stable = self.stable(&inexact, calls);
        let confirmed =
            self.counters.values().any(|c| c.streak >= self.confirm) || readings.sites == Some(Verdict::Leak);
        let grown_sites = readings.sites.is_some_and(|v| v != Verdict::Clean);

        let verdict = if confirmed {
            Verdict::Leak
        } else if settled && !grown_sites && stable {
            Verdict::Clean
        } else if self.batches >= self.retries {
            return Judged { verdict: Verdict::Leak, grown, exhausted: true };
        } else {
            Verdict::Undecided
        };
        Judged { verdict, grown, exhausted: false }
    }

    /// psleak 0.1.6's heuristic on `growth`: whether all stayed within tolerance, or growth
    /// per call faded twice in a row.
    fn stable(&mut self, growth: &[(Metric, i64)], calls: u64) -> bool {
        let per_call: HashMap<Metric, f64> = growth.iter().map(|&(m, g)| (m, g as f64 / calls as f64)).collect();
        let within = |&(m, g): &(Metric, i64)| g <= self.tolerance(m);
        let all_within = growth.iter().all(within);
        let fading = growth.iter().all(|g| {
            let (last, now) = (self.last_per_call.get(&g.0).copied().unwrap_or(0.0), per_call[&g.0]);
            within(g) || now <= NOISE_FLOOR || now <= last * FADE_RATIO
        });
        self.last_per_call = per_call;
        if all_within {
            return true;
        }
        self.fading_streak = if fading { self.fading_streak + 1 } else { 0 };
        self.fading_streak >= 2
    }
}

/// What to say when the tracer, brought in to name a leak the counters found, saw no site grow:
/// which memory the grown counters stand for that its probes do not follow.
pub fn unnamed(grown: &[Metric]) -> String {
    let why: Vec<&str> = grown
        .iter()
        .map(|m| match m {
            Metric::PyBlocks => {
                "CPython's own allocator, out of the probes' sight in this interpreter (a build with LTO inlines it): \
                 set PYTHONMALLOC=malloc to name its sites"
            }
            Metric::Mapped => "mappings made by no call the probes follow",
            Metric::Heap | Metric::Mmap => "allocator calls the probes did not see",
            Metric::Vms | Metric::Uss | Metric::Rss => "pages mapped or touched",
        })
        .collect();
    format!("the tracer saw no site grow; the growth is in {}", why.join(", and "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Domain;

    fn site(site: SiteId, count: u64, bytes: u64) -> SiteTotals {
        SiteTotals { memory: Memory::Heap(Domain::Libc), site, count, bytes }
    }

    const CALLS: u64 = 50;

    fn run(batches: &[Vec<SiteTotals>], tolerance: Tolerance) -> Vec<Verdict> {
        let mut m = Measurement::default();
        batches.iter().map(|live| m.batch(live, CALLS, &tolerance, 3).0).collect()
    }

    #[test]
    fn a_free_list_filling_a_block_per_batch_is_noise() {
        let dicts = |n| vec![site(9, n, n * 32)];
        assert_eq!(run(&[dicts(1), dicts(2), dicts(3), dicts(4)], Tolerance::default()), [Verdict::Clean; 4]);
        // The same growth in a batch of fewer calls than it has bytes is a leak's.
        let mut m = Measurement::default();
        let verdicts: Vec<Verdict> = (1..=3).map(|n| m.batch(&dicts(n), 2, &Tolerance::default(), 3).0).collect();
        assert_eq!(verdicts.last(), Some(&Verdict::Leak));
    }

    #[test]
    fn a_leak_of_one_byte_per_call_is_confirmed_on_the_third_batch() {
        let leak = |calls| vec![site(1, calls, calls)];
        let verdicts = run(&[leak(50), leak(125), leak(237)], Tolerance::default());
        assert_eq!(verdicts, [Verdict::Undecided, Verdict::Undecided, Verdict::Leak]);
    }

    #[test]
    fn a_cache_that_fills_once_is_clean_once_it_stops() {
        let cache = vec![site(7, 10, 4096)];
        assert_eq!(run(&[cache.clone(), cache], Tolerance::default()), [Verdict::Undecided, Verdict::Clean]);
        assert_eq!(run(&[vec![]], Tolerance::default()), [Verdict::Clean], "nothing live: clean at once");
    }

    #[test]
    fn a_buffer_that_only_grows_in_bytes_leaks() {
        // One realloc'd block whose size grows with the calls (a list that is appended to).
        let verdicts =
            run(&[vec![site(3, 1, 400)], vec![site(3, 1, 1000)], vec![site(3, 1, 1900)]], Tolerance::default());
        assert_eq!(verdicts.last(), Some(&Verdict::Leak));
    }

    #[test]
    fn intermittent_growth_restarts_the_streak() {
        let v = run(
            &[vec![site(1, 50, 50)], vec![site(1, 50, 50)], vec![site(1, 100, 100)], vec![site(1, 150, 150)]],
            Tolerance::default(),
        );
        assert_eq!(v, [Verdict::Undecided, Verdict::Clean, Verdict::Undecided, Verdict::Undecided]);
    }

    #[test]
    fn tolerance_excuses_small_growth_only() {
        let leak = |n| vec![site(1, n, n * 32)];
        let small = Tolerance { heap: 10_000, mmap: 0 };
        assert_eq!(run(&[leak(50), leak(100), leak(150)], small), [Verdict::Clean; 3]);
        let tight = Tolerance { heap: 1_000, mmap: 0 };
        assert_eq!(run(&[leak(50), leak(100), leak(150)], tight).last(), Some(&Verdict::Leak));
    }
}

#[cfg(test)]
mod judge_tests {
    use super::*;

    /// Growth of the named metrics per batch, batches of 50, 75, 112... calls (psleak's series).
    fn judge(batches: &[&[(Metric, i64)]], exact: bool) -> Vec<Verdict> {
        judge_with(batches, exact, HashMap::new(), 10)
    }

    fn judge_with(
        batches: &[&[(Metric, i64)]],
        exact: bool,
        tolerance: HashMap<Metric, u64>,
        retries: u32,
    ) -> Vec<Verdict> {
        let mut judge = Judge::new(tolerance, retries, 3);
        let mut calls = 50;
        batches
            .iter()
            .map(|growth| {
                let readings = Readings { calls, growth: growth.to_vec(), exact, sites: None };
                calls = calls * 3 / 2;
                judge.batch(&readings).verdict
            })
            .collect()
    }

    use Metric::*;
    use Verdict::{Clean, Leak, Undecided};

    #[test]
    fn a_byte_per_call_on_the_heap_is_a_leak_on_the_third_batch() {
        // malloc(1) keeps a 32 B chunk per call.
        let v = judge(&[&[(Heap, 50 * 32)], &[(Heap, 75 * 32)], &[(Heap, 112 * 32)]], true);
        assert_eq!(v, [Undecided, Undecided, Leak]);
    }

    #[test]
    fn a_python_object_per_call_is_a_leak_in_blocks_alone() {
        // pymalloc's objects never reach malloc: only the block count sees them.
        let v = judge(&[&[(PyBlocks, 50), (Heap, 0)], &[(PyBlocks, 75)], &[(PyBlocks, 112)]], true);
        assert_eq!(v, [Undecided, Undecided, Leak]);
    }

    #[test]
    fn an_mmap_without_munmap_is_a_leak_in_the_codes_mappings() {
        let page = 4096;
        let mmap = |calls: i64| [(Mapped, calls * page), (Vms, calls * page)];
        assert_eq!(judge(&[&mmap(50), &mmap(75), &mmap(112)], true), [Undecided, Undecided, Leak]);
        // vms's tolerance is theirs too, unless told otherwise (0.1.6 knew only vms).
        let tolerance = HashMap::from([(Vms, 1 << 30)]);
        assert_eq!(judge_with(&[&mmap(50), &mmap(75), &mmap(112)], true, tolerance, 10), [Clean; 3]);
    }

    #[test]
    fn a_heap_whose_top_moves_up_is_no_leak_in_the_codes_mappings() {
        // CI: a clean function's batches left glibc's heap (brk) 4, 8 and 8 KiB further up,
        // the allocator's bytes in use unchanged. Once vms was judged exact, that was a leak.
        let moved = |kib: i64| [(Heap, 0), (Mapped, 0), (Vms, kib << 10), (Uss, 12 << 10), (Rss, 12 << 10)];
        let v = judge(&[&moved(4), &moved(8), &moved(8), &moved(0)], true);
        assert!(!v.contains(&Leak), "{v:?}");
        assert_eq!(v.last(), Some(&Clean));
    }

    #[test]
    fn a_heap_top_that_moves_up_in_every_batch_leaves_a_clean_function_clean() {
        // CI, under load: a clean function's batches each moved glibc's heap top a few pages
        // further up while every exact counter stayed flat; the batches ran out, judged a leak.
        let moved = [(Heap, 0), (Mmap, 0), (Mapped, 0), (PyBlocks, 0), (Vms, 132 << 10), (Uss, 0), (Rss, 0)];
        assert_eq!(judge(&[&moved, &moved, &moved], true), [Clean; 3]);
        // Readings that may not be exact (a caller's own) keep vms as 0.1.6 judged it.
        assert_ne!(judge(&[&moved, &moved, &moved], false), [Clean; 3]);
    }

    #[test]
    fn nothing_grown_is_clean_at_once() {
        assert_eq!(judge(&[&[(Heap, 0), (PyBlocks, 0), (Mapped, 0), (Vms, 0), (Uss, 0), (Rss, 0)]], true), [Clean]);
    }

    #[test]
    fn a_cache_that_fills_once_is_clean_once_it_stops() {
        let v = judge(&[&[(Heap, 64 * 1024)], &[(Heap, 0)]], true);
        assert_eq!(v, [Undecided, Clean]);
    }

    #[test]
    fn a_bounded_cache_is_clean_once_full() {
        // 128 entries of 1 KiB: 50 fill in the first batch, 75 in the second, the last 3 in the
        // third (faded, not yet settled), none in the fourth.
        let v = judge(&[&[(Heap, 50 * 1024)], &[(Heap, 75 * 1024)], &[(Heap, 3 * 1024)], &[(Heap, 0)]], true);
        assert_eq!(v, [Undecided, Undecided, Undecided, Clean]);
    }

    #[test]
    fn a_block_per_batch_is_noise_not_a_leak() {
        // A free list one block longer after each batch, whatever its size: it does not keep up.
        let v = judge(&[&[(PyBlocks, 1), (Heap, 24)], &[(PyBlocks, 1), (Heap, 24)]], true);
        assert_eq!(v, [Clean, Clean]);
        // A kilobyte per batch keeps up with 50 calls, but its growth per call fades.
        let v = judge(&[&[(Heap, 1024)], &[(Heap, 1024)], &[(Heap, 1024)], &[(Heap, 1024)]], true);
        assert!(!v.contains(&Leak), "{v:?}");
    }

    #[test]
    fn a_leak_with_noise_on_top_is_not_taken_for_fading() {
        // 32 B a call, and once a few hundred bytes more (another allocation in that batch):
        // the next batch's 34 B a call is not a fade from 45.
        let v = judge(&[&[(Heap, 50 * 39)], &[(Heap, 75 * 45)], &[(Heap, 112 * 34)]], true);
        assert_eq!(v, [Undecided, Undecided, Leak]);
    }

    #[test]
    fn growth_that_stops_restarts_the_streak() {
        let leak = |calls: i64| [(Heap, calls * 32)];
        let v = judge(&[&leak(50), &leak(75), &[(Heap, 0)], &leak(168), &leak(252)], true);
        assert_eq!(v, [Undecided, Undecided, Clean, Undecided, Undecided]);
    }

    #[test]
    fn tolerance_excuses_growth_within_it() {
        let tolerance = HashMap::from([(Heap, 10_000)]);
        let leak = |calls: i64| [(Heap, calls * 32)];
        assert_eq!(judge_with(&[&leak(50), &leak(75), &leak(112)], true, tolerance.clone(), 10), [Clean, Clean, Clean]);
        let v = judge_with(&[&leak(500), &leak(750), &leak(1120)], true, tolerance, 10);
        assert_eq!(v.last(), Some(&Leak));
    }

    #[test]
    fn the_heaps_tolerance_covers_cpythons_blocks() {
        let tolerance = HashMap::from([(Heap, 16_000)]);
        let objects = |calls: i64| [(PyBlocks, calls)];
        assert_eq!(judge_with(&[&objects(50), &objects(75), &objects(112)], true, tolerance.clone(), 10), [Clean; 3]);
        let v = judge_with(&[&objects(5000), &objects(7500), &objects(11200)], true, tolerance, 10);
        assert_eq!(v.last(), Some(&Leak));
    }

    #[test]
    fn uss_is_a_second_opinion_that_must_fade() {
        // Pages touched for the first time grow uss; an exact counter at rest does not pass the
        // batch until they fade.
        let v = judge(&[&[(Heap, 0), (Uss, 40960)], &[(Heap, 0), (Uss, 8192)], &[(Heap, 0), (Uss, 4096)]], true);
        assert_eq!(v, [Undecided, Undecided, Clean]);
    }

    #[test]
    fn readings_not_known_exact_are_judged_as_psleak_0_1_6_did() {
        // A steady leak: never confirmed early, a leak when the batches run out (5 here).
        let steady = |calls: i64| [(Heap, calls * 96), (Uss, 0)];
        let mut steady_judge = Judge::new(HashMap::new(), 5, 3);
        let verdicts: Vec<Judged> = [50, 75, 112, 168, 252]
            .iter()
            .map(|&calls| {
                steady_judge.batch(&Readings {
                    calls,
                    growth: steady(calls as i64).to_vec(),
                    exact: false,
                    sites: None,
                })
            })
            .collect();
        assert_eq!(
            verdicts.iter().map(|j| j.verdict).collect::<Vec<_>>(),
            [Undecided, Undecided, Undecided, Undecided, Leak]
        );
        assert!(verdicts[4].exhausted);
        // The same kilobyte every batch fades and passes on the third.
        assert_eq!(judge(&[&[(Heap, 1024)], &[(Heap, 1024)], &[(Heap, 1024)]], false), [Undecided, Undecided, Clean]);
        // Blocks are not 0.1.6's metric: not judged at all.
        assert_eq!(judge(&[&[(PyBlocks, 1000)]], false), [Clean]);
    }

    #[test]
    fn batches_that_run_out_undecided_are_a_leak() {
        let noisy = |_| [(Uss, 1 << 20)];
        let v = judge_with(&[&noisy(0), &noisy(1)], true, HashMap::new(), 2);
        assert_eq!(v, [Undecided, Leak]);
    }

    #[test]
    fn with_other_threads_the_sites_judge_and_the_counters_are_ignored() {
        let mut judge = Judge::new(HashMap::new(), 10, 3);
        let batch = |judge: &mut Judge, heap: i64, sites| {
            judge
                .batch(&Readings { calls: 50, growth: vec![(Heap, heap), (Uss, 0)], exact: true, sites: Some(sites) })
                .verdict
        };
        // A thread freeing as the calls leak: the heap fell, the site grew, three times.
        let v: Vec<_> = [Undecided, Undecided, Leak].map(|sites| batch(&mut judge, -4096, sites)).to_vec();
        assert_eq!(v, [Undecided, Undecided, Leak]);
        // A thread allocating beside clean calls: the heap grew, no site did.
        let mut judge = Judge::new(HashMap::new(), 10, 3);
        assert_eq!(batch(&mut judge, 1 << 20, Clean), Clean);
    }

    #[test]
    fn a_counter_grown_with_no_site_named_says_what_the_probes_miss() {
        assert!(unnamed(&[PyBlocks]).contains("PYTHONMALLOC=malloc"));
        assert!(unnamed(&[Mapped]).contains("mappings made by no call"));
    }
}
