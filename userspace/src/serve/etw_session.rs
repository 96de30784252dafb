//! The private collector on Windows: ETW follows the test process ([`Follow`]), whose requests
//! (`protocol.rs`) come over the loopback socket it shared with us, and are answered as on
//! Linux ([`Answerer`]). The loop is plain Rust, tested on Linux with a scripted follower; the
//! ETW follower (`backends::etw::target`) and [`serve`] are Windows-only and never run (see the README).
//!
//! ETW delivers events by the buffer, so before each answer the follower sets a mark (a
//! thread of ours, started and ended after the request came) and flushes its sessions; the
//! answer waits for the mark to come through the kernel session, then drains the heap session,
//! which has no mark of ours, until it is quiet.

use std::collections::VecDeque;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::backends::etw::follow::{Follow, Input, Request};
use crate::error::Error;
use crate::model::lost::Lost;
use crate::serve::answer::{failure, read_request, reply_line, Answerer, Moment};
use crate::serve::protocol::{Ready, Reply};

/// How long a sync waits for its mark before answering anyway.
const SYNC_LIMIT: Duration = Duration::from_secs(2);
/// After the mark, the heap session is drained until it has been quiet this long.
const QUIET: Duration = Duration::from_millis(20);
/// How often the target's exit is checked while the client is quiet.
const EXIT_CHECK: Duration = Duration::from_millis(200);

/// Follows `pid` through ETW and serves `stream` (see [`serve_followed`]).
#[cfg(windows)]
pub fn serve(stream: TcpStream, pid: u32) -> Result<(), Error> {
    use crate::backends::etw::target::Followed;
    if !crate::backends::poll::is_running(pid) {
        return refuse(&stream, Error::NoSuchProcess(pid));
    }
    let (mut followed, failed) = Followed::start(pid);
    if let Some(e) = failed {
        return refuse(&stream, Error::Refused(e.to_string()));
    }
    let ready = Ready {
        version: crate::serve::protocol::VERSION,
        pid,
        backend: "ETW",
        probes: followed.providers(),
        allocators: "all",
        libc: None,
        python: None,
        missing: followed.missing().to_vec(),
    };
    serve_followed(stream, &mut followed, &ready)
}

/// Tells the client why it will not be served.
#[cfg(windows)]
fn refuse(mut out: &TcpStream, why: Error) -> Result<(), Error> {
    let _ = out.write_all(failure(why.to_string()).as_bytes());
    Err(why)
}

/// Sends `ready`, then answers `stream`'s requests until the client hangs up or detaches, or
/// the target exits.
pub fn serve_followed(stream: TcpStream, followed: &mut impl Follow, ready: &Ready) -> Result<(), Error> {
    let mut out = stream.try_clone().map_err(|e| Error::Io("cannot use the client socket".into(), e))?;
    out.write_all(reply_line(&Reply { ok: true, body: ready }).as_bytes()).map_err(client_gone)?;
    let send = followed.requests();
    std::thread::spawn(move || {
        let mut requests = BufReader::new(stream);
        loop {
            let request = read_request(&mut requests);
            let more = match &request {
                Ok(line) => line.is_some(),
                Err(e) => e.kind() == io::ErrorKind::InvalidData, // refused, and the next line read
            };
            if !send(request) || !more {
                return;
            }
        }
    });

    let served = answer_requests(followed, &mut out);
    // Also ends the reader thread, blocked on the socket.
    let _ = out.shutdown(Shutdown::Both);
    served
}

fn answer_requests(followed: &mut impl Follow, out: &mut TcpStream) -> Result<(), Error> {
    let mut answerer = Answerer::new(None);
    let mut pending = VecDeque::new();
    loop {
        let request = match pending.pop_front() {
            Some(request) => request,
            None => match followed.next(EXIT_CHECK) {
                Some(Input::Request(request)) => request,
                Some(_) => continue,
                None if followed.is_running() => continue,
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
        sync(followed, &mut pending);
        let (ledger, mut sites) = followed.ledger_and_sites();
        // No reports here: `psleak trace` on Windows runs ETW itself.
        let reply = answerer.handle(&line, ledger, &mut sites, &Moment::without_reports(Lost::default()));
        out.write_all(reply.as_bytes()).map_err(client_gone)?;
        if answerer.detached {
            return Ok(());
        }
    }
}

/// Brings the ledger up to now: what the target did before asking sits in the sessions' buffers.
fn sync(followed: &mut impl Follow, pending: &mut VecDeque<Request>) {
    let mark = match followed.mark() {
        Ok(mark) => mark,
        Err(why) => return eprintln!("psleak collector: {why}"),
    };
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
            "psleak collector: the sessions did not deliver the mark within {SYNC_LIMIT:?}; answering with what came"
        );
    }
}

