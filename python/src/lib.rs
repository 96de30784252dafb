//! `psleak._native`: what the Python package needs from Rust — the classic metrics of its own
//! process, its fds and threads (handles and heaps on Windows), and the private collector that
//! a child process runs (eBPF on Linux, ETW on Windows).

#[cfg(target_os = "linux")]
use std::os::fd::FromRawFd;
#[cfg(target_os = "linux")]
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use psleak::backends::poll;
use psleak::model::lost::Lost;
use psleak::model::metrics::MemoryUse;
use psleak::model::verdict;
#[cfg(target_os = "linux")]
use psleak::{backends::ebpf::tracer, serve::session};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashMap;

/// psleak's memory metrics of this process (heap, mmap, uss, rss, vms), and CPython's
/// allocated blocks. `own_heap` makes its reading independent of what the reader allocated and
/// freed before; vms is read right after it, which may have moved the heap's top (`mapped`
/// subtracts one from the other: both must see the same top).
#[derive(Clone, Copy)]
struct MemoryReading {
    heap: poll::HeapUse,
    memory: MemoryUse,
    py_blocks: isize,
}

impl MemoryReading {
    fn now(py: Python<'_>) -> PyResult<Self> {
        // `sys.getallocatedblocks()` counts before it makes its int, which is gone again when
        // read: both readings see the same of it. (CPython 3.12 stopped exporting the C function.)
        let py_blocks: isize = py.import("sys")?.getattr("getallocatedblocks")?.call0()?.extract()?;
        let heap = poll::own_heap();
        let memory = psleak::backends::poll::own_memory().map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(Self { heap, memory, py_blocks })
    }

    fn fields(&self) -> [(&'static str, i64); 5] {
        let MemoryUse { rss, vms, uss } = self.memory;
        let poll::HeapUse { heap_used, mmap_used, .. } = self.heap;
        [("heap", heap_used), ("mmap", mmap_used), ("uss", uss), ("rss", rss), ("vms", vms)]
            .map(|(name, bytes)| (name, bytes as i64))
    }

    /// The counters only psleak's own readings have (psleak 0.1.6 had none of them): CPython's
    /// blocks, and the mappings outside the allocator (vms less all it holds from the system).
    fn exact_only(&self) -> [(&'static str, i64); 2] {
        let mapped = self.memory.vms as i64 - self.heap.from_system as i64;
        [("py_blocks", self.py_blocks as i64), ("mapped", mapped)]
    }
}

/// The reading `memory_since_mark` compares with. Kept here rather than handed to the caller:
/// a Python object made after the heap was read and held across the calls would itself count
/// as growth (a dict and five ints, ~700 bytes per batch).
static MEMORY_MARK: Mutex<Option<MemoryReading>> = Mutex::new(None);

/// The other threads' time on a CPU at the mark: the counters are this thread's alone only if
/// none of them ran meanwhile.
static OTHERS_MARK: Mutex<Option<Vec<(u32, u64)>>> = Mutex::new(None);

/// (tid, nanoseconds on a CPU) of every thread of this process but the calling one, sorted;
/// None where the system does not tell (the counters are then taken as this thread's).
#[cfg(target_os = "linux")]
fn others_cpu() -> Option<Vec<(u32, u64)>> {
    // "/proc/thread-self" links to "PID/task/TID" of the calling thread.
    let own: u32 = std::fs::read_link("/proc/thread-self").ok()?.file_name()?.to_str()?.parse().ok()?;
    let mut times = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let Some(tid) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<u32>().ok()) else { continue };
        if tid == own {
            continue;
        }
        // A thread that ended since the listing ran meanwhile: u64::MAX never matches.
        let ns = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(u64::MAX);
        times.push((tid, ns));
    }
    times.sort_unstable();
    Some(times)
}

#[cfg(not(target_os = "linux"))]
fn others_cpu() -> Option<Vec<(u32, u64)>> {
    None
}

