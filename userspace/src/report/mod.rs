//! What `psleak trace` shows each interval, and what the protocol's replies list: the data
//! here, serialized as JSON; as text in `text`.

pub mod text;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backends::poll;
use crate::model::event::Origin;
use crate::model::ledger::{Filter, Ledger, Mark, Memory, SiteId, SiteTotals};
use crate::model::lost::Lost;
use crate::model::metrics::{Metrics, MetricsChange};
use crate::model::verdict::SiteGrowth;
use crate::sites::frame::{Describe, Frame, PyFrame};
use text::site_text;

/// The version of the JSON layout of `psleak trace --json` (docs/trace-json.md): a reader
/// checks it first.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    /// The version of psleak that made it.
    pub psleak: &'static str,
    /// When it was made: UTC, RFC 3339, to the millisecond.
    pub time: String,
    pub pid: u32,
    pub elapsed_s: f64,
    /// The last report of the session, and why it ended.
    #[serde(rename = "final")]
    pub is_final: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<StoppedBy>,
    /// Why no events come (the process's counters are all there is), if none do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untraced: Option<String>,
    pub events: u64,
    pub lost: Lost,
    /// Execs of the target since attach: what its programs before the last one made is gone.
    pub execs: u64,
    /// Releases of resources created before attach (not counted).
    pub untracked_releases: u64,
    pub live: LiveTotals,
    /// The classic metrics of the target, while it is alive: a second opinion.
    pub process: Option<ProcessMetrics>,
    pub suspects: Vec<Sited<Suspect>>,
    #[serde(flatten)]
    pub resources: Resources,
}

/// Why a trace ended: a code in the JSON, a sentence in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoppedBy {
    DurationEnded,
    Interrupted,
    Terminated,
    TargetExited,
    /// The target exec'd a program that runs as another user (setuid): nothing more is shown.
    TargetChangedUser,
}

impl StoppedBy {
    pub fn describe(self) -> &'static str {
        match self {
            StoppedBy::DurationEnded => "the duration ended",
            StoppedBy::Interrupted => "interrupted",
            StoppedBy::Terminated => "terminated",
            StoppedBy::TargetExited => "the target exited",
            StoppedBy::TargetChangedUser => "the target exec'd a program that runs as another user",
        }
    }
}

/// The fds, threads, handles and heaps created since a mark and still open or alive.
#[derive(Debug, Serialize)]
pub struct Resources {
    pub fds: Vec<Sited<Fd>>,
    pub threads: Vec<Sited<Thread>>,
    /// Windows handles and private heaps (the ETW backend).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub handles: Vec<Sited<Handle>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heaps: Vec<Sited<Heap>>,
}

impl Resources {
    /// Those created since `since`, each with its site; `age` turns a creation time into seconds.
    pub fn since(ledger: &Ledger, describe: &mut dyn Describe, since: Mark, age: impl Fn(u64) -> f64) -> Self {
        let fds = ledger.open_fds(since).map(|(fd, f)| {
            let fd_now = Fd { fd, kind: f.kind.describe(), target: describe.fd_target(fd), age_s: age(f.ts_ns) };
            Sited::new(fd_now, describe, ledger.origin(f.site))
        });
        let fds = fds.collect();
        let threads = ledger.live_threads(since).map(|(tid, t)| {
            let thread = Thread { tid, name: describe.thread_name(tid), age_s: age(t.ts_ns) };
            Sited::new(thread, describe, ledger.origin(t.site))
        });
        let threads = threads.collect();
        let handles = ledger.open_handles(since).map(|(handle, h)| {
            let handle = Handle { handle, kind: h.kind.describe(), age_s: age(h.ts_ns) };
            Sited::new(handle, describe, ledger.origin(h.site))
        });
        let handles = handles.collect();
        let heaps = ledger
            .live_heaps(since)
            .map(|(heap, h)| Sited::new(Heap { heap, age_s: age(h.ts_ns) }, describe, ledger.origin(h.site)));
        Self { fds, threads, handles, heaps: heaps.collect() }
    }
}

