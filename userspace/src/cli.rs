//! The `psleak` command line, shared by the `psleak` binary and the Python package's `psleak`
//! script (`python -m psleak`), so that `pip install psleak` gives the daemon and the tracer too.
//! On Linux `trace` runs the eBPF probes and `daemon` serves them; on Windows `trace` runs ETW.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::error::{exit_status, say};
use crate::report::{Selection, SortKey};
#[cfg(target_os = "linux")]
use crate::serve::{
    daemon::{self, DaemonArgs},
    session,
};
#[cfg(target_os = "linux")]
use crate::trace::ebpf::{self as trace, TraceArgs};
use crate::trace::{Colour, Output};
#[cfg(target_os = "linux")]
use psleak_ebpf::Options;

/// Leak observer for Python code and native extensions.
#[derive(Parser)]
#[command(name = "psleak", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to a running process (--pid), or start a command (after --), and show what it
    /// creates and keeps: memory by site, fds and threads opened since attach and still open.
    Trace(TraceCli),
    /// Serve unprivileged test processes over a Unix socket: run as root, e.g. on a CI runner.
    /// Each client may trace only its own uid's processes.
    #[cfg(target_os = "linux")]
    Daemon(DaemonCli),
    /// Show where psleak's uprobes go in a process and whether the kernel emulates the
    /// instruction each sits on (a single-stepped one costs several times more a hit).
    #[cfg(target_os = "linux")]
    Probes(ProbesCli),
}

#[cfg(target_os = "linux")]
#[derive(clap::Args)]
struct ProbesCli {
    /// The process whose libc and Python would be probed.
    #[arg(long, short)]
    pid: u32,
    /// One JSON object per probed function, one per line.
    #[arg(long)]
    json: bool,
}

#[cfg(target_os = "linux")]
#[derive(clap::Args)]
struct DaemonCli {
    /// The socket to listen on (the Python package looks at $PSLEAK_SOCKET, else this default).
    #[arg(long, default_value = crate::serve::protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Permission bits of the socket, in octal: 600 admits root only; 660 with --socket-group
    /// admits that group; 666 admits every local user.
    #[arg(long, default_value = "600", value_parser = octal_mode)]
    socket_mode: u32,
    /// Group (name or gid) that owns the socket.
    #[arg(long)]
    socket_group: Option<String>,
    /// End a session whose client has asked nothing for this many seconds.
    #[arg(long, default_value = "3600", value_parser = positive_seconds)]
    idle_timeout: Duration,
    /// Sessions served at once, at most (each holds its own probes and a --ring-mib event ring).
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Sessions one user (uid) may hold at once.
    #[arg(long, default_value_t = 16)]
    max_sessions_per_user: usize,
    /// Connections one user may hold at once, sessions included.
    #[arg(long, default_value_t = 32)]
    max_connections_per_user: usize,
    /// Heap blocks and mappings each session follows at most; past it, new ones are counted
    /// as lost (~150 bytes each).
    #[arg(long, default_value_t = session::DEFAULT_LEDGER_ROOM)]
    max_live: usize,
    /// Ask the daemon on --socket for its sessions and state, print them as JSON, and exit.
    #[arg(long)]
    status: bool,
    /// Kernel BTF file, for kernels without /sys/kernel/btf/vmlinux.
    #[arg(long)]
    btf: Option<PathBuf>,
    /// Size of each session's kernel event ring in MiB (a power of two).
    #[arg(long, default_value_t = DEFAULT_RING_MIB, value_parser = ring_mib)]
    ring_mib: u32,
}

