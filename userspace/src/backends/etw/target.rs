//! One process followed through ETW (Windows only): the sessions of `psleak-etw`, the ledger
//! their events feed through [`Translation`], and the process's symbols. Used by `psleak trace`
//! and by the collector that serves the Python package. Type-checked in CI, never run (see
//! the README); what it is made of is tested on Linux (`translate`, `serve::etw_session`, `serve::answer`).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use psleak_etw::records::Record;
use psleak_etw::session::{self, Observed, Sessions, StartError};
use windows_sys::Win32::System::Threading::GetCurrentThreadId;

use crate::backends::etw::follow::{Follow, Input, Request};
use crate::backends::etw::translate::{Sites, Translation};
use crate::backends::poll;
use crate::error::Error;
use crate::model::ledger::Ledger;
use crate::sites::dbghelp::Dbghelp;
use crate::sites::frame::{Addresses, Symbolize};

enum Message {
    Observed(Observed),
    Request(Request),
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
        for name in session::stop_orphans(poll::is_running) {
            eprintln!("psleak: stopped the ETW session {name}, left by a psleak that was killed");
        }
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

    /// What the sessions could not be given (handle events, stacks), and why.
    pub fn missing(&self) -> &[String] {
        self.sessions.as_ref().map_or(&[], |s| &s.missing)
    }

    /// Stops the sessions and applies what they had delivered.
    pub fn stop(&mut self) {
        self.sessions = None;
        while self.next(Duration::ZERO).is_some() {}
    }
}

impl Follow for Followed {
    fn requests(&self) -> Box<dyn Fn(Request) -> bool + Send> {
        let sender = self.sender.clone();
        Box::new(move |request| sender.send(Message::Request(request)).is_ok())
    }

    /// The target's events are applied to the ledger as they come.
    fn next(&mut self, timeout: Duration) -> Option<Input> {
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

    /// A thread of ours, started and ended now; then the sessions deliver their buffers.
    fn mark(&mut self) -> Result<u32, Error> {
        let failed = |what: &str, why: String| Error::Io(what.into(), std::io::Error::other(why));
        // SAFETY: GetCurrentThreadId has no preconditions.
        let tid = std::thread::spawn(|| unsafe { GetCurrentThreadId() })
            .join()
            .map_err(|_| failed("cannot set a mark", "its thread panicked".into()))?;
        self.sessions
            .as_ref()
            .map_or(Ok(()), Sessions::flush)
            .map_err(|why| failed("cannot flush ETW's sessions", why))?;
        Ok(tid)
    }

    fn is_running(&self) -> bool {
        poll::is_running(self.pid)
    }

    /// With the modules loaded so far.
    fn ledger_and_sites(&mut self) -> (&Ledger, Sites<'_, dyn Symbolize>) {
        self.symbols.refresh();
        (&self.ledger, Sites { translation: &self.translation, symbols: self.symbols.as_mut() })
    }
}
