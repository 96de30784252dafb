//! The exact memory verdict: psleak's batches of calls, judged on live allocations per
//! creation site instead of process-wide counters. A site whose live count or bytes keep
//! growing batch after batch leaks; one that grows once (a cache filling) and stops does not.
//!
//! Growth must also keep up with the calls: at least a byte, or a block every other call, on
//! average. The interpreter's free lists fill a block at a time whatever the batch size (a
//! dict per batch of a hundred calls), and a real leak, however small, grows with every call.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ledger::{Mark, Memory, SiteId, SiteTotals};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Domain;

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
