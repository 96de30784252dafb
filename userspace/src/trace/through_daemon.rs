//! `psleak trace` through a `psleak daemon`, for a user who may not load probes: the daemon
//! attaches them, if it lets this user trace the target (the same rule as for tests: the
//! target runs as the user), keeps the ledger and names its sites; each report is asked for
//! (`report`, `protocol.rs`) and written here, in this output's format.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::backends::ebpf::live::{readable_now, wait_readable};
use crate::error::{say, Error};
use crate::process::{self, Pidfd};
use crate::report::{Selection, StoppedBy};
use crate::serve::protocol::{self, VERSION};
use crate::trace::ebpf::Traced;
use crate::trace::Output;

/// How long the daemon may take to attach, or to make a report (the first one symbolizes every
/// library the sites are in).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// A session of the daemon's, on the target's pid.
pub struct Remote {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
    /// The target, whose exit ends the trace (held here too: the daemon only answers).
    target: Pidfd,
    /// Its comm, for the messages.
    pub name: String,
    output: Output,
    selection: Selection,
    /// The daemon sent the session's last report (the target exited): nothing more is asked.
    ended: bool,
    /// The daemon said the session is over (`protocol::Over`): the next report is the last.
    over: Option<StoppedBy>,
}

/// A reply to `report`; the report is written as the daemon made it.
#[derive(Deserialize)]
struct ReportReply<'a> {
    ok: bool,
    #[serde(borrow)]
    report: Option<&'a RawValue>,
    text: Option<String>,
    error: Option<String>,
}

impl Remote {
    /// Asks the daemon on `socket` to trace `pid` with `options`' stack depth and Python frames;
    /// the session, and what the daemon attached (in words).
    pub fn attach(
        socket: &Path,
        pid: u32,
        options: &psleak_ebpf::Options,
        output: Output,
        selection: Selection,
    ) -> Result<(Self, String), Error> {
        // Before the daemon looks: a pid that is not there is said so here.
        let target = Pidfd::open(pid)?;
        let stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
        stream.set_read_timeout(Some(ANSWER_LIMIT)).map_err(|e| gone(socket, e))?;
        stream.set_write_timeout(Some(ANSWER_LIMIT)).map_err(|e| gone(socket, e))?;
        let mut remote = Self {
            socket: socket.to_path_buf(),
            stream: BufReader::new(stream),
            target,
            name: process::name_of(pid),
            output,
            selection,
            ended: false,
            over: None,
        };
        let attach = json!({
            "op": "attach",
            "pid": pid,
            "version": VERSION,
            "allocators": "all",
            "stack_bytes": options.stack_bytes,
            "python_frames": options.python_frames,
            "final_report": true,
        });
        let line = remote.ask(&attach)?;
        let ready = remote.answered(&line)?;
        let path = |field: &str| ready[field].as_str().map(str::to_string);
        let attached = format!(
            "{} probes on {}{}",
            ready["probes"],
            path("libc").unwrap_or_else(|| "?".into()),
            path("python").map_or(String::new(), |p| format!(" and {p}")),
        );
        Ok((remote, attached))
    }

    /// Sends `request` and reads the reply line.
    fn ask(&mut self, request: &Value) -> Result<String, Error> {
        let mut line = request.to_string();
        line.push('\n');
        self.stream.get_mut().write_all(line.as_bytes()).map_err(|e| gone(&self.socket, e))?;
        loop {
            let reply = self.read_line()?;
            if !self.took_notice(&reply) {
                return Ok(reply);
            }
        }
    }

