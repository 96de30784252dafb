//! The collector protocol: JSON lines over a Unix socket, one request, one reply
//! (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`), at most `MAX_REQUEST_BYTES` a line.
//!
//! A private collector (started by the test process on a socketpair) attaches at once and
//! sends its ready line first. A `psleak daemon` connection starts with an [`Opening`]:
//! `{"op":"attach","pid":P,"version":1}` (with `"allocators":"python"` or `"none"` to leave
//! allocator families unprobed whose events the client does not need), answered by the same
//! ready line (or a refusal), or `{"op":"status"}`; an attach may also carry `stack_bytes`,
//! `python_frames` and `final_report` (what `psleak trace` through the daemon asks for). From
//! the ready line on both speak [`Request`]: `hello` (the version handshake), `mark`, `created`
//! (fds and threads since a mark), `begin`/`window`/`batch`/`end` (memory that grew, batch by
//! batch, by site), `report` (what `psleak trace` shows: everything live since attach) and
//! `detach`; hanging up detaches too. One line comes unasked, to a tracer only: [`Over`], when
//! its target came to run as someone it may not trace.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::ledger::Mark;
use crate::model::lost::Lost;
use crate::model::verdict::{Tolerance, Verdict};
use crate::report::{GrowingSite, LiveTotals, Report, Resources, Sited, SortKey, StoppedBy};

/// The protocol's version, which `hello` and `attach` carry (the Python package reads it from here).
pub const VERSION: u32 = 1;

/// Where the daemon listens, and where the Python package looks, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/psleak.sock";

/// Longest request line accepted; longer ones are answered with an error and skipped.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The first request on a daemon connection.
#[cfg(target_os = "linux")]
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Opening {
    /// Trace `pid` for the rest of the connection.
    Attach {
        pid: u32,
        version: u32,
        #[serde(default)]
        allocators: psleak_ebpf::Allocators,
        /// Bytes of each creation's stack copied (`psleak_ebpf::check_stack_bytes`); the
        /// daemon's own setting if left out.
        #[serde(default)]
        stack_bytes: Option<u32>,
        /// Whether the Python stack of each creation is read (the daemon's setting if left out).
        #[serde(default)]
        python_frames: Option<bool>,
        /// The client traces another process (`psleak trace`): it is served `report`, and when
        /// the target exits the session waits for it to ask for the last one.
        #[serde(default)]
        final_report: bool,
    },
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
    /// What `psleak trace` shows now: the memory, fds and threads created since attach and
    /// still live, by site (to a session attached with `final_report`). A report with `stopped_by` (or made once the target has exited) is
    /// the session's last: it ends once answered.
    Report {
        /// How many memory sites, at most `MAX_REPORT_SITES`.
        #[serde(default = "default_report_top")]
        top: usize,
        #[serde(default)]
        sort: SortKey,
        #[serde(default)]
        min_size: u64,
        #[serde(default)]
        max_size: Option<u64>,
        /// Memory younger than this is left out.
        #[serde(default)]
        min_age_ms: u64,
        /// The report as text too (`text`), coloured if `colour`.
        #[serde(default)]
        text: bool,
        #[serde(default)]
        colour: bool,
        #[serde(default)]
        stopped_by: Option<StoppedBy>,
    },
    /// Ends the session once answered: the probes are detached (as when the client hangs up).
    Detach,
}

fn default_top() -> usize {
    5
}

fn default_report_top() -> usize {
    crate::report::DEFAULT_TOP
}

/// The most memory sites a report describes: each costs its stack's symbols, and a client
/// must not make a report unbounded.
pub const MAX_REPORT_SITES: usize = 1000;

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

/// What a session sends first, with the same fields from every backend: what it attached.
#[derive(Debug, Serialize)]
pub struct Ready {
    pub version: u32,
    pub pid: u32,
    /// `eBPF` or `ETW`.
    pub backend: &'static str,
    /// Probes (eBPF) or providers (ETW) attached.
    pub probes: usize,
    /// The allocator families probed (`all`, `python`, `none`); ETW follows every heap.
    pub allocators: &'static str,
    /// The C library and libpython the probes went into (eBPF).
    pub libc: Option<PathBuf>,
    pub python: Option<PathBuf>,
    /// What the backend could not be given (ETW: handle events, stacks), and why.
    pub missing: Vec<String>,
}

