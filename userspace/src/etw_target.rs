//! One process followed through ETW (Windows only): the sessions of `psleak-etw`, the ledger
//! their events feed through [`Translation`], and the process's symbols. Used by `psleak trace`
//! and by the collector that serves the Python package. Type-checked in CI, never run (see
//! the README); what it is made of is tested on Linux (`etw`, `answer`, `report`).

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use psleak_etw::records::Record;
use psleak_etw::session::{Observed, Sessions, StartError};

use crate::dbghelp::Dbghelp;
use crate::etw::{Addresses, Sites, Symbolize, Translation};
use crate::ledger::Ledger;

/// What [`Followed::next`] brings.
pub enum Input {
    /// An event of the target, now in the ledger.
    Applied,
    /// A thread of this process started or ended (the collector's sync marks).
    OwnThread { tid: u32 },
    /// A request line from the client, or its end (collector sessions).
    Request(io::Result<Option<String>>),
}

enum Message {
    Observed(Observed),
    Request(io::Result<Option<String>>),
}

pub struct Followed {
    pub pid: u32,
    ledger: Ledger,
    translation: Translation,
    symbols: Box<dyn Symbolize>,
    sessions: Option<Sessions>,
    messages: Receiver<Message>,
    sender: Sender<Message>,
}

impl Followed {
    /// Starts the ETW sessions on `pid`. Without them (no administrator) the ledger stays
    /// empty, and the reason is returned beside.
    pub fn start(pid: u32) -> (Self, Option<StartError>) {
        let (sender, messages) = mpsc::channel();
        let sink = sender.clone();
        let (sessions, failure) = match Sessions::start(pid, move |o| {
            let _ = sink.send(Message::Observed(o));
        }) {
            Ok(sessions) => (Some(sessions), None),
            Err(e) => (None, Some(e)),
        };
        let symbols: Box<dyn Symbolize> = match Dbghelp::open(pid) {
            Some(dbghelp) => Box::new(dbghelp),
            None => Box::new(Addresses),
        };
        let followed =
            Self { pid, ledger: Ledger::new(), translation: Translation::new(), symbols, sessions, messages, sender };
        (followed, failure)
    }

    /// How many providers deliver events: thread, VirtualAlloc, handles, heap.
    pub fn providers(&self) -> usize {
        self.sessions.as_ref().map_or(0, Sessions::providers)
    }

    /// Why handle events are missing, if they are.
    pub fn handles_unavailable(&self) -> Option<&str> {
        self.sessions.as_ref().and_then(|s| s.handles_unavailable.as_deref())
    }

    /// Where a reader thread sends the client's request lines.
    pub fn requests(&self) -> impl Fn(io::Result<Option<String>>) -> bool + Send + 'static {
        let sender = self.sender.clone();
        move |request| sender.send(Message::Request(request)).is_ok()
    }

    /// The next input within `timeout`, the target's events applied to the ledger as they come.
    pub fn next(&mut self, timeout: Duration) -> Option<Input> {
        match self.messages.recv_timeout(timeout) {
            Ok(Message::Request(request)) => Some(Input::Request(request)),
            Ok(Message::Observed(o)) if o.pid == self.pid => {
                for event in self.translation.events(&o.record, o.timestamp as u64 * 100, o.tid, &o.stack) {
                    self.ledger.apply(&event);
                }
                Some(Input::Applied)
            }
            Ok(Message::Observed(o)) => match o.record {
                Record::ThreadStart { tid, .. } | Record::ThreadEnd { tid, .. } => Some(Input::OwnThread { tid }),
                _ => Some(Input::Applied),
            },
            // Our own sender keeps the channel open.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Asks the sessions to deliver what their buffers hold.
    pub fn flush(&self) -> Result<(), String> {
        self.sessions.as_ref().map_or(Ok(()), Sessions::flush)
    }

    /// Stops the sessions and applies what they had delivered.
    pub fn stop(&mut self) {
        self.sessions = None;
        while self.next(Duration::ZERO).is_some() {}
    }

    /// The ledger, and the namer of its sites (with the modules loaded so far).
    pub fn ledger_and_sites(&mut self) -> (&Ledger, Sites<'_, dyn Symbolize>) {
        self.symbols.refresh();
        (&self.ledger, Sites { translation: &self.translation, symbols: self.symbols.as_mut() })
    }
}
