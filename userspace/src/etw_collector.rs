//! The private collector on Windows: ETW follows the test process ([`Followed`]), whose
//! requests (`protocol.rs`) come over the loopback socket it shared with us, and are answered
//! as on Linux ([`Answerer`]). Type-checked in CI, never run (see the README).
//!
//! ETW delivers events by the buffer, so before each answer the sessions are flushed and a
//! thread of ours, started and ended after the request came, marks how far the kernel session
//! has delivered; the heap session, which has no mark of ours, is then drained until quiet.

use std::collections::VecDeque;
use std::io::{self, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use windows_sys::Win32::System::Threading::GetCurrentThreadId;

use crate::answer::{failure, read_request, reply_line, Answerer};
use crate::etw_target::{Followed, Input};
use crate::poll;
use crate::protocol::{Reply, VERSION};
use crate::report::Lost;

/// How long a sync waits for its mark before answering anyway.
const SYNC_LIMIT: Duration = Duration::from_secs(2);
/// After the mark, the heap session is drained until it has been quiet this long.
const QUIET: Duration = Duration::from_millis(20);
/// How often the target's exit is checked while the client is quiet.
const EXIT_CHECK: Duration = Duration::from_millis(200);

type Request = io::Result<Option<String>>;

/// Follows `pid` and serves `stream` until the client hangs up or the target exits. The first
/// line sent is the outcome of the attach: ready, or the error that prevented it.
pub fn serve(stream: TcpStream, pid: u32) -> Result<(), String> {
    let mut out = stream.try_clone().map_err(|e| format!("cannot use the client socket: {e}"))?;
    let refuse = |out: &mut TcpStream, why: String| {
        let _ = out.write_all(failure(why.clone()).as_bytes());
        Err(why)
    };
    if !poll::is_running(pid) {
        return refuse(&mut out, format!("no running process has pid {pid}"));
    }
    let (mut followed, failed) = Followed::start(pid);
    if let Some(e) = failed {
        return refuse(&mut out, e.to_string());
    }
    let ready = json!({
        "version": VERSION,
        "pid": pid,
        "backend": "ETW",
        "probes": followed.providers(),
        "handles_unavailable": followed.handles_unavailable(),
    });
    out.write_all(reply_line(&Reply { ok: true, body: ready }).as_bytes()).map_err(client_gone)?;

    let send = followed.requests();
    std::thread::spawn(move || {
        let mut requests = BufReader::new(stream);
        loop {
            let request = read_request(&mut requests);
            let more =
                matches!(&request, Ok(Some(_))) || matches!(&request, Err(e) if e.kind() == io::ErrorKind::InvalidData);
            if !send(request) || !more {
                return;
            }
        }
    });

    let mut answerer = Answerer::new();
    let mut pending: VecDeque<Request> = VecDeque::new();
    loop {
        let request = match pending.pop_front() {
            Some(request) => request,
            None => match followed.next(EXIT_CHECK) {
                Some(Input::Request(request)) => request,
                Some(_) => continue,
                None if poll::is_running(pid) => continue,
                None => return Ok(()), // the target exited: nobody is left to ask
            },
        };
        let line = match request {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()), // the client hung up
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                out.write_all(failure(e.to_string()).as_bytes()).map_err(client_gone)?;
                continue;
            }
            Err(e) => return Err(client_gone(e)),
        };
        sync(&mut followed, &mut pending);
        let (ledger, mut sites) = followed.ledger_and_sites();
        let reply = answerer.handle(&line, ledger, &mut sites, Lost::default());
        out.write_all(reply.as_bytes()).map_err(client_gone)?;
        if answerer.detached {
            return Ok(());
        }
    }
}

/// Brings the ledger up to now: what the target did before asking sits in the sessions' buffers.
fn sync(followed: &mut Followed, pending: &mut VecDeque<Request>) {
    // SAFETY: GetCurrentThreadId has no preconditions.
    let Ok(mark) = std::thread::spawn(|| unsafe { GetCurrentThreadId() }).join() else {
        return;
    };
    if let Err(why) = followed.flush() {
        eprintln!("psleak collector: {why}");
        return;
    }
    let deadline = Instant::now() + SYNC_LIMIT;
    let mut marked = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match followed.next(if marked { QUIET } else { left }) {
            Some(Input::OwnThread { tid }) if tid == mark => marked = true,
            Some(Input::Request(request)) => pending.push_back(request),
            Some(_) => {}
            None if marked => return,
            None => {}
        }
    }
    if !marked {
        eprintln!(
            "psleak collector: the kernel session did not deliver within {SYNC_LIMIT:?}; answering with what came"
        );
    }
}

fn client_gone(e: io::Error) -> String {
    format!("the client went away: {e}")
}
