//! What `psleak trace` shows each interval: the same content as text or as one JSON object.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backends::poll;
use crate::model::ledger::{Filter, Ledger, Mark, Memory, SiteId};
use crate::model::lost::Lost;
use crate::model::metrics::{Metrics, MetricsChange, USS_UNKNOWN};
use crate::sites::frame::{Describe, Frame};

#[derive(Debug, Serialize)]
pub struct Report {
    pub pid: u32,
    pub elapsed_s: f64,
    /// The last report of the session, and why it ended.
    #[serde(rename = "final")]
    pub is_final: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<&'static str>,
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
    pub suspects: Vec<Suspect>,
    #[serde(flatten)]
    pub resources: Resources,
}

/// The fds, threads, handles and heaps created since a mark and still open or alive.
#[derive(Debug, Serialize)]
pub struct Resources {
    pub fds: Vec<FdReport>,
    pub threads: Vec<ThreadReport>,
    /// Windows handles and private heaps (the ETW backend).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub handles: Vec<HandleReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heaps: Vec<HeapReport>,
}

impl Resources {
    /// Those created since `since`, each with its site; `age` turns a creation time into seconds.
    pub fn since(ledger: &Ledger, describe: &mut dyn Describe, since: Mark, age: impl Fn(u64) -> f64) -> Self {
        let fds = ledger
            .open_fds(since)
            .map(|(fd, f)| {
                let (site, stack) = describe.site(ledger.origin(f.site));
                let target = describe.fd_target(fd);
                FdReport { fd, kind: f.kind.describe(), target, age_s: age(f.ts_ns), site, stack }
            })
            .collect();
        let threads = ledger
            .live_threads(since)
            .map(|(tid, t)| {
                let (site, stack) = describe.site(ledger.origin(t.site));
                ThreadReport { tid, name: describe.thread_name(tid), age_s: age(t.ts_ns), site, stack }
            })
            .collect();
        let handles = ledger
            .open_handles(since)
            .map(|(handle, h)| {
                let (site, stack) = describe.site(ledger.origin(h.site));
                HandleReport { handle, kind: h.kind.describe(), age_s: age(h.ts_ns), site, stack }
            })
            .collect();
        let heaps = ledger
            .live_heaps(since)
            .map(|(heap, h)| {
                let (site, stack) = describe.site(ledger.origin(h.site));
                HeapReport { heap, age_s: age(h.ts_ns), site, stack }
            })
            .collect();
        Self { fds, threads, handles, heaps }
    }
}

/// Everything created since attach and still live (after the size and age filters).
#[derive(Debug, Serialize, Default)]
pub struct LiveTotals {
    pub heap_bytes: u64,
    pub heap_blocks: u64,
    pub mmap_bytes: u64,
    pub sites: usize,
}

#[derive(Debug, Serialize)]
pub struct ProcessMetrics {
    pub now: Metrics,
    pub since_attach: MetricsChange,
}

#[derive(Debug, Serialize)]
pub struct Suspect {
    #[serde(flatten)]
    pub memory: Memory,
    pub count: u64,
    pub bytes: u64,
    /// Live bytes of this site divided by the time since attach.
    pub bytes_per_s: f64,
    /// Consecutive reports in which this site's live bytes grew.
    pub growing_for: u32,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
}

#[derive(Debug, Serialize)]
pub struct FdReport {
    pub fd: i32,
    pub kind: String,
    /// What /proc says it is now: a path, socket:[inode], pipe:[inode]...
    pub target: Option<String>,
    pub age_s: f64,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
}

#[derive(Debug, Serialize)]
pub struct ThreadReport {
    pub tid: u32,
    pub name: Option<String>,
    pub age_s: f64,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
}

#[derive(Debug, Serialize)]
pub struct HandleReport {
    pub handle: u64,
    /// Object type and name, as ETW gave them.
    pub kind: String,
    pub age_s: f64,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
}

#[derive(Debug, Serialize)]
pub struct HeapReport {
    pub heap: u64,
    pub age_s: f64,
    pub site: Option<Frame>,
    pub stack: Vec<Frame>,
}

/// Which live memory the reports show.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    /// How many memory sites.
    pub top: usize,
    pub min_size: u64,
    pub max_size: Option<u64>,
    /// Memory younger than this is left out (short-lived allocations).
    pub min_age: Duration,
}

/// Turns one session's ledger into reports, following each site's growth between them.
pub struct Reporter {
    pid: u32,
    selection: Selection,
    growth: Growth,
    attached_at: Instant,
    /// The target's classic metrics at attach.
    baseline: Option<Metrics>,
    /// Why no events come, when the backend could not be had: the reports say so.
    pub untraced: Option<String>,
}

impl Reporter {
    pub fn new(pid: u32, selection: Selection) -> Self {
        let baseline = poll::metrics(pid).ok();
        Self { pid, selection, growth: Growth::default(), attached_at: Instant::now(), baseline, untraced: None }
    }