/// Whether every thread there was at the mark is still there and has not run since. Threads
/// that started since are the calls' own: what they did is the calls'.
fn others_idle(mark: &Option<Vec<(u32, u64)>>, now: &Option<Vec<(u32, u64)>>) -> bool {
    match (mark, now) {
        (Some(mark), Some(now)) => {
            mark.iter().all(|(tid, ns)| now.binary_search_by_key(tid, |&(t, _)| t).is_ok_and(|i| now[i].1 == *ns))
        }
        _ => true,
    }
}

/// heap, mmap, uss, rss and vms of this process, in bytes (psleak's memory metrics).
#[pyfunction]
fn memory(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, bytes) in MemoryReading::now(py)?.fields() {
        d.set_item(name, bytes)?;
    }
    Ok(d)
}

/// Takes the reading that `memory_since_mark` compares with.
#[pyfunction]
fn mark_memory(py: Python<'_>) -> PyResult<()> {
    *OTHERS_MARK.lock().unwrap_or_else(|e| e.into_inner()) = others_cpu();
    let reading = MemoryReading::now(py)?;
    *MEMORY_MARK.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
    Ok(())
}

/// How much each of `memory()`'s metrics grew since `mark_memory()`, in bytes; how much the
/// counters only psleak reads grew (`py_blocks`, in blocks; `mapped`, in bytes); and whether
/// no other thread ran meanwhile (the counters are this thread's alone).
#[pyfunction]
fn memory_since_mark(py: Python<'_>) -> PyResult<(Bound<'_, PyDict>, Bound<'_, PyDict>, bool)> {
    let now = MemoryReading::now(py)?;
    let alone = others_idle(&OTHERS_MARK.lock().unwrap_or_else(|e| e.into_inner()), &others_cpu());
    let mark = MEMORY_MARK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or_else(|| PyRuntimeError::new_err("memory_since_mark() needs mark_memory() first"))?;
    let growth = |after: &[(&'static str, i64)], before: &[(&'static str, i64)]| -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        for ((name, after), (_, before)) in after.iter().zip(before) {
            d.set_item(name, after - before)?;
        }
        Ok(d)
    };
    Ok((growth(&now.fields(), &mark.fields())?, growth(&now.exact_only(), &mark.exact_only())?, alone))
}

/// One `execute()`'s memory verdict (psleak::model::verdict::Judge), fed a batch at a time.
#[pyclass(module = "psleak._native")]
struct Judge(verdict::Judge);

fn metric(name: &str) -> PyResult<verdict::Metric> {
    verdict::Metric::named(name).ok_or_else(|| PyValueError::new_err(format!("no metric {name:?}")))
}

fn verdict_named(name: &str) -> PyResult<verdict::Verdict> {
    match name {
        "leak" => Ok(verdict::Verdict::Leak),
        "clean" => Ok(verdict::Verdict::Clean),
        "undecided" => Ok(verdict::Verdict::Undecided),
        _ => Err(PyValueError::new_err(format!("no verdict {name:?}"))),
    }
}

#[pymethods]
impl Judge {
    /// `tolerance`: growth allowed per batch, by metric name.
    #[new]
    fn new(tolerance: HashMap<String, u64>, retries: u32, confirm: u32) -> PyResult<Self> {
        let tolerance = tolerance.iter().map(|(name, bytes)| Ok((metric(name)?, *bytes))).collect::<PyResult<_>>()?;
        Ok(Self(verdict::Judge::new(tolerance, retries, confirm)))
    }

