//! What a session could not account for: events the kernel dropped or the ledger could not keep.

use serde::{Deserialize, Serialize};

/// What a session could not account for. Any of it but `no_stack` leaves the ledger incomplete.
#[derive(Debug, Serialize, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(default)]
pub struct Lost {
    /// Events dropped in the kernel because the ring was full.
    pub ring_full: u64,
    /// Events without a stack (stack map full, or no walkable stack).
    pub no_stack: u64,
    /// Allocator calls whose result was not seen (their return was missed).
    pub untracked_calls: u64,
    /// Blocks and mappings not kept because the ledger was at its limit (--max-live).
    pub ledger_full: u64,
    /// Records that could not be decoded.
    pub corrupt: u64,
}

impl Lost {
    /// Events that are missing from the ledger.
    pub fn incomplete(&self) -> u64 {
        self.ring_full + self.untracked_calls + self.ledger_full + self.corrupt
    }

    /// What was lost since `before`.
    pub fn since(&self, before: &Lost) -> Lost {
        Lost {
            ring_full: self.ring_full.saturating_sub(before.ring_full),
            no_stack: self.no_stack.saturating_sub(before.no_stack),
            untracked_calls: self.untracked_calls.saturating_sub(before.untracked_calls),
            ledger_full: self.ledger_full.saturating_sub(before.ledger_full),
            corrupt: self.corrupt.saturating_sub(before.corrupt),
        }
    }

    /// Each kind of loss: how many, what they are, whether they leave the ledger incomplete
    /// (events without a stack only cost a site its name), and what `psleak trace` can do.
    fn kinds(&self) -> [(u64, &'static str, bool, &'static str); 5] {
        [
            (self.ring_full, "events dropped in a full ring", true, " (raise --ring-mib)"),
            (self.untracked_calls, "allocator calls whose result was missed", true, ""),
            (self.ledger_full, "blocks past the ledger's limit", true, " (raise --max-live)"),
            (self.corrupt, "corrupt records", true, ""),
            (self.no_stack, "events without a stack", false, ""),
        ]
    }

    /// ` (LOST: ...)`, naming each kind of loss there is, and what to raise; empty when
    /// nothing was lost (`psleak trace`'s reports, the daemon's log).
    pub fn describe(&self) -> String {
        let told: Vec<String> = self
            .kinds()
            .iter()
            .filter(|(n, ..)| *n > 0)
            .map(|(n, what, _, advice)| format!("{n} {what}{advice}"))
            .collect();
        if told.is_empty() {
            String::new()
        } else {
            format!(" (LOST: {})", told.join(", "))
        }
    }

    /// `3 events dropped in a full ring, 1 corrupt records`: what leaves the ledger incomplete,
    /// empty when nothing does (the Python package's warnings and errors).
    pub fn incomplete_text(&self) -> String {
        let told = self.kinds().into_iter().filter(|&(n, _, incomplete, _)| n > 0 && incomplete);
        told.map(|(n, what, ..)| format!("{n} {what}")).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_told_with_advice_for_the_tracer_and_without_a_stacks_for_the_package() {
        let lost = Lost { ring_full: 3, no_stack: 2, corrupt: 1, ..Lost::default() };
        assert_eq!(
            lost.describe(),
            " (LOST: 3 events dropped in a full ring (raise --ring-mib), 1 corrupt records, 2 events without a stack)"
        );
        assert_eq!(lost.incomplete_text(), "3 events dropped in a full ring, 1 corrupt records");
        assert_eq!(Lost { no_stack: 5, ..Lost::default() }.incomplete_text(), "", "a missing stack costs a name only");
        assert_eq!(Lost::default().describe(), "");
    }
}