/// The answer to a [`Request`]: the fields of its `{"ok": true, ...}` reply.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Hello {
        version: u32,
    },
    Mark {
        mark: Mark,
        lost: Lost,
    },
    Created {
        #[serde(flatten)]
        resources: Resources,
        lost: Lost,
    },
    Begun {
        measurement: u64,
    },
    Batch(Box<Batch>),
    Report {
        report: Box<Report>,
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// `window`, `end` and `detach`, which only say they were done.
    Done {},
}

/// What the daemon tells a tracer unasked, between replies, once its target runs as someone
/// it may not trace (a setuid program): its session is over, and its next `report` is the last,
/// which shows nothing of the target. `why` is for the tracer's user.
#[derive(Debug, Serialize, Deserialize)]
pub struct Over {
    pub over: StoppedBy,
    pub why: String,
}

/// The answer to `batch`: the verdict so far, and the sites that grew.
#[derive(Debug, Serialize)]
pub struct Batch {
    pub mark: Mark,
    pub verdict: Verdict,
    /// How many sites grew (`sites` describes the first `top`).
    pub growing_sites: usize,
    pub sites: Vec<Sited<GrowingSite>>,
    pub live: LiveTotals,
    pub lost: Lost,
    /// What the batch's verdict misses: nonzero means it cannot be trusted.
    pub lost_in_batch: Lost,
}

/// The answer to a daemon's `status`: its own state, and the sessions the client may see (all
/// of them, and the daemon's fds and connections, for root).
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: u32,
    pub daemon_pid: u32,
    pub uptime_seconds: f64,
    pub resident_bytes: u64,
    pub sessions: Vec<SessionStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_fds: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct SessionStatus {
    pub id: u64,
    pub uid: u32,
    /// The client's process, and the target's.
    pub client_pid: u32,
    pub pid: u32,
    pub seconds: f64,
    pub events: u64,
    pub events_per_second: f64,
    pub lost: Lost,
}

/// Splits a byte stream into request lines, holding at most `MAX_REQUEST_BYTES` of a line: a
/// longer one is skipped to its end and refused, however much of it a client sends.
#[derive(Debug, Default)]
pub struct Lines {
    line: Vec<u8>,
    /// The line under way is too long: its bytes are dropped until its newline.
    skipping: bool,
}

/// One line read from a client: a request, or why it was refused.
pub type Line = Result<String, String>;

impl Lines {
    /// Takes bytes of `input` up to and including the first newline (all of it if none): how
    /// many it took, and the line that newline ended.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Line>) {
        let (taken, ended) = match input.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (input.len(), false),
        };
        let bytes = &input[..taken - usize::from(ended)];
        if !self.skipping {
            if self.line.len() + bytes.len() > MAX_REQUEST_BYTES {
                self.skipping = true;
                self.line = Vec::new();
            } else {
                self.line.extend_from_slice(bytes);
            }
        }
        if !ended {
            return (taken, None);
        }
        if std::mem::take(&mut self.skipping) {
            return (taken, Some(Err(format!("request longer than {MAX_REQUEST_BYTES} bytes refused"))));
        }
        let line = std::mem::take(&mut self.line);
        (taken, Some(String::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())))
    }

    /// Whether a line has begun and not ended.
    pub fn in_line(&self) -> bool {
        self.skipping || !self.line.is_empty()
    }
}

/// What a [`RequestReader`] has for its caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Line(Line),
    /// Nothing whole yet: the client has not sent more.
    Pending,
    /// The client hung up (mid-line, if it was in one).
    Closed,
}