    /// The report now: `now_ns` on the clock of the events' timestamps; the classic metrics
    /// only while the target is `alive`.
    pub fn report(
        &mut self,
        ledger: &Ledger,
        describe: &mut dyn Describe,
        now_ns: u64,
        alive: bool,
        lost: Lost,
        stopped_by: Option<&'static str>,
    ) -> Report {
        let elapsed = self.attached_at.elapsed();
        let filter = Filter {
            created_by_ns: Some(now_ns.saturating_sub(self.selection.min_age.as_nanos() as u64)),
            min_size: self.selection.min_size,
            max_size: self.selection.max_size,
            ..Filter::default()
        };
        let sites = ledger.memory_by_site(&filter);
        let mut live = LiveTotals { sites: sites.len(), ..LiveTotals::default() };
        let mut suspects = Vec::new();
        for s in &sites {
            match s.memory {
                Memory::Heap(_) => {
                    live.heap_bytes = live.heap_bytes.saturating_add(s.bytes);
                    live.heap_blocks += s.count;
                }
                Memory::Mmap => live.mmap_bytes = live.mmap_bytes.saturating_add(s.bytes),
            }
            let growing_for = self.growth.update((s.memory, s.site), s.bytes);
            if suspects.len() < self.selection.top {
                let (site, stack) = describe.site(ledger.origin(s.site));
                suspects.push(Suspect {
                    memory: s.memory,
                    count: s.count,
                    bytes: s.bytes,
                    bytes_per_s: s.bytes as f64 / elapsed.as_secs_f64().max(1e-3),
                    growing_for,
                    site,
                    stack,
                });
            }
        }
        let age = |ts_ns: u64| now_ns.saturating_sub(ts_ns) as f64 / 1e9;
        let resources = Resources::since(ledger, describe, Mark::default(), age);
        let process = match (self.baseline, poll::metrics(self.pid)) {
            (Some(before), Ok(now)) if alive => Some(ProcessMetrics { now, since_attach: now.since(&before) }),
            _ => None,
        };
        Report {
            pid: self.pid,
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
    /// Records this report's bytes for a site and returns for how many reports it has grown.
    pub fn update(&mut self, key: (Memory, SiteId), bytes: u64) -> u32 {
        let entry = self.last.entry(key).or_insert((0, 0));
        entry.1 = if bytes > entry.0 { entry.1 + 1 } else { 0 };
        entry.0 = bytes;
        entry.1
    }
}

/// `+928B`, `+1.5K`, `+2.0M`: sizes as psleak prints them.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `+1.5K`, `-2.0M`, `+0B`: a change in size.
pub fn human_change(bytes: i64) -> String {
    let sign = if bytes < 0 { '-' } else { '+' };
    format!("{sign}{}", human_bytes(bytes.unsigned_abs()))
}

fn stack_lines(out: &mut String, stack: &[Frame]) {
    for frame in stack {
        let _ = writeln!(out, "        {}", frame.describe());
    }
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // The process's own counters: its fds, which on Windows are its handles.
        let fds = if cfg!(windows) { "handles" } else { "fds" };
        if let Some(why) = &self.untraced {
            let _ = writeln!(out, "[{:7.1}s] pid {}: {why}; its counters only", self.elapsed_s, self.pid);
        } else {
            let (open, kind) = if cfg!(windows) {
                (self.resources.handles.len(), "handles")
            } else {
                (self.resources.fds.len(), "fds")
            };
            let _ = writeln!(
                out,
                "[{:7.1}s] pid {}: heap {} in {} blocks, mmap {} live since attach; {open} {kind}, {} threads; {} events{}",
                self.elapsed_s,
                self.pid,
                human_bytes(self.live.heap_bytes),
                self.live.heap_blocks,
                human_bytes(self.live.mmap_bytes),
                self.resources.threads.len(),
                self.events,
                self.lost.describe(),
            );
        }
        if self.execs > 0 {
            let _ = writeln!(
                out,
                "  the target exec'd ({}): only what its current program made is shown",
                plural(self.execs as usize, "time")
            );
        }
        if let Some(p) = &self.process {
            let (now, d) = (p.now, p.since_attach);
            let _ = writeln!(
                out,
                "  process: rss {} ({}), uss {} ({}), vms {} ({}), {} {fds} ({:+}), {} threads ({:+}) since attach",
                human_bytes(now.rss),
                human_change(d.rss),
                now.uss.map_or("unknown".into(), human_bytes),
                d.uss.map_or(USS_UNKNOWN.into(), human_change),
                human_bytes(now.vms),
                human_change(d.vms),
                now.fds,
                d.fds,
                now.threads,
                d.threads,
            );
        }
        for (rank, s) in self.suspects.iter().enumerate() {
            let what = match s.memory {
                Memory::Heap(domain) => domain.name(),
                Memory::Mmap => "mmap",
            };
            let growing =
                if s.growing_for > 0 { format!(", growing for {} reports", s.growing_for) } else { String::new() };
            let _ = writeln!(
                out,
                "  #{} {} live in {} {what} blocks ({}/s){growing}, from {}",
                rank + 1,
                human_bytes(s.bytes),
                s.count,
                human_bytes(s.bytes_per_s as u64),
                site_text(&s.site),
            );
            stack_lines(&mut out, &s.stack);
        }
        // Fds and threads from the same site are told once, with their numbers.
        for group in group_by_site(&self.resources.fds, |fd| (fd.site.clone(), fd.kind.clone(), fd.target.clone())) {
            let first = group[0];
            let numbers = list_numbers(group.iter().map(|fd| fd.fd.to_string()));
            let oldest = group.iter().map(|fd| fd.age_s).fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "  {} ({}) {} open for up to {:.1}s, opened at {}: fd {numbers}",
                plural(group.len(), "fd"),
                first.kind,
                first.target.as_deref().unwrap_or("?"),
                oldest,
                site_text(&first.site),
            );
            stack_lines(&mut out, &first.stack);
        }
        for group in group_by_site(&self.resources.threads, |t| (t.site.clone(), t.name.clone())) {
            let first = group[0];
            let tids = list_numbers(group.iter().map(|t| t.tid.to_string()));
            let oldest = group.iter().map(|t| t.age_s).fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "  {} \"{}\" alive for up to {:.1}s, started at {}: tid {tids}",
                plural(group.len(), "thread"),
                first.name.as_deref().unwrap_or("?"),
                oldest,
                site_text(&first.site),
            );
            stack_lines(&mut out, &first.stack);
        }
        for group in group_by_site(&self.resources.handles, |h| (h.site.clone(), h.kind.clone())) {
            let first = group[0];
            let values = list_numbers(group.iter().map(|h| format!("{:#x}", h.handle)));
            let oldest = group.iter().map(|h| h.age_s).fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "  {} ({}) open for up to {:.1}s, opened at {}: {values}",
                plural(group.len(), "handle"),
                first.kind,
                oldest,
                site_text(&first.site),
            );
            stack_lines(&mut out, &first.stack);
        }
        for group in group_by_site(&self.resources.heaps, |h| h.site.clone()) {
            let first = group[0];
            let values = list_numbers(group.iter().map(|h| format!("{:#x}", h.heap)));
            let oldest = group.iter().map(|h| h.age_s).fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "  {} not destroyed for up to {:.1}s, created at {}: {values}",
                plural(group.len(), "heap"),
                oldest,
                site_text(&first.site),
            );
            stack_lines(&mut out, &first.stack);
        }
        if let Some(by) = self.stopped_by {
            let _ = writeln!(out, "psleak: stopped ({by})");
        }
        out
    }
}

