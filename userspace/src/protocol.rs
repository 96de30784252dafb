//! The collector protocol: JSON lines over a Unix socket, one request, one reply
//! (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`), at most `MAX_REQUEST_BYTES` a line.
//!
//! A private collector (started by the test process on a socketpair) attaches at once and
//! sends its ready line first. A `psleak daemon` connection starts with an [`Opening`]:
//! `{"op":"attach","pid":P,"version":1}`, answered by the same ready line (or a refusal), or
//! `{"op":"status"}`. From the ready line on both speak [`Request`]: `hello` (the version
//! handshake), `mark`, `created` (fds and threads since a mark), `begin`/`window`/`batch`/`end`
//! (memory that grew, batch by batch, by site) and `detach`; hanging up detaches too.

use serde::{Deserialize, Serialize};

use crate::ledger::Mark;
use crate::verdict::Tolerance;

pub const VERSION: u32 = 1;

/// Longest request line accepted; longer ones are answered with an error and skipped.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The first request on a daemon connection.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Opening {
    /// Trace `pid` for the rest of the connection.
    Attach { pid: u32, version: u32 },
    /// The sessions this client may see, and the daemon's own state.
    Status,
}

/// A request within a session.
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
    /// Ends the session once answered: the probes are detached (as when the client hangs up).
    Detach,
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