/// A resource with where it was made: the native frame to blame and its stack, the Python
/// stack of the thread, the program's own Python frame innermost in it, and all that as text.
#[derive(Debug, Serialize)]
pub struct Sited<T> {
    #[serde(flatten)]
    pub resource: T,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
    /// Innermost first.
    pub python: Vec<PyFrame>,
    /// The innermost Python frame of the program's own code (not psleak's, not the standard
    /// library's): where a user reads the leak from.
    pub called_from: Option<PyFrame>,
    /// The site as psleak prints it, for clients that show it (the Python package).
    pub site_text: String,
}

impl<T> Sited<T> {
    /// `resource`, made where `origin` says, named by `describe`.
    pub fn new(resource: T, describe: &mut dyn Describe, origin: Origin) -> Self {
        let (site, stack) = describe.site(origin);
        let python = describe.python(origin);
        let called_from = python.iter().find(|f| f.is_users()).cloned();
        let site_text = site_text(&site, called_from.as_ref());
        Self { resource, site, stack, python, called_from, site_text }
    }
}

/// The live memory of some sites, all told: in a report, all created since attach (after the
/// size and age filters); in a batch's answer, all created in the measurement's windows.
#[derive(Debug, Serialize, Default)]
pub struct LiveTotals {
    pub heap_bytes: u64,
    pub heap_blocks: u64,
    pub mmap_bytes: u64,
    pub sites: usize,
}

impl LiveTotals {
    pub fn of(sites: &[SiteTotals]) -> Self {
        let mut live = LiveTotals { sites: sites.len(), ..LiveTotals::default() };
        for s in sites {
            match s.memory {
                Memory::Heap(_) => {
                    live.heap_bytes = live.heap_bytes.saturating_add(s.bytes);
                    live.heap_blocks += s.count;
                }
                Memory::Mmap => live.mmap_bytes = live.mmap_bytes.saturating_add(s.bytes),
            }
        }
        live
    }
}

#[derive(Debug, Serialize)]
pub struct ProcessMetrics {
    pub now: Metrics,
    pub since_attach: MetricsChange,
}

/// A memory site among the largest live.
#[derive(Debug, Serialize)]
pub struct Suspect {
    #[serde(flatten)]
    pub memory: Memory,
    pub count: u64,
    pub bytes: u64,
    /// Live bytes of this site divided by the time since attach.
    pub bytes_per_s: f64,
    /// What its live bytes grew by since the previous report, per second (0 in the first).
    pub recent_bytes_per_s: f64,
    /// Consecutive reports in which this site's live bytes grew.
    pub growing_for: u32,
}

/// A memory site that grew in a measurement's batch (the protocol's `batch` answer).
#[derive(Debug, Serialize)]
pub struct GrowingSite {
    pub memory: Memory,
    /// Live in the measurement's windows.
    pub count: u64,
    pub bytes: u64,
    /// Since the batch before.
    pub count_growth: i64,
    pub bytes_growth: i64,
    /// Batches in a row, up to this one, in which the site grew.
    pub streak: u32,
    /// Its line as psleak prints it (`text::growing_site_text`).
    pub text: String,
}

