//! Answers a session's requests (`protocol.rs`) from the ledger of its target: the same for
//! every backend, which only feeds the ledger, names sites and reads the requests.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::time::Duration;

use serde::Serialize;

use crate::model::ledger::{Filter, Ledger, Mark, Memory, SiteTotals};
use crate::model::lost::Lost;
use crate::model::verdict::Measurement;
use crate::report::text::Paint;
use crate::report::{GrowingSite, LiveTotals, Reporter, Resources, Selection, StoppedBy};
use crate::serve::protocol::{Answer, Batch, Failure, Lines, Reply, Request, MAX_REPORT_SITES, VERSION};
use crate::sites::frame::Describe;

/// Measurements a session may have under way at once, and batches in one: each batch judges
/// all its measurement's windows again, and a client must not make that unbounded.
const MAX_MEASUREMENTS: usize = 64;
const MAX_BATCHES: usize = 1000;

/// The state a session keeps between requests: its memory measurements, and the reports'
/// growth from one to the next.
#[derive(Default)]
pub struct Answerer {
    measurements: HashMap<u64, Measurement>,
    /// What was lost when each measurement's batch under way began.
    lost_at_window: HashMap<u64, Lost>,
    next_measurement: u64,
    /// Made when a tracer's session attached (`report` is refused without it).
    reporter: Option<Reporter>,
    /// The client asked to detach, or had the session's last report: the session ends after
    /// this reply.
    pub detached: bool,
}

/// What a session knows of its target as it answers, besides its ledger and their names.
pub struct Moment<'a> {
    pub lost: Lost,
    /// Whether the target still runs, asked after what is read of it by its pid.
    pub alive: &'a dyn Fn() -> bool,
    /// Now, on the clock of the events' timestamps.
    pub clock_ns: u64,
    /// The target is no longer the client's to see: a report is the last, and says so (the
    /// session gives it nothing of the target).
    pub censored: bool,
}

impl Moment<'static> {
    /// For a collector that makes no reports (which alone ask whether the target runs, and the time).
    pub fn without_reports(lost: Lost) -> Self {
        Self { lost, alive: &|| true, clock_ns: 0, censored: false }
    }
}

impl Answerer {
    /// `reporter`: a tracer's session's, made when it attached; `None` where reports are not served.
    pub fn new(reporter: Option<Reporter>) -> Self {
        Self { next_measurement: 1, reporter, ..Self::default() }
    }

    /// The reply line to one request line, from what the ledger holds now.
    pub fn handle(&mut self, line: &str, ledger: &Ledger, describe: &mut dyn Describe, now: &Moment<'_>) -> String {
        let request = match serde_json::from_str::<Request>(line) {
            Ok(request) => request,
            Err(e) => return failure(format!("bad request: {e}")),
        };
        match self.answer(request, ledger, describe, now) {
            Ok(body) => reply_line(&Reply { ok: true, body }),
            Err(error) => failure(error),
        }
    }