    fn read_line(&mut self) -> Result<String, Error> {
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) => Err(Error::Refused(format!("the psleak daemon on {} ended the session", self.socket.display()))),
            Ok(_) => Ok(line),
            Err(e) => Err(gone(&self.socket, e)),
        }
    }

    /// Whether `line` is the daemon's notice that the session is over (told the user, and
    /// kept), rather than a reply.
    fn took_notice(&mut self, line: &str) -> bool {
        match serde_json::from_str::<protocol::Over>(line) {
            Ok(notice) => {
                say(&format!("psleak: {}", notice.why));
                self.over = Some(notice.over);
                true
            }
            Err(_) => false,
        }
    }

    /// Reads what the daemon said unasked, if it did: that the session is over (a notice), or
    /// that it ended it (a refusal: idle too long, the daemon stopping).
    fn take_unasked(&mut self) -> Result<(), Error> {
        if self.stream.buffer().is_empty() && !readable_now(self.stream.get_ref().as_raw_fd()) {
            return Ok(());
        }
        let line = self.read_line()?;
        if self.took_notice(&line) {
            return Ok(());
        }
        self.answered(&line)?;
        Err(self.refused(None))
    }

    /// A reply that says it was done (`ok`); its refusal, or garbage, as the error.
    fn answered(&self, line: &str) -> Result<Value, Error> {
        let reply: Value = serde_json::from_str(line).map_err(|e| self.garbled(e))?;
        match reply["ok"] == true {
            true => Ok(reply),
            false => Err(self.refused(reply["error"].as_str())),
        }
    }

    fn refused(&self, why: Option<&str>) -> Error {
        let why = why.unwrap_or("no reason given");
        Error::Refused(format!("the psleak daemon on {}: {why}", self.socket.display()))
    }

    fn garbled(&self, e: serde_json::Error) -> Error {
        Error::Io(format!("the psleak daemon on {} answered garbage", self.socket.display()), io::Error::other(e))
    }
}

impl Traced for Remote {
    fn wait(&mut self, signals: RawFd, timeout: Duration) -> Result<(), Error> {
        // What the daemon said may be read already: then nothing is waited for.
        let timeout = if self.stream.buffer().is_empty() { timeout } else { Duration::ZERO };
        wait_readable(&[signals, self.target.exit_fd(), self.stream.get_ref().as_raw_fd()], timeout)
            .map_err(|e| Error::Io("cannot wait for the target".into(), e))
    }

    fn take_in(&mut self) -> Result<Option<StoppedBy>, Error> {
        if self.over.is_none() && !self.ended {
            self.take_unasked()?;
        }
        let exited = (self.ended || !self.target.is_alive()).then_some(StoppedBy::TargetExited);
        Ok(self.over.or(exited))
    }

    fn catch_up(&mut self) -> Result<Option<StoppedBy>, Error> {
        if self.ended || self.over.is_some() {
            return Ok(self.over); // the daemon read it all already
        }
        // The daemon reads everything the probes wrote before it answers (a mark is the
        // cheapest question).
        let line = self.ask(&json!({"op": "mark"}))?;
        self.answered(&line).map(|_| None)
    }

    fn report(&mut self, stopped_by: Option<StoppedBy>) -> Result<(), Error> {
        if self.ended {
            return Ok(());
        }
        let s = self.selection;
        let request = json!({
            "op": "report",
            "top": s.top,
            "sort": s.sort,
            "min_size": s.min_size,
            "max_size": s.max_size,
            "min_age_ms": u64::try_from(s.min_age.as_millis()).unwrap_or(u64::MAX),
            "text": !self.output.json(),
            "colour": self.output.colour(),
            "stopped_by": stopped_by,
        });
        let line = self.ask(&request)?;
        let reply: ReportReply<'_> = serde_json::from_str(&line).map_err(|e| self.garbled(e))?;
        let report = match (reply.ok, reply.report) {
            (true, Some(report)) => report,
            _ => return Err(self.refused(reply.error.as_deref())),
        };
        #[derive(Deserialize)]
        struct Finality {
            #[serde(rename = "final")]
            is_final: bool,
        }
        let finality: Finality = serde_json::from_str(report.get()).map_err(|e| self.garbled(e))?;
        // The daemon's session is over after its last report (the target exited meanwhile).
        self.ended = finality.is_final;
        match reply.text {
            Some(text) if !self.output.json() => self.output.write(&text),
            _ => self.output.write(&format!("{}\n", report.get())),
        }
    }
}

fn connect_error(socket: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::PermissionDenied {
        return Error::Refused(format!(
            "the psleak daemon on {} does not admit this user: its --socket-mode and --socket-group say who may connect",
            socket.display()
        ));
    }
    Error::Io(format!("no psleak daemon answers on {}", socket.display()), e)
}

fn gone(socket: &Path, e: io::Error) -> Error {
    Error::Io(format!("the psleak daemon on {} stopped answering", socket.display()), e)
}