#[cfg(target_os = "linux")]
fn octal_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("`{s}` is not a permission mode in octal (e.g. 600, 660)")),
    }
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "command"])))]
struct TraceCli {
    /// The process to trace.
    #[arg(long, short)]
    pid: Option<u32>,
    /// A command to start and trace from its first instruction: `psleak trace -- ./prog ARGS`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
    /// Seconds between reports.
    #[arg(long, short, default_value = "5", value_parser = positive_seconds)]
    interval: Duration,
    /// Stop after this many seconds (default: until Ctrl-C or the target exits).
    #[arg(long, short, value_parser = positive_seconds)]
    duration: Option<Duration>,
    /// One JSON object per report, one per line (the layout: docs/trace-json.md).
    #[arg(long)]
    json: bool,
    /// Write the reports to this file instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Colour the text: auto (on a terminal, unless NO_COLOR is set), always or never.
    #[arg(long, value_enum, default_value_t = ColourArg::Auto)]
    color: ColourArg,
    /// How many memory sites to show (at most 1000).
    #[arg(long, default_value_t = crate::report::DEFAULT_TOP, value_parser = report_sites)]
    top: usize,
    /// Which memory sites first: most live bytes, most live blocks, or fastest growing since
    /// the previous report.
    #[arg(long, value_enum, default_value_t = SortArg::Bytes)]
    sort: SortArg,
    /// Ignore allocations and mappings smaller than this many bytes.
    #[arg(long, default_value_t = 0)]
    min_size: u64,
    /// Ignore allocations and mappings larger than this many bytes.
    #[arg(long)]
    max_size: Option<u64>,
    /// Ignore memory younger than this many seconds (short-lived allocations).
    #[arg(long, default_value = "0", value_parser = non_negative_seconds)]
    min_age: Duration,
    /// Trace through the psleak daemon on this socket (also $PSLEAK_SOCKET): what a user who
    /// may not load probes does. Without it, psleak loads its own probes if it may, else uses
    /// the daemon on /run/psleak.sock if there is one.
    #[cfg(target_os = "linux")]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Heap blocks and mappings followed at most; past it, new ones are counted as lost
    /// (~150 bytes each) [default: 2000000].
    #[cfg(target_os = "linux")]
    #[arg(long)]
    max_live: Option<usize>,
    /// Kernel BTF file, for kernels without /sys/kernel/btf/vmlinux.
    #[cfg(target_os = "linux")]
    #[arg(long)]
    btf: Option<PathBuf>,
    /// Size of the kernel event ring in MiB (a power of two); raise it if events are lost
    /// [default: 32].
    #[cfg(target_os = "linux")]
    #[arg(long, value_parser = ring_mib)]
    ring_mib: Option<u32>,
    /// Probe every function at its entry instead of on an emulated instruction (for `cargo xtask bench`).
    #[cfg(target_os = "linux")]
    #[arg(long, hide = true)]
    probes_at_entry: bool,
    /// Attach the probes with programs that do nothing (the floor, for `cargo xtask bench`).
    #[cfg(target_os = "linux")]
    #[arg(long, hide = true)]
    empty_probes: bool,
    /// Attach the allocators' entry probes before their returns (for the attach-race test).
    #[cfg(target_os = "linux")]
    #[arg(long, hide = true)]
    entry_probes_first: bool,
    /// Do not read the Python stack of each creation: cheaper per event, and the sites are then
    /// grouped by their native stack alone.
    #[cfg(target_os = "linux")]
    #[arg(long)]
    no_python_frames: bool,
    /// Bytes of each creation's stack copied for unwinding: 512, 1024, 1536 or 2048. Less is
    /// cheaper per event and reaches fewer frames.
    #[cfg(target_os = "linux")]
    #[arg(long, default_value_t = psleak_ebpf::MAX_STACK_BYTES, value_parser = stack_bytes)]
    stack_depth: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ColourArg {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SortArg {
    Bytes,
    Count,
    Rate,
}

impl TraceCli {
    fn selection(&self) -> Selection {
        let sort = match self.sort {
            SortArg::Bytes => SortKey::Bytes,
            SortArg::Count => SortKey::Count,
            SortArg::Rate => SortKey::Rate,
        };
        Selection { top: self.top, sort, min_size: self.min_size, max_size: self.max_size, min_age: self.min_age }
    }

    /// The options given that set up psleak's own probes, which a daemon's session does not take.
    #[cfg(target_os = "linux")]
    fn own_probe_options(&self) -> Vec<&'static str> {
        let given = [
            ("--btf", self.btf.is_some()),
            ("--ring-mib", self.ring_mib.is_some()),
            ("--max-live", self.max_live.is_some()),
            ("--probes-at-entry", self.probes_at_entry),
            ("--empty-probes", self.empty_probes),
            ("--entry-probes-first", self.entry_probes_first),
        ];
        given.into_iter().filter_map(|(name, given)| given.then_some(name)).collect()
    }

    fn output(&self) -> Result<Output, crate::error::Error> {
        let colour = match self.color {
            ColourArg::Auto => Colour::Auto,
            ColourArg::Always => Colour::Always,
            ColourArg::Never => Colour::Never,
        };
        Output::open(self.json, colour, self.output.as_deref())
    }
}

/// The event ring's size unless told otherwise, in MiB.
#[cfg(target_os = "linux")]
const DEFAULT_RING_MIB: u32 = 32;

/// The longest wait any option may ask for: a century, in seconds.
const MAX_SECONDS: f64 = 100.0 * 365.25 * 24.0 * 3600.0;

fn non_negative_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > MAX_SECONDS => {
            Err(format!("`{s}` seconds is longer than psleak waits (at most {MAX_SECONDS:.0})"))
        }
        Ok(v) if v >= 0.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("`{s}` is not a number of seconds")),
    }
}

fn positive_seconds(s: &str) -> Result<Duration, String> {
    match non_negative_seconds(s)? {
        v if !v.is_zero() => Ok(v),
        _ => Err("must be more than 0 seconds".into()),
    }
}

fn report_sites(s: &str) -> Result<usize, String> {
    use crate::serve::protocol::MAX_REPORT_SITES;
    match s.parse::<usize>() {
        Ok(top) if top <= MAX_REPORT_SITES => Ok(top),
        _ => Err(format!("`{s}` is not a number of sites from 0 to {MAX_REPORT_SITES}")),
    }
}