impl GrowingSite {
    /// `growth` of a site, named by `describe`, in a measurement whose batches made `calls` calls.
    pub fn new(growth: &SiteGrowth, calls: u64, describe: &mut dyn Describe, origin: Origin) -> Sited<Self> {
        let t = growth.totals;
        let site = GrowingSite {
            memory: t.memory,
            count: t.count,
            bytes: t.bytes,
            count_growth: growth.count_growth,
            bytes_growth: growth.bytes_growth,
            streak: growth.streak,
            text: String::new(),
        };
        let mut sited = Sited::new(site, describe, origin);
        sited.resource.text = text::growing_site_text(&sited.resource, &sited.site_text, calls);
        sited
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Fd {
    pub fd: i32,
    pub kind: String,
    /// What /proc says it is now: a path, `socket:[inode]`, `pipe:[inode]`...
    pub target: Option<String>,
    pub age_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Thread {
    pub tid: u32,
    pub name: Option<String>,
    pub age_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Handle {
    pub handle: u64,
    /// Object type and name, as ETW gave them.
    pub kind: String,
    pub age_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Heap {
    pub heap: u64,
    pub age_s: f64,
}

/// Which live memory the reports show.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    /// How many memory sites.
    pub top: usize,
    /// Which first.
    pub sort: SortKey,
    pub min_size: u64,
    pub max_size: Option<u64>,
    /// Memory younger than this is left out (short-lived allocations).
    pub min_age: Duration,
}

/// How many memory sites a report shows unless asked otherwise.
pub const DEFAULT_TOP: usize = 10;

impl Default for Selection {
    /// Every live site, the `DEFAULT_TOP` largest shown.
    fn default() -> Self {
        Self { top: DEFAULT_TOP, sort: SortKey::Bytes, min_size: 0, max_size: None, min_age: Duration::ZERO }
    }
}

/// How the memory sites of a report are ranked, largest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    /// Live bytes.
    #[default]
    Bytes,
    /// Live blocks and mappings.
    Count,
    /// Growth of the live bytes since the previous report.
    Rate,
}

/// Turns one session's ledger into reports, following each site's growth between them.
pub struct Reporter {
    /// The target's pid here, and as the user calls it (a daemon's client may be in another
    /// pid namespace).
    pid: u32,
    shown_pid: u32,
    pub selection: Selection,
    growth: Growth,
    attached_at: Instant,
    last_report: Instant,
    /// The target's classic metrics at attach.
    baseline: Option<Metrics>,
    /// Why no events come, when the backend could not be had: the reports say so.
    pub untraced: Option<String>,
}

impl Reporter {
    pub fn new(pid: u32, selection: Selection) -> Self {
        let baseline = poll::metrics(pid).ok();
        let now = Instant::now();
        Self {
            pid,
            shown_pid: pid,
            selection,
            growth: Growth::default(),
            attached_at: now,
            last_report: now,
            baseline,
            untraced: None,
        }
    }

    /// Reports showing the target as `pid` (the number its user knows it by).
    pub fn shown_as(self, pid: u32) -> Self {
        Self { shown_pid: pid, ..self }
    }

    /// The report now: `now_ns` on the clock of the events' timestamps; the classic metrics
    /// only if the target is `alive` after they were read (the pid they were read by was still
    /// the target's: it changes hands only after an exit).
    pub fn report(
        &mut self,
        ledger: &Ledger,
        describe: &mut dyn Describe,
        now_ns: u64,
        alive: &dyn Fn() -> bool,
        lost: Lost,
        stopped_by: Option<StoppedBy>,
    ) -> Report {
        let elapsed = self.attached_at.elapsed();
        let since_last = std::mem::replace(&mut self.last_report, Instant::now()).elapsed().as_secs_f64().max(1e-3);
        let filter = Filter {
            // A client's min_age may be any u64 of milliseconds: past u64 nanoseconds it is forever.
            created_by_ns: Some(
                now_ns.saturating_sub(u64::try_from(self.selection.min_age.as_nanos()).unwrap_or(u64::MAX)),
            ),
            min_size: self.selection.min_size,
            max_size: self.selection.max_size,
            ..Filter::default()
        };
        let sites = ledger.memory_by_site(&filter);
        let live = LiveTotals::of(&sites);
        // Every site's growth is followed, shown or not: one may rise into the top later.
        let mut ranked: Vec<(&SiteTotals, Suspect)> = sites
            .iter()
            .map(|s| {
                let (growing_for, grown) = self.growth.update((s.memory, s.site), s.bytes);
                let suspect = Suspect {
                    memory: s.memory,
                    count: s.count,
                    bytes: s.bytes,
                    bytes_per_s: s.bytes as f64 / elapsed.as_secs_f64().max(1e-3),
                    recent_bytes_per_s: grown as f64 / since_last,
                    growing_for,
                };
                (s, suspect)
            })
            .collect();
        // The ledger's order (bytes) breaks ties.
        match self.selection.sort {
            SortKey::Bytes => {}
            SortKey::Count => ranked.sort_by_key(|s| std::cmp::Reverse(s.1.count)),
            SortKey::Rate => ranked.sort_by(|a, b| b.1.recent_bytes_per_s.total_cmp(&a.1.recent_bytes_per_s)),
        }
        let suspects = ranked
            .into_iter()
            .take(self.selection.top)
            .map(|(s, suspect)| Sited::new(suspect, describe, ledger.origin(s.site)))
            .collect();
        let age = |ts_ns: u64| now_ns.saturating_sub(ts_ns) as f64 / 1e9;
        let resources = Resources::since(ledger, describe, Mark::default(), age);
        let process = match (self.baseline, poll::metrics(self.pid)) {
            (Some(before), Ok(now)) if alive() => Some(ProcessMetrics { now, since_attach: now.since(&before) }),
            _ => None,
        };
        Report {
            schema: SCHEMA,
            psleak: env!("CARGO_PKG_VERSION"),
            time: utc_now(),
            pid: self.shown_pid,
            elapsed_s: elapsed.as_secs_f64(),
            is_final: stopped_by.is_some(),
            stopped_by,
            untraced: self.untraced.clone(),
            events: ledger.events(),
            lost,
            execs: ledger.execs,
            untracked_releases: ledger.untracked_releases,
            live,
            process,
            suspects,
            resources,
        }
    }
}

/// Per-site growth between reports.
#[derive(Debug, Default)]
pub struct Growth {
    last: HashMap<(Memory, SiteId), (u64, u32)>,
}

impl Growth {
    /// Records this report's bytes for a site; returns for how many reports it has grown, and by
    /// how many bytes since the previous one (a site new since then grew from nothing: all it
    /// holds was made since attach).
    pub fn update(&mut self, key: (Memory, SiteId), bytes: u64) -> (u32, u64) {
        let entry = self.last.entry(key).or_insert((0, 0));
        let grown = bytes.saturating_sub(entry.0);
        entry.1 = if bytes > entry.0 { entry.1 + 1 } else { 0 };
        entry.0 = bytes;
        (entry.1, grown)
    }
}

/// The time now, UTC, as RFC 3339 to the millisecond (`2026-12-03T12:01:02.345Z`).
pub fn utc_now() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(since_epoch)
}

fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (day_secs / 3600, day_secs % 3600 / 60, day_secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z", since_epoch.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::metrics::USS_UNKNOWN;

    /// A report of nothing: no events, no process metrics, no resources.
    fn empty_report() -> Report {
        Report {
            schema: SCHEMA,
            psleak: "0.0.0",
            time: "2026-12-03T12:01:02.345Z".into(),
            pid: 1,
            elapsed_s: 9.0,
            is_final: false,
            stopped_by: None,
            untraced: None,
            events: 0,
            lost: Lost::default(),
            execs: 0,
            untracked_releases: 0,
            live: LiveTotals::default(),
            process: None,
            suspects: vec![],
            resources: Resources { fds: vec![], threads: vec![], handles: vec![], heaps: vec![] },
        }
    }

    #[test]
    fn a_group_of_fds_shows_its_oldest_age() {
        // fd 3 was closed and reopened later: the group is as old as fd 4.
        let fd = |fd, age_s| {
            Sited::new(Fd { fd, kind: "pipe".into(), target: None, age_s }, &mut NoNames, Origin::default())
        };
        let resources =
            Resources { fds: vec![fd(3, 1.0), fd(4, 5.0)], threads: vec![], handles: vec![], heaps: vec![] };
        let report = Report { resources, ..empty_report() };
        let text = report.to_text();
        assert!(text.contains("2 fds (pipe) ? open for up to 5.0s, opened at an unknown site: fd 3, 4"), "{text}");
        let lost = Lost { ring_full: 3, ledger_full: 2, ..Lost::default() };
        let text = Report { lost, execs: 2, ..report }.to_text();
        let first = text.lines().next().unwrap();
        assert!(first.ends_with("(LOST: 3 events dropped in a full ring (raise --ring-mib), 2 blocks past the ledger's limit (raise --max-live))"), "{first}");
        assert!(text.contains("the target exec'd (2 times)"), "{text}");
    }

    #[test]
    fn a_uss_not_read_in_time_is_said_to_be_unknown() {
        let now = Metrics { rss: 4096, vms: 8192, uss: None, fds: 3, threads: 1 };
        let process = Some(ProcessMetrics { now, since_attach: now.since(&Metrics { uss: Some(0), ..now }) });
        let text = Report { process, ..empty_report() }.to_text();
        assert!(text.contains(&format!("rss 4.0K (+0B), uss unknown ({USS_UNKNOWN}), vms 8.0K")), "{text}");
    }

    #[test]
    fn a_session_without_events_says_so_rather_than_show_an_empty_ledger() {
        let mut reporter = Reporter::new(
            std::process::id(),
            Selection { top: 5, sort: SortKey::Bytes, min_size: 0, max_size: None, min_age: Duration::ZERO },
        );
        reporter.untraced = Some("no ETW events (the kernel session could not be started)".into());
        let report = reporter.report(&Ledger::new(), &mut NoNames, 0, &|| true, Lost::default(), None);
        let text = report.to_text();
        let first = text.lines().next().unwrap();
        assert!(
            first.ends_with("no ETW events (the kernel session could not be started); its counters only"),
            "{text}"
        );
        assert!(text.contains("  process: rss "), "the counters are still shown: {text}");
        assert_eq!(serde_json::to_value(&report).unwrap()["untraced"], reporter.untraced.unwrap());
    }

    /// Names nothing: the ledger above is empty.
    struct NoNames;

    impl Describe for NoNames {
        fn site(&mut self, _: Origin) -> (Option<Frame>, Vec<Frame>) {
            (None, vec![])
        }

        fn fd_target(&self, _: i32) -> Option<String> {
            None
        }

        fn thread_name(&self, _: u32) -> Option<String> {
            None
        }
    }

    #[test]
    fn growth_counts_consecutive_increases_and_what_each_added() {
        let mut g = Growth::default();
        let key = (Memory::Mmap, 0);
        assert_eq!(g.update(key, 10), (1, 10), "a new site grew from nothing");
        assert_eq!(g.update(key, 20), (2, 10));
        assert_eq!(g.update(key, 20), (0, 0));
        assert_eq!(g.update(key, 5), (0, 0));
        assert_eq!(g.update(key, 30), (1, 25));
    }

    #[test]
    fn times_are_utc_rfc3339_to_the_millisecond() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_250, "2000-02-29T00:00:00.250Z"),
            (1_796_299_262_345, "2026-12-03T12:01:02.345Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        ];
        for (ms, expected) in cases {
            assert_eq!(rfc3339(Duration::from_millis(ms)), expected, "{ms} ms");
        }
    }

    #[test]
    fn the_text_tells_the_time_and_colours_only_when_asked() {
        let report = Report { lost: Lost { ring_full: 1, ..Lost::default() }, ..empty_report() };
        let plain = report.to_text();
        assert!(plain.starts_with("[12:01:02Z     9.0s] pid 1: heap 0B"), "{plain}");
        assert!(!plain.contains('\x1b'), "{plain}");
        let coloured = report.render(text::Paint { on: true });
        assert!(coloured.starts_with("\x1b[1m[12:01:02Z"), "{coloured}");
        assert!(coloured.contains("\x1b[31m (LOST: 1 events"), "the loss in red: {coloured}");
    }

    #[test]
    fn stopped_by_is_a_code_in_json_and_a_sentence_in_text() {
        let report = Report { is_final: true, stopped_by: Some(StoppedBy::TargetChangedUser), ..empty_report() };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            (&json["stopped_by"], &json["schema"], &json["final"]),
            (&"target_changed_user".into(), &SCHEMA.into(), &true.into())
        );
        assert!(report
            .to_text()
            .ends_with("psleak: stopped (the target exec'd a program that runs as another user)\n"));
    }
}