    /// Judges a batch of `calls` from each metric's growth (`exact`: read by psleak around
    /// the batch alone) and, for a traced batch, the tracer's verdict on its sites. Returns the
    /// verdict ("leak", "clean", "undecided"), the exact counters that grew, and whether the
    /// batches ran out.
    #[pyo3(signature = (calls, growth, exact, sites=None))]
    fn batch(
        &mut self,
        calls: u64,
        growth: HashMap<String, i64>,
        exact: bool,
        sites: Option<&str>,
    ) -> PyResult<(&'static str, Vec<&'static str>, bool)> {
        let growth = growth.iter().map(|(name, g)| Ok((metric(name)?, *g))).collect::<PyResult<_>>()?;
        let sites = sites.map(verdict_named).transpose()?;
        let judged = self.0.batch(&verdict::Readings { calls, growth, exact, sites });
        let verdict = match judged.verdict {
            verdict::Verdict::Leak => "leak",
            verdict::Verdict::Clean => "clean",
            verdict::Verdict::Undecided => "undecided",
        };
        Ok((verdict, judged.grown.iter().map(|m| m.name()).collect(), judged.exhausted))
    }
}

/// A size as psleak prints it everywhere (`928B`, `1.5K`): psleak::report::text's.
#[pyfunction]
fn human_bytes(bytes: u64) -> String {
    psleak::report::text::human_bytes(bytes)
}

/// What leaves the tracer's ledger incomplete between two of its replies' `lost` counts, as
/// text (empty when nothing does).
#[pyfunction]
fn missed_events(before: HashMap<String, u64>, after: HashMap<String, u64>) -> PyResult<String> {
    let lost = |counts: HashMap<String, u64>| {
        serde_json::to_value(counts)
            .and_then(serde_json::from_value::<Lost>)
            .map_err(|e| PyValueError::new_err(format!("not a collector's lost counts: {e}")))
    };
    Ok(lost(after)?.since(&lost(before)?).incomplete_text())
}

/// What to say when the tracer saw no site grow while these counters did.
#[pyfunction]
fn unnamed(grown: Vec<String>) -> PyResult<String> {
    let grown = grown.iter().map(|name| metric(name)).collect::<PyResult<Vec<_>>>()?;
    Ok(verdict::unnamed(&grown))
}

/// Gives free heap memory back to the system (malloc_trim).
#[pyfunction]
fn heap_trim() {
    poll::trim_own_heap();
}

/// [(fd, what it refers to, its kind)] for this process: kind is "file", "pipe",
/// "AF_INET SOCK_STREAM"... (on Linux; elsewhere what the OS names, or the target again).
#[cfg(unix)]
#[pyfunction]
fn open_fds() -> PyResult<Vec<(i32, String, String)>> {
    let fds = poll::open_fds(std::process::id()).map_err(|e| PyOSError::new_err(e.to_string()))?;
    #[cfg(target_os = "linux")]
    let kind = |fd: i32, _: &str| poll::own_fd_kind(fd).describe();
    #[cfg(not(target_os = "linux"))]
    let kind = |_: i32, target: &str| target.to_string();
    Ok(fds
        .into_iter()
        .map(|(fd, target)| {
            let kind = kind(fd, &target);
            (fd, target, kind)
        })
        .collect())
}

/// [(tid, name)] for this process.
#[pyfunction]
fn threads() -> PyResult<Vec<(u32, String)>> {
    poll::threads(std::process::id()).map_err(|e| PyOSError::new_err(e.to_string()))
}

/// Why this process cannot load the probes, or None when it can.
#[cfg(target_os = "linux")]
#[pyfunction]
fn tracer_unavailable() -> Option<String> {
    tracer::check_prerequisites(&psleak_ebpf::Options::default()).err().map(|e| e.to_string())
}

/// Why this process cannot start the ETW sessions, or None when it can.
#[cfg(windows)]
#[pyfunction]
fn tracer_unavailable() -> Option<String> {
    (!psleak_etw::session::is_elevated())
        .then(|| "ETW's kernel session needs an administrator (an elevated prompt)".into())
}

/// Why this process cannot trace itself: psleak's tracers are eBPF's and ETW's.
#[cfg(not(any(target_os = "linux", windows)))]
#[pyfunction]
fn tracer_unavailable() -> Option<String> {
    Some("the exact tracer needs Linux (eBPF) or Windows (ETW)".into())
}