#[cfg(target_os = "linux")]
fn stack_bytes(s: &str) -> Result<u32, String> {
    let bytes = s.parse::<u32>().map_err(|_| format!("`{s}` is not 512, 1024, 1536 or 2048 (bytes)"))?;
    psleak_ebpf::check_stack_bytes(bytes)
}

#[cfg(target_os = "linux")]
fn ring_mib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v.is_power_of_two() && v <= 1024 => Ok(v),
        _ => Err(format!("`{s}` is not a power of two between 1 and 1024")),
    }
}

/// clap's refusal of a command line in one line: what is wrong (clap spreads it over lines,
/// its tips too), then the usage, and where more is said.
fn one_line(rendered: &str) -> String {
    let (what, usage) = rendered.split_once("Usage:").unwrap_or((rendered, ""));
    let usage = usage.lines().next().unwrap_or("").trim();
    let mut said = String::new();
    for line in what.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        if !said.is_empty() {
            said.push_str(if line.starts_with("tip:") { "; " } else { " " });
        }
        said.push_str(line);
    }
    let what = said.strip_prefix("error: ").unwrap_or(&said);
    match usage {
        "" => format!("{what} (--help says more)"),
        usage => format!("{what} (usage: {usage}; --help says more)"),
    }
}

/// Runs the command line `args` (the program name first); returns the exit status: 0, or 2
/// after one line on stderr saying what went wrong.
pub fn run<T: Into<OsString> + Clone>(args: impl IntoIterator<Item = T>) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // `psleak` alone: its help, which lists the commands, and a failure.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return 2;
        }
        Err(e) if e.use_stderr() => {
            say(&format!("psleak: {}", one_line(&e.render().to_string())));
            return 2;
        }
        Err(e) => {
            let _ = e.print(); // --help, --version
            return 0;
        }
    };
    raise_open_files_limit();
    match cli.command {
        Command::Trace(t) => run_trace(&t),
        #[cfg(target_os = "linux")]
        Command::Daemon(d) => run_daemon(d),
        #[cfg(target_os = "linux")]
        Command::Probes(p) => exit_status(crate::backends::ebpf::tracer::print_probe_places(p.pid, p.json)),
    }
}

/// Each session holds a few dozen fds (probes, maps, links, the ring): the soft limit a
/// service gets by default (1024) would run out long before --max-sessions. The hard limit is
/// ours to take.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: valid out-pointer, then the same struct back.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

fn run_trace(t: &TraceCli) -> u8 {
    if t.max_size.is_some_and(|max| max < t.min_size) {
        eprintln!("psleak: --max-size is smaller than --min-size: nothing would be shown");
        return 2;
    }
    let (interval, duration) = (t.interval, t.duration);
    let output = match t.output() {
        Ok(output) => output,
        Err(e) => return exit_status(Err(e)),
    };
    #[cfg(target_os = "linux")]
    let target = match t.pid {
        Some(pid) => trace::Target::Pid(pid),
        None => trace::Target::Command(t.command.clone()),
    };
    #[cfg(target_os = "linux")]
    let result = trace::run(
        &TraceArgs {
            target,
            interval,
            duration,
            selection: t.selection(),
            options: Options {
                btf: t.btf.clone(),
                ring_bytes: t.ring_mib.unwrap_or(DEFAULT_RING_MIB) << 20,
                probes_at_entry: t.probes_at_entry,
                allocators: psleak_ebpf::Allocators::All,
                empty_programs: t.empty_probes,
                entry_probes_first: t.entry_probes_first,
                python_frames: !t.no_python_frames,
                stack_bytes: t.stack_depth,
            },
            ledger_room: t.max_live.unwrap_or(session::DEFAULT_LEDGER_ROOM),
            socket: t
                .socket
                .clone()
                .or_else(|| std::env::var_os("PSLEAK_SOCKET").filter(|s| !s.is_empty()).map(PathBuf::from)),
            own_probe_options: t.own_probe_options(),
        },
        output,
    );
    #[cfg(windows)]
    let result = match t.pid {
        Some(pid) => crate::trace::etw::run(pid, interval, duration, output, t.selection()),
        None => Err(crate::error::Error::Refused(
            "starting a command to trace is Linux only: start it, then use --pid".into(),
        )),
    };
    exit_status(result)
}

#[cfg(target_os = "linux")]
fn run_daemon(d: DaemonCli) -> u8 {
    exit_status(if d.status {
        daemon::print_status(&d.socket)
    } else {
        daemon::run(DaemonArgs {
            socket: d.socket,
            mode: d.socket_mode,
            group: d.socket_group,
            idle_limit: d.idle_timeout,
            max_sessions: d.max_sessions,
            max_user_sessions: d.max_sessions_per_user,
            max_user_connections: d.max_connections_per_user,
            ledger_room: d.max_live,
            options: Options { btf: d.btf, ring_bytes: d.ring_mib << 20, ..Options::default() },
        })
    })
}
