//! Reports as text: the one place psleak formats sizes, sites and resources for people, for
//! `psleak trace` and, through the replies and `_native`, for the Python package.

use std::fmt::Write as _;

use super::{Fd, GrowingSite, Handle, Heap, Report, Sited, Thread};
use crate::model::ledger::Memory;
use crate::model::metrics::{OPEN_OBJECTS, USS_UNKNOWN};
use crate::sites::frame::{Frame, PyFrame};

/// `928B`, `1.5K`, `2.0M`: sizes as psleak prints them.
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

/// The site as text: the program's Python frame that called it, if there is one, then the
/// blamed native frame (or what to say when there is none).
pub fn site_text(site: &Option<Frame>, called_from: Option<&PyFrame>) -> String {
    let native = site.as_ref().map_or("an unknown site".into(), Frame::describe);
    match called_from {
        Some(python) => format!("{} → {native}", python.describe()),
        None => native,
    }
}

/// What a memory site's blocks are: `PyObject`, `malloc`, `mmap`.
pub fn memory_name(memory: Memory) -> &'static str {
    match memory {
        Memory::Heap(domain) => domain.name(),
        Memory::Mmap => "mmap",
    }
}

/// `f (x.c:3): 20 blocks, 10.0K live (malloc), +512B in the last batch, grown 3 batches in
/// a row, ~512.0B per call`: a site that grew, in a measurement of `calls` calls.
pub fn growing_site_text(g: &GrowingSite, site: &str, calls: u64) -> String {
    let per_call = if calls > 0 { g.bytes as f64 / calls as f64 } else { 0.0 };
    format!(
        "{site}: {} blocks, {} live ({}), +{} in the last batch, grown {} batches in a row, ~{per_call:.1}B per call",
        g.count,
        human_bytes(g.bytes),
        memory_name(g.memory),
        human_bytes(g.bytes_growth.max(0) as u64),
        g.streak,
    )
}

/// Whether the text is coloured (ANSI SGR), and how each part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paint {
    pub on: bool,
}

impl Paint {
    pub const PLAIN: Paint = Paint { on: false };

    fn with(self, code: &str, text: &str) -> String {
        // Nothing to colour (no losses, say) gets no escapes either.
        if self.on && !text.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Each report's first line.
    fn heading(self, text: &str) -> String {
        self.with("1", text)
    }

    /// Where something was made: what the user reads first.
    fn site(self, text: &str) -> String {
        self.with("33", text)
    }

    /// What was lost, or makes the report incomplete.
    fn warning(self, text: &str) -> String {
        self.with("31", text)
    }

    /// The stacks' frames, below what they explain.
    fn frame(self, text: &str) -> String {
        self.with("2", text)
    }
}

impl Report {
    pub fn to_text(&self) -> String {
        self.render(Paint::PLAIN)
    }

    /// The report as text, coloured when `paint` is on (a terminal).
    pub fn render(&self, paint: Paint) -> String {
        let mut out = String::new();
        self.summary_lines(&mut out, paint);
        self.suspect_lines(&mut out, paint);
        // Resources from the same site are told once, with their numbers.
        resource_lines(&mut out, &self.resources.fds, paint);
        resource_lines(&mut out, &self.resources.threads, paint);
        resource_lines(&mut out, &self.resources.handles, paint);
        resource_lines(&mut out, &self.resources.heaps, paint);
        if let Some(by) = self.stopped_by {
            let _ = writeln!(out, "psleak: stopped ({})", by.describe());
        }
        out
    }