fn client_gone(e: io::Error) -> Error {
    Error::Io("the client went away".into(), e)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::sync::{Arc, Mutex};
    use std::thread;

    use psleak_etw::records::Record;
    use serde_json::Value;

    use super::*;
    use crate::backends::etw::translate::tests::handle;
    use crate::backends::etw::translate::{Sites, Translation};
    use crate::model::ledger::Ledger;
    use crate::sites::frame::{Addresses, Symbolize};

    /// Follows a pretend target the way ETW does (Windows cannot run here): records "logged"
    /// by the test sit in `buffered` until a flush, as in a session's buffers, and the mark
    /// comes through after them.
    struct Scripted {
        ledger: Ledger,
        translation: Translation,
        buffered: Arc<Mutex<Vec<Record>>>,
        running: Arc<AtomicBool>,
        inputs: Receiver<Option<Record>>,
        requests: Sender<Option<Record>>,
        pending_requests: Arc<Mutex<VecDeque<Request>>>,
        marks: u32,
        symbols: Addresses,
    }

    impl Follow for Scripted {
        fn requests(&self) -> Box<dyn Fn(Request) -> bool + Send> {
            let (wake, queue) = (self.requests.clone(), self.pending_requests.clone());
            Box::new(move |request| {
                queue.lock().unwrap().push_back(request);
                wake.send(None).is_ok()
            })
        }

        fn next(&mut self, timeout: Duration) -> Option<Input> {
            match self.inputs.recv_timeout(timeout).ok()? {
                Some(Record::ThreadEnd { tid, .. }) if tid >= 1000 => Some(Input::OwnThread { tid }),
                Some(record) => {
                    for event in self.translation.events(&record, 1, 7, &[0x7ff9_0000_3000]) {
                        self.ledger.apply(&event);
                    }
                    Some(Input::Applied)
                }
                None => Some(Input::Request(self.pending_requests.lock().unwrap().pop_front()?)),
            }
        }

        fn mark(&mut self) -> Result<u32, Error> {
            self.marks += 1;
            let mark = 1000 + self.marks;
            let sender = self.requests.clone();
            let flushed: Vec<Record> = std::mem::take(&mut *self.buffered.lock().unwrap());
            // Delivered a little later, from another thread, as ETW's consumer thread does.
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(30));
                for record in flushed {
                    sender.send(Some(record)).unwrap();
                }
                sender.send(Some(Record::ThreadEnd { pid: 1, tid: mark })).unwrap();
            });
            Ok(mark)
        }

        fn is_running(&self) -> bool {
            self.running.load(Ordering::SeqCst)
        }

        fn ledger_and_sites(&mut self) -> (&Ledger, Sites<'_, dyn Symbolize>) {
            (&self.ledger, Sites { translation: &self.translation, symbols: &mut self.symbols })
        }
    }

    struct Client {
        out: TcpStream,
        replies: BufReader<TcpStream>,
    }

    impl Client {
        fn ask(&mut self, request: &str) -> Value {
            self.out.write_all(format!("{request}\n").as_bytes()).unwrap();
            self.reply()
        }

        fn reply(&mut self) -> Value {
            let mut line = String::new();
            self.replies.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap_or(Value::Null)
        }
    }

    /// The test's ends of a session: the client, the target's buffered records and its life,
    /// and the collector's outcome.
    struct Session {
        client: Client,
        buffered: Arc<Mutex<Vec<Record>>>,
        running: Arc<AtomicBool>,
        collector: thread::JoinHandle<Result<(), Error>>,
    }

    /// A collector serving a scripted target over a loopback pair, as the Python package
    /// connects to it on Windows.
    fn start() -> Session {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let theirs = listener.accept().unwrap().0;
        let (buffered, running) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(true)));
        let (requests, inputs) = mpsc::channel();
        let mut scripted = Scripted {
            ledger: Ledger::new(),
            translation: Translation::new(),
            buffered: buffered.clone(),
            running: running.clone(),
            inputs,
            requests,
            pending_requests: Arc::default(),
            marks: 0,
            symbols: Addresses,
        };
        let ready = Ready {
            version: crate::serve::protocol::VERSION,
            pid: 1,
            backend: "ETW",
            probes: 2,
            allocators: "all",
            libc: None,
            python: None,
            missing: vec![],
        };
        let collector = thread::spawn(move || serve_followed(theirs, &mut scripted, &ready));
        let client = Client { replies: BufReader::new(ours.try_clone().unwrap()), out: ours };
        Session { client, buffered, running, collector }
    }

    #[test]
    fn an_answer_waits_for_what_the_sessions_still_held() {
        let Session { mut client, buffered, collector, .. } = start();
        assert_eq!(client.reply()["backend"], "ETW", "the ready line comes first");
        let mark = client.ask(r#"{"op":"mark"}"#)["mark"].clone();
        // The call under test opens a handle: ETW has it in a buffer, not yet delivered.
        buffered.lock().unwrap().push(handle(32, 0x1a4, ""));
        let created = client.ask(&format!(r#"{{"op":"created","since":{mark}}}"#));
        assert_eq!(created["handles"][0]["handle"], 0x1a4, "{created}");
        // A bad line is refused and the session goes on; detaching ends it.
        assert!(client.ask("not json")["error"].as_str().unwrap().starts_with("bad request"));
        assert_eq!(client.ask(r#"{"op":"detach"}"#)["ok"], true);
        collector.join().unwrap().unwrap();
    }

    #[test]
    fn the_session_ends_when_the_client_hangs_up_or_the_target_exits() {
        let Session { mut client, collector, .. } = start();
        client.reply();
        drop(client);
        collector.join().unwrap().unwrap();

        let Session { mut client, running, collector, .. } = start();
        client.reply();
        running.store(false, Ordering::SeqCst);
        collector.join().unwrap().unwrap();
        assert_eq!(client.reply(), Value::Null, "the collector closed the connection");
    }
}
