//! The collector protocol: JSON lines over a Unix socket, one request, one reply. A test
//! process speaks it to a private collector it started, and (issue 5) to a shared daemon.

use serde::{Deserialize, Serialize};

use crate::ledger::Mark;
use crate::verdict::Tolerance;

pub const VERSION: u32 = 1;

/// Longest request line accepted; longer ones are answered with an error and skipped.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Hello {
        version: u32,
    },
    /// The current point of the target's event stream.
    Mark,
    /// Fds and threads created since the mark and still open or alive.
    Created {
        since: Mark,
    },
    /// Starts a series of batches judged together (one memory check).
    Begin,
    /// Starts a batch of the series: what is created from now on is the batch's.
    Window {
        measurement: u64,
    },
    /// Ends the batch: the verdict so far and the sites that grew.
    Batch {
        measurement: u64,
        /// How many calls the batch made.
        calls: u64,
        #[serde(default)]
        tolerance: Tolerance,
        /// Batches a site must grow in, in a row, to be a leak.
        confirm: u32,
        /// How many growing sites to describe.
        #[serde(default = "default_top")]
        top: usize,
    },
    End {
        measurement: u64,
    },
}

fn default_top() -> usize {
    5
}

/// A reply: `{"ok": true, ...}` with the answer's fields, or `{"ok": false, "error": "..."}`.
#[derive(Debug, Serialize)]
pub struct Reply<T: Serialize> {
    pub ok: bool,
    #[serde(flatten)]
    pub body: T,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub error: String,
}