/// Reads request lines from a non-blocking source, a chunk at a time: what it holds is bounded
/// (a line's cap and one chunk), however fast and however much a client sends.
#[derive(Debug)]
pub struct RequestReader {
    lines: Lines,
    chunk: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for RequestReader {
    fn default() -> Self {
        Self { lines: Lines::default(), chunk: vec![0; 4096].into_boxed_slice(), start: 0, end: 0 }
    }
}

/// Chunks read at most per `RequestReader::next`: a client that sends without end must not keep
/// its reader from everything else (the daemon's loop, a session's stop and ring).
const CHUNKS_PER_TURN: usize = 16;

impl RequestReader {
    /// The next line, reading with `read` (a non-blocking read) only when what was read before
    /// holds no more; `Pending` too after `CHUNKS_PER_TURN` reads without a line's end.
    pub fn next(&mut self, mut read: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Next> {
        let mut reads = 0;
        loop {
            if self.start < self.end {
                let (taken, line) = self.lines.feed(&self.chunk[self.start..self.end]);
                self.start += taken;
                if let Some(line) = line {
                    return Ok(Next::Line(line));
                }
                continue;
            }
            if reads == CHUNKS_PER_TURN {
                return Ok(Next::Pending);
            }
            reads += 1;
            match read(&mut self.chunk) {
                Ok(0) => return Ok(Next::Closed),
                Ok(n) => (self.start, self.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether bytes already read wait to be looked at (they may hold a whole line).
    pub fn has_unread(&self) -> bool {
        self.start < self.end
    }

    /// Whether a line has begun and not ended.
    pub fn in_line(&self) -> bool {
        self.lines.in_line()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `piece` bytes; the lines that come out.
    fn lines_of(input: &[u8], piece: usize) -> Vec<Line> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (taken, line) = lines.feed(rest);
                rest = &rest[taken..];
                out.extend(line);
            }
        }
        out
    }

    #[test]
    fn lines_come_whole_whatever_the_pieces() {
        let input = b"{\"op\":\"mark\"}\n\n{\"op\":\"detach\"}\n";
        for piece in [1, 3, 100] {
            let expected: Vec<Line> =
                vec![Ok(r#"{"op":"mark"}"#.into()), Ok(String::new()), Ok(r#"{"op":"detach"}"#.into())];
            assert_eq!(lines_of(input, piece), expected, "in pieces of {piece}");
        }
    }

    #[test]
    fn a_line_past_the_cap_is_refused_and_never_held() {
        let mut lines = Lines::default();
        let huge = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            assert_eq!(lines.feed(&huge), (huge.len(), None));
            assert!(lines.line.capacity() <= MAX_REQUEST_BYTES, "holds at most the cap");
        }
        let (_, line) = lines.feed(b"x\n");
        assert!(line.unwrap().unwrap_err().contains("longer than"));
        assert_eq!(lines.feed(b"ok\n").1, Some(Ok("ok".into())), "the next line is read");
        let at_cap = [vec![b'y'; MAX_REQUEST_BYTES], b"\n".to_vec()].concat();
        assert!(lines_of(&at_cap, 4096)[0].is_ok(), "a line of exactly the cap is taken");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused() {
        assert_eq!(lines_of(b"\xff\xfe\n", 1), vec![Err("request is not UTF-8".to_string())]);
    }

    #[test]
    fn the_reader_says_pending_closed_and_in_line() {
        let mut reader = RequestReader::default();
        let mut script: Vec<io::Result<&[u8]>> = vec![
            Ok(b"{\"op\""),
            Err(io::ErrorKind::WouldBlock.into()),
            Ok(b":1}\nnext"),
            Err(io::ErrorKind::WouldBlock.into()),
            Ok(b""),
        ];
        script.reverse();
        let mut read = |buf: &mut [u8]| {
            script.pop().unwrap().map(|bytes| {
                buf[..bytes.len()].copy_from_slice(bytes);
                bytes.len()
            })
        };
        assert_eq!(reader.next(&mut read).unwrap(), Next::Pending);
        assert!(reader.in_line());
        assert_eq!(reader.next(&mut read).unwrap(), Next::Line(Ok(r#"{"op":1}"#.into())));
        assert!(reader.has_unread());
        assert_eq!(reader.next(&mut read).unwrap(), Next::Pending);
        assert_eq!(reader.next(&mut read).unwrap(), Next::Closed);
    }

    #[test]
    fn a_client_that_sends_without_end_gets_its_reader_back_to_its_caller() {
        let mut reader = RequestReader::default();
        let mut reads = 0;
        let endless = |buf: &mut [u8]| {
            reads += 1;
            buf.fill(b'x');
            Ok(buf.len())
        };
        assert_eq!(reader.next(endless).unwrap(), Next::Pending);
        assert_eq!(reads, CHUNKS_PER_TURN);
    }
}