    fn answer(
        &mut self,
        request: Request,
        ledger: &Ledger,
        describe: &mut dyn Describe,
        now: &Moment<'_>,
    ) -> Result<Answer, String> {
        let lost = now.lost;
        Ok(match request {
            Request::Hello { version } if version == VERSION => Answer::Hello { version: VERSION },
            Request::Hello { version } => {
                return Err(format!("protocol version {version} is not served (this collector speaks {VERSION})"))
            }
            Request::Mark => Answer::Mark { mark: ledger.mark(), lost },
            Request::Created { since } => {
                Answer::Created { resources: Resources::since(ledger, describe, since, |_| 0.0), lost }
            }
            Request::Begin => {
                if self.measurements.len() >= MAX_MEASUREMENTS {
                    return Err(format!("{MAX_MEASUREMENTS} measurements are under way already: end one first"));
                }
                let id = self.next_measurement;
                self.next_measurement += 1;
                self.measurements.insert(id, Measurement::default());
                Answer::Begun { measurement: id }
            }
            Request::Window { measurement } => {
                let m = self.measurements.get_mut(&measurement).ok_or(format!("no measurement {measurement}"))?;
                if m.windows.len() >= MAX_BATCHES {
                    return Err(format!("measurement {measurement} has had {MAX_BATCHES} batches, its most"));
                }
                m.open_window = Some(ledger.mark());
                self.lost_at_window.insert(measurement, lost);
                Answer::Done {}
            }
            Request::Batch { measurement, calls, tolerance, confirm, top } => {
                let m = self.measurements.get_mut(&measurement).ok_or(format!("no measurement {measurement}"))?;
                let since = m.open_window.take().ok_or("a batch must start with a window request")?;
                m.windows.push((since, ledger.mark()));
                let lost_in_batch = self.lost_at_window.remove(&measurement).map(|before| lost.since(&before));
                let live_sites = live_in_windows(ledger, &m.windows);
                let (verdict, growth) = m.batch(&live_sites, calls, &tolerance, confirm);
                let live = LiveTotals::of(&live_sites);
                let sites = growth
                    .iter()
                    .take(top)
                    .map(|g| GrowingSite::new(g, m.calls, describe, ledger.origin(g.totals.site)))
                    .collect();
                Answer::Batch(Box::new(Batch {
                    mark: ledger.mark(),
                    verdict,
                    growing_sites: growth.len(),
                    sites,
                    live,
                    lost,
                    lost_in_batch: lost_in_batch.unwrap_or_default(),
                }))
            }
            Request::End { measurement } => {
                self.measurements.remove(&measurement).ok_or(format!("no measurement {measurement}"))?;
                self.lost_at_window.remove(&measurement);
                Answer::Done {}
            }
            Request::Report { top, sort, min_size, max_size, min_age_ms, text, colour, stopped_by } => {
                let reporter = self
                    .reporter
                    .as_mut()
                    .ok_or("this session makes no reports: a tracer asks for them at attach (final_report)")?;
                if top > MAX_REPORT_SITES {
                    return Err(format!(
                        "a report describes at most {MAX_REPORT_SITES} memory sites (top {top} asked)"
                    ));
                }
                if max_size.is_some_and(|max| max < min_size) {
                    return Err("max_size is smaller than min_size: nothing would be shown".into());
                }
                let min_age = Duration::from_millis(min_age_ms);
                reporter.selection = Selection { top, sort, min_size, max_size, min_age };
                let stopped_by = match (now.censored, (now.alive)()) {
                    (true, _) => Some(StoppedBy::TargetChangedUser),
                    (false, false) => Some(StoppedBy::TargetExited),
                    (false, true) => stopped_by,
                };
                let report = reporter.report(ledger, describe, now.clock_ns, now.alive, lost, stopped_by);
                self.detached |= report.is_final;
                let text = text.then(|| report.render(Paint { on: colour }));
                Answer::Report { report: Box::new(report), text }
            }
            Request::Detach => {
                self.detached = true;
                Answer::Done {}
            }
        })
    }
}

/// Live memory created inside any of the windows, by site.
fn live_in_windows(ledger: &Ledger, windows: &[(Mark, Mark)]) -> Vec<SiteTotals> {
    let mut by_site: HashMap<(Memory, u32), SiteTotals> = HashMap::new();
    for &(since, until) in windows {
        for t in ledger.memory_by_site(&Filter { since, until: Some(until), ..Filter::default() }) {
            let total = by_site.entry((t.memory, t.site)).or_insert(SiteTotals { count: 0, bytes: 0, ..t });
            total.count += t.count;
            total.bytes = total.bytes.saturating_add(t.bytes);
        }
    }
    by_site.into_values().collect()
}

pub fn reply_line<T: Serialize>(reply: &Reply<T>) -> String {
    json_line(reply)
}

/// One line of the protocol: a reply, or a notice a session sends unasked.
pub fn json_line(message: &impl Serialize) -> String {
    let mut line = serde_json::to_string(message).expect("the protocol's messages serialize");
    line.push('\n');
    line
}

pub fn failure(error: String) -> String {
    reply_line(&Reply { ok: false, body: Failure { error } })
}

/// One request line from a blocking reader; `None` when the client hung up (mid-line too). A
/// line that is oversized or not UTF-8 is consumed to its end and refused (InvalidData).
pub fn read_request(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut lines = Lines::default();
    loop {
        let input = reader.fill_buf()?;
        if input.is_empty() {
            return Ok(None);
        }
        let (taken, line) = lines.feed(input);
        reader.consume(taken);
        match line {
            Some(Ok(line)) => return Ok(Some(line)),
            Some(Err(why)) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            None => {}
        }
    }
}
