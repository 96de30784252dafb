//! The polling view of a process, psutil-style: what the OS and the allocator's own statistics
//! say right now. The backend for when probes cannot be had, and the classic second opinion
//! beside the exact ledger. One module per platform, each with the same functions:
//!
//! - `own_heap()`, `trim_own_heap()`: the calling process's allocator, measured and trimmed;
//! - `metrics(pid)`, `own_memory()`: what [`crate::model::metrics`] shows (rss, vms, uss, fds, threads);
//! - `threads(pid)`: (tid, name) of each thread;
//! - on Unix `open_fds(pid)`: (fd, what it refers to, where the OS says).
//!
//! | platform | heap | rss, vms | uss | fds / handles | threads |
//! |---|---|---|---|---|---|
//! | Linux | mallinfo2 | /proc/PID/statm | smaps_rollup private pages | /proc/PID/fd | /proc/PID/task |
//! | macOS | malloc zone statistics | proc_pidinfo(PROC_PIDTASKINFO) | phys_footprint (proc_pid_rusage) | proc_pidinfo(PROC_PIDLISTFDS) | PROC_PIDTASKINFO count |
//! | FreeBSD | jemalloc `stats.allocated` | kinfo_proc | none (0, as psutil) | kinfo_file | kinfo_proc per thread |
//! | Windows | HeapSummary over GetProcessHeaps | GetProcessMemoryInfo | private working set | GetProcessHandleCount | toolhelp snapshot |

/// The allocator's totals for the calling process: bytes in blocks handed out, bytes in
/// blocks the allocator mapped on their own (0 where it does not tell them apart), and all it
/// holds from the system: its heaps' extent and those mappings (0 where it does not tell).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapUse {
    pub heap_used: u64,
    pub mmap_used: u64,
    pub from_system: u64,
}

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;

#[cfg(target_os = "freebsd")]
mod freebsd;
#[cfg(target_os = "freebsd")]
pub use freebsd::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;