/// The `psleak` command line (`argv` with the program name first): its exit status.
#[cfg(any(target_os = "linux", windows))]
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> u8 {
    py.detach(|| psleak::cli::run(argv))
}

/// Runs a private collector for `pid` over the connected Unix socket `fd` (taken over), until
/// the client hangs up or `pid` exits, probing the `allocators` families ("all", "python" or
/// "none"). `PSLEAK_MAX_LIVE` bounds its ledger (blocks and mappings).
#[cfg(target_os = "linux")]
#[pyfunction]
fn serve_collector(py: Python<'_>, fd: i32, pid: u32, allocators: &str) -> PyResult<()> {
    let allocators = allocators.parse().map_err(PyValueError::new_err)?;
    let options = psleak_ebpf::Options { allocators, ..psleak_ebpf::Options::default() };
    // SAFETY: the caller hands over an open socket fd that nothing else will use.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let room = match std::env::var("PSLEAK_MAX_LIVE") {
        Err(_) => session::DEFAULT_LEDGER_ROOM,
        Ok(value) => value.trim().parse().map_err(|_| {
            PyRuntimeError::new_err(format!("PSLEAK_MAX_LIVE must be a number of blocks (got {value:?})"))
        })?,
    };
    py.detach(|| session::serve(stream, pid, &options, room)).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Runs a private collector for `pid` over the connected loopback socket `socket` (taken over;
/// shared by the test process), until the client hangs up or `pid` exits. ETW's providers are
/// the same for every question: `allocators` is not looked at.
#[cfg(windows)]
#[pyfunction]
fn serve_collector(py: Python<'_>, socket: u64, pid: u32, allocators: &str) -> PyResult<()> {
    let _ = allocators;
    use std::os::windows::io::FromRawSocket;
    // SAFETY: the caller hands over an open socket that nothing else will use.
    let stream = unsafe { std::net::TcpStream::from_raw_socket(socket) };
    py.detach(|| psleak::serve::etw_session::serve(stream, pid)).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The number of open handles of this process.
#[cfg(windows)]
#[pyfunction]
fn handle_count() -> PyResult<u64> {
    poll::handle_count(std::process::id()).map_err(|e| PyOSError::new_err(e.to_string()))
}

/// The number of heaps of this process (one more for each HeapCreate not destroyed).
#[cfg(windows)]
#[pyfunction]
fn heap_count() -> usize {
    poll::own_heap_count()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Defined once, in the protocol: the Python package speaks it.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", psleak::serve::protocol::VERSION)?;
    m.add("DEFAULT_SOCKET", psleak::serve::protocol::DEFAULT_SOCKET)?;
    m.add_function(wrap_pyfunction!(memory, m)?)?;
    m.add_function(wrap_pyfunction!(mark_memory, m)?)?;
    m.add_function(wrap_pyfunction!(memory_since_mark, m)?)?;
    m.add_function(wrap_pyfunction!(heap_trim, m)?)?;
    m.add_class::<Judge>()?;
    m.add_function(wrap_pyfunction!(unnamed, m)?)?;
    m.add_function(wrap_pyfunction!(human_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(missed_events, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    m.add_function(wrap_pyfunction!(tracer_unavailable, m)?)?;
    #[cfg(unix)]
    m.add_function(wrap_pyfunction!(open_fds, m)?)?;
    #[cfg(any(target_os = "linux", windows))]
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    #[cfg(any(target_os = "linux", windows))]
    m.add_function(wrap_pyfunction!(serve_collector, m)?)?;
    #[cfg(windows)]
    {
        m.add_function(wrap_pyfunction!(handle_count, m)?)?;
        m.add_function(wrap_pyfunction!(heap_count, m)?)?;
    }
    Ok(())
}