    /// The first line (what is live, and what was lost), then the process's own counters.
    fn summary_lines(&self, out: &mut String, paint: Paint) {
        // A backend sees fds (Linux) or handles (Windows), never both.
        let open = self.resources.fds.len() + self.resources.handles.len();
        let kind = OPEN_OBJECTS;
        // `[12:01:02Z    5.0s]`: the time of day (UTC) and the time since attach.
        let when = format!("[{}Z {:7.1}s]", self.time.get(11..19).unwrap_or("??:??:??"), self.elapsed_s);
        if let Some(why) = &self.untraced {
            let _ = writeln!(out, "{}", paint.heading(&format!("{when} pid {}: {why}; its counters only", self.pid)));
        } else {
            let heading = format!(
                "{when} pid {}: heap {} in {} blocks, mmap {} live since attach; {open} {kind}, {} threads; {} events",
                self.pid,
                human_bytes(self.live.heap_bytes),
                self.live.heap_blocks,
                human_bytes(self.live.mmap_bytes),
                self.resources.threads.len(),
                self.events,
            );
            let _ = writeln!(out, "{}{}", paint.heading(&heading), paint.warning(&self.lost.describe()));
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
                "  process: rss {} ({}), uss {} ({}), vms {} ({}), {} {kind} ({:+}), {} threads ({:+}) since attach",
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
    }

    fn suspect_lines(&self, out: &mut String, paint: Paint) {
        for (rank, s) in self.suspects.iter().enumerate() {
            let m = &s.resource;
            let growing =
                if m.growing_for > 0 { format!(", growing for {} reports", m.growing_for) } else { String::new() };
            let _ = writeln!(
                out,
                "  #{} {} live in {} {} blocks ({}/s){growing}, from {}",
                rank + 1,
                human_bytes(m.bytes),
                m.count,
                memory_name(m.memory),
                human_bytes(m.bytes_per_s as u64),
                paint.site(&s.site_text),
            );
            stack_lines(out, s, paint);
        }
    }
}

/// How a kind of resource is told: `2 fds (pipe) pipe:[7] open for up to 1.0s, opened at
/// f (x.c:3): fd 3, 4`.
trait Told {
    /// What one is called: `fd`.
    const NOUN: &'static str;
    /// How it has been since: `open`, `alive`, `not destroyed`.
    const STATE: &'static str;
    /// What made it: `opened`, `started`, `created`.
    const MADE: &'static str;
    /// Before its number: `fd `, `tid `.
    const LABEL: &'static str;
    /// What those of one site share to be told together, after the noun: ` (pipe) pipe:[7]`.
    fn detail(&self) -> String;
    fn number(&self) -> String;
    fn age_s(&self) -> f64;
}

impl Told for Fd {
    const NOUN: &'static str = "fd";
    const STATE: &'static str = "open";
    const MADE: &'static str = "opened";
    const LABEL: &'static str = "fd ";
    fn detail(&self) -> String {
        format!(" ({}) {}", self.kind, self.target.as_deref().unwrap_or("?"))
    }
    fn number(&self) -> String {
        self.fd.to_string()
    }
    fn age_s(&self) -> f64 {
        self.age_s
    }
}

impl Told for Thread {
    const NOUN: &'static str = "thread";
    const STATE: &'static str = "alive";
    const MADE: &'static str = "started";
    const LABEL: &'static str = "tid ";
    fn detail(&self) -> String {
        format!(" \"{}\"", self.name.as_deref().unwrap_or("?"))
    }
    fn number(&self) -> String {
        self.tid.to_string()
    }
    fn age_s(&self) -> f64 {
        self.age_s
    }
}

impl Told for Handle {
    const NOUN: &'static str = "handle";
    const STATE: &'static str = "open";
    const MADE: &'static str = "opened";
    const LABEL: &'static str = "";
    fn detail(&self) -> String {
        format!(" ({})", self.kind)
    }
    fn number(&self) -> String {
        format!("{:#x}", self.handle)
    }
    fn age_s(&self) -> f64 {
        self.age_s
    }
}

impl Told for Heap {
    const NOUN: &'static str = "heap";
    const STATE: &'static str = "not destroyed";
    const MADE: &'static str = "created";
    const LABEL: &'static str = "";
    fn detail(&self) -> String {
        String::new()
    }
    fn number(&self) -> String {
        format!("{:#x}", self.heap)
    }
    fn age_s(&self) -> f64 {
        self.age_s
    }
}

/// One line per site and detail, with the numbers of all its resources and the oldest's age.
fn resource_lines<T: Told>(out: &mut String, items: &[Sited<T>], paint: Paint) {
    for group in group_by(items, |s| (s.site.clone(), s.resource.detail())) {
        let first = group[0];
        let numbers = list_numbers(group.iter().map(|s| s.resource.number()));
        let oldest = group.iter().map(|s| s.resource.age_s()).fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "  {}{} {} for up to {oldest:.1}s, {} at {}: {}{numbers}",
            plural(group.len(), T::NOUN),
            first.resource.detail(),
            T::STATE,
            T::MADE,
            paint.site(&first.site_text),
            T::LABEL,
        );
        stack_lines(out, first, paint);
    }
}

/// The native frames, innermost first, then the Python frames that called into them.
fn stack_lines<T>(out: &mut String, sited: &Sited<T>, paint: Paint) {
    let native = sited.stack.iter().map(Frame::describe);
    for frame in native.chain(sited.python.iter().map(PyFrame::describe)) {
        let _ = writeln!(out, "        {}", paint.frame(&frame));
    }
}

/// Items grouped by a key, in the order each key first appears.
fn group_by<T, K: PartialEq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<&T>> {
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
        let groups = group_by(&[1, 2, 11, 3, 12], |n| n / 10);
        assert_eq!(groups, vec![vec![&1, &2, &3], vec![&11, &12]]);
        assert_eq!(list_numbers((3..=12).map(|n| n.to_string())), "3, 4, 5, 6, 7, 8, ... 12");
        assert_eq!(plural(1, "fd"), "1 fd");
    }
}
