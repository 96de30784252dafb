//! The seam between the Windows collector's loop and ETW: what the loop needs of a followed
//! process. ETW's follower (`target.rs`) is one; the loop's tests on Linux script another.

use std::io;
use std::time::Duration;

use crate::backends::etw::translate::Sites;
use crate::error::Error;
use crate::model::ledger::Ledger;
use crate::sites::frame::Symbolize;

/// A request line, or the end of the client's requests.
pub type Request = io::Result<Option<String>>;

/// What [`Follow::next`] brings.
pub enum Input {
    /// An event of the target, now in the ledger.
    Applied,
    /// A thread of this process started or ended (sync marks).
    OwnThread {
        tid: u32,
    },
    Request(Request),
}

/// A process followed by event sessions that deliver late: what the collector needs of it.
pub trait Follow {
    /// Where a reader thread sends the client's requests (they come back through `next`).
    fn requests(&self) -> Box<dyn Fn(Request) -> bool + Send>;
    /// The next input within `timeout`; None when the time is up.
    fn next(&mut self, timeout: Duration) -> Option<Input>;
    /// Sets a mark and has the sessions deliver what they hold; the mark's thread id comes
    /// back as [`Input::OwnThread`] once everything before it has.
    fn mark(&mut self) -> Result<u32, Error>;
    fn is_running(&self) -> bool;
    /// The ledger, and the namer of its sites.
    fn ledger_and_sites(&mut self) -> (&Ledger, Sites<'_, dyn Symbolize>);
}