fn site_text(site: &Option<Frame>) -> String {
    site.as_ref().map_or("an unknown site".into(), Frame::describe)
}

/// Items grouped by a key, in the order each key first appears.
fn group_by_site<T, K: PartialEq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<&T>> {
    let mut groups: Vec<(K, Vec<&T>)> = Vec::new();
    for item in items {
        let k = key(item);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(item),
            None => groups.push((k, vec![item])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `3, 4, 5`, or `3, 4, 5, 6, 7, 8, ... 61` past eight.
fn list_numbers(numbers: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = numbers.collect();
    match all.len() {
        0..=8 => all.join(", "),
        n => format!("{}, ... {}", all[..6].join(", "), all[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Origin;

    #[test]
    fn sizes_read_like_psleak() {
        assert_eq!(human_bytes(928), "928B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(2 << 20), "2.0M");
        assert_eq!(human_change(-1536), "-1.5K");
        assert_eq!(human_change(0), "+0B");
    }

    #[test]
    fn groups_keep_first_appearance_order() {
        let groups = group_by_site(&[1, 2, 11, 3, 12], |n| n / 10);
        assert_eq!(groups, vec![vec![&1, &2, &3], vec![&11, &12]]);
        assert_eq!(list_numbers((3..=12).map(|n| n.to_string())), "3, 4, 5, 6, 7, 8, ... 12");
        assert_eq!(plural(1, "fd"), "1 fd");
    }

    /// A report of nothing: no events, no process metrics, no resources.
    fn empty_report() -> Report {
        Report {
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
        let fd = |fd, age_s| FdReport { fd, kind: "pipe".into(), target: None, age_s, site: None, stack: vec![] };
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
            Selection { top: 5, min_size: 0, max_size: None, min_age: Duration::ZERO },
        );
        reporter.untraced = Some("no ETW events (the kernel session could not be started)".into());
        let report = reporter.report(&Ledger::new(), &mut NoNames, 0, true, Lost::default(), None);
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
    fn growth_counts_consecutive_increases() {
        let mut g = Growth::default();
        let key = (Memory::Mmap, 0);
        assert_eq!(g.update(key, 10), 1);
        assert_eq!(g.update(key, 20), 2);
        assert_eq!(g.update(key, 20), 0);
        assert_eq!(g.update(key, 30), 1);
    }
}
