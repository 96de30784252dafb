//! What a session could not account for: events the kernel dropped or the ledger could not keep.

use serde::Serialize;

/// What a session could not account for. Any of it but `no_stack` leaves the ledger incomplete.
#[derive(Debug, Serialize, Default, Clone, Copy, PartialEq, Eq)]
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

    /// ` (LOST: ...)`, naming each kind of loss there is; empty when nothing was lost.
    pub fn describe(&self) -> String {
        let kinds = [
            (self.ring_full, "events dropped in a full ring (raise --ring-mib)"),
            (self.untracked_calls, "allocator calls whose result was missed"),
            (self.ledger_full, "blocks past the ledger's limit (raise --max-live)"),
            (self.corrupt, "corrupt records"),
            (self.no_stack, "events without a stack"),
        ];
        let told: Vec<String> = kinds.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
        if told.is_empty() {
            String::new()
        } else {
            format!(" (LOST: {})", told.join(", "))
        }
    }
}
