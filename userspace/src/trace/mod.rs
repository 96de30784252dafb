//! `psleak trace --pid PID`: the live investigation of a running process, through eBPF on
//! Linux and ETW on Windows; where and how both write their reports (`Output`).

#[cfg(target_os = "linux")]
pub mod ebpf;
#[cfg(windows)]
pub mod etw;
#[cfg(target_os = "linux")]
pub mod launch;
#[cfg(target_os = "linux")]
pub mod through_daemon;

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::Path;

use crate::error::Error;
use crate::report::text::Paint;
use crate::report::Report;

/// When the text is coloured (`--color`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// On a terminal, unless NO_COLOR is set (no-color.org).
    Auto,
    Always,
    Never,
}

/// Where the reports go, and how: one JSON object per line, or text, coloured or not.
pub struct Output {
    json: bool,
    paint: Paint,
    sink: Box<dyn Write>,
}

impl Output {
    /// Reports to `path` (created, or emptied) or stdout. Opened before anything is attached,
    /// so that a path psleak cannot write stops it at once.
    pub fn open(json: bool, colour: Colour, path: Option<&Path>) -> Result<Self, Error> {
        let (sink, terminal): (Box<dyn Write>, bool) = match path {
            Some(path) => {
                let file =
                    File::create(path).map_err(|e| Error::Io(format!("cannot write to {}", path.display()), e))?;
                (Box::new(io::BufWriter::new(file)), false)
            }
            None => (Box::new(io::stdout()), io::stdout().is_terminal()),
        };
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let on = !json
            && match colour {
                Colour::Always => true,
                Colour::Never => false,
                Colour::Auto => terminal && !no_color,
            };
        Ok(Self { json, paint: Paint { on }, sink })
    }

    pub fn emit(&mut self, report: &Report) -> Result<(), Error> {
        let text = if self.json {
            let mut line = serde_json::to_string(report).expect("reports serialize");
            line.push('\n');
            line
        } else {
            report.render(self.paint)
        };
        self.write(&text)
    }

    /// Whether reports go out as JSON lines (else as text).
    pub fn json(&self) -> bool {
        self.json
    }

    /// Whether the text is coloured.
    pub fn colour(&self) -> bool {
        self.paint.on
    }

    /// Writes a report already made (a daemon's), in this output's format.
    pub fn write(&mut self, text: &str) -> Result<(), Error> {
        match self.sink.write_all(text.as_bytes()).and_then(|()| self.sink.flush()) {
            // `psleak trace ... | head`: the reader is gone, and so is the point of tracing.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::OutputClosed),
            result => result.map_err(|e| Error::Io("cannot write the report".into(), e)),
        }
    }
}
