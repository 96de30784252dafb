//! Windows: the process's heaps (HeapSummary), psapi and toolhelp (type-checked in CI, never
//! run there: see the README). Also the polling fallback of the ETW backend: handles
//! (GetProcessHandleCount), heaps (GetProcessHeaps) and threads (a toolhelp snapshot).

use std::io;
use std::mem::size_of;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, INVALID_HANDLE_VALUE, STILL_ACTIVE};
use windows_sys::Win32::System::Diagnostics::ToolHelp::{
    CreateToolhelp32Snapshot, Thread32First, Thread32Next, TH32CS_SNAPTHREAD, THREADENTRY32,
};
use windows_sys::Win32::System::Memory::{GetProcessHeaps, HeapCompact, HeapSummary, HEAP_SUMMARY};
use windows_sys::Win32::System::ProcessStatus::{
    GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS, PROCESS_MEMORY_COUNTERS_EX2,
};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetExitCodeProcess, GetProcessHandleCount, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    PROCESS_VM_READ,
};

use super::HeapUse;
use crate::model::metrics::{MemoryUse, Metrics};

/// The calling process's heaps: the process heap, the CRT's, and every HeapCreate'd one.
fn own_heaps() -> Vec<HANDLE> {
    // SAFETY: with no buffer GetProcessHeaps returns the count; then fills at most `len`.
    unsafe {
        let count = GetProcessHeaps(0, std::ptr::null_mut());
        let mut heaps = vec![std::ptr::null_mut(); count as usize + 8];
        let filled = GetProcessHeaps(heaps.len() as u32, heaps.as_mut_ptr());
        heaps.truncate((filled as usize).min(heaps.len()));
        heaps
    }
}

/// See [`HeapUse`]: bytes allocated in all the process's heaps (large blocks are VirtualAlloc'd
/// by the heap itself and counted in: `mmap_used` is 0).
pub fn own_heap() -> HeapUse {
    let heap_used = own_heaps()
        .into_iter()
        .map(|heap| {
            let mut summary = HEAP_SUMMARY { cb: size_of::<HEAP_SUMMARY>() as u32, ..Default::default() };
            // SAFETY: `summary` is sized as HeapSummary requires.
            if unsafe { HeapSummary(heap, 0, &mut summary) } != 0 {
                summary.cbAllocated as u64
            } else {
                0
            }
        })
        .sum();
    HeapUse { heap_used, mmap_used: 0, from_system: 0 }
}

/// Coalesces free blocks and decommits what it can, heap by heap.
pub fn trim_own_heap() {
    for heap in own_heaps() {
        // SAFETY: each handle came from GetProcessHeaps.
        unsafe { HeapCompact(heap, 0) };
    }
}

/// How many heaps the calling process has: one more per HeapCreate not yet destroyed.
pub fn own_heap_count() -> usize {
    own_heaps().len()
}

/// A handle to `pid` for querying, closed on drop.
struct Process(HANDLE);

impl Process {
    fn open(pid: u32) -> io::Result<Self> {
        if pid == std::process::id() {
            // SAFETY: a pseudo-handle, always valid, never closed.
            return Ok(Self(unsafe { GetCurrentProcess() }));
        }
        // SAFETY: OpenProcess has no memory preconditions.
        let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | PROCESS_VM_READ, 0, pid) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(handle))
    }

    fn memory(&self) -> io::Result<MemoryUse> {
        let mut counters =
            PROCESS_MEMORY_COUNTERS_EX2 { cb: size_of::<PROCESS_MEMORY_COUNTERS_EX2>() as u32, ..Default::default() };
        // SAFETY: the EX2 struct starts with PROCESS_MEMORY_COUNTERS and `cb` says its size.
        let ok =
            unsafe { GetProcessMemoryInfo(self.0, (&raw mut counters).cast::<PROCESS_MEMORY_COUNTERS>(), counters.cb) };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(MemoryUse {
            rss: counters.WorkingSetSize as u64,
            // psutil's vms on Windows: the commit charge.
            vms: counters.PagefileUsage as u64,
            uss: counters.PrivateWorkingSetSize as u64,
        })
    }

    fn handle_count(&self) -> io::Result<u64> {
        let mut count = 0u32;
        // SAFETY: writes one u32.
        if unsafe { GetProcessHandleCount(self.0, &mut count) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::from(count))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: GetCurrentProcess's pseudo-handle need not be closed, and closing it is a no-op.
        unsafe { CloseHandle(self.0) };
    }
}

/// The metrics of `pid`; its fds are its handles.
pub(crate) fn metrics(pid: u32) -> io::Result<Metrics> {
    let process = Process::open(pid)?;
    let MemoryUse { rss, vms, uss } = process.memory()?;
    Ok(Metrics { rss, vms, uss: Some(uss), fds: process.handle_count()?, threads: threads(pid)?.len() as u64 })
}

pub fn own_memory() -> io::Result<MemoryUse> {
    Process::open(std::process::id())?.memory()
}

/// Whether `pid` is a process that has not exited.
pub fn is_running(pid: u32) -> bool {
    let mut code = 0u32;
    // SAFETY: writes one u32.
    Process::open(pid).is_ok_and(|p| unsafe { GetExitCodeProcess(p.0, &mut code) } != 0 && code == STILL_ACTIVE as u32)
}

/// The number of open handles of `pid`.
pub fn handle_count(pid: u32) -> io::Result<u64> {
    Process::open(pid)?.handle_count()
}

/// Threads of `pid` (toolhelp gives ids, not names).
pub fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    // SAFETY: the snapshot handle is checked and closed below; THREADENTRY32 is sized by dwSize.
    unsafe {
        let snapshot = CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0);
        if snapshot == INVALID_HANDLE_VALUE {
            return Err(io::Error::last_os_error());
        }
        let mut entry = THREADENTRY32 { dwSize: size_of::<THREADENTRY32>() as u32, ..Default::default() };
        let mut threads = Vec::new();
        let mut more = Thread32First(snapshot, &mut entry) != 0;
        while more {
            if entry.th32OwnerProcessID == pid {
                threads.push((entry.th32ThreadID, String::new()));
            }
            more = Thread32Next(snapshot, &mut entry) != 0;
        }
        CloseHandle(snapshot);
        threads.sort_unstable();
        Ok(threads)
    }
}

/// Run under Wine by `cargo xtask wine` (Wine 8 lacks HeapSummary: the task skips
/// `a_heap_block_shows_in_the_heap_figure`, loudly). Other tests run meanwhile in this
/// process, so each looks for its own heap, block or thread rather than at counts.
#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use windows_sys::Win32::System::Memory::{HeapAlloc, HeapCreate, HeapDestroy, HeapFree};
    use windows_sys::Win32::System::Threading::GetCurrentThreadId;

    use super::*;

    #[test]
    fn a_private_heap_is_listed_while_it_lives() {
        // SAFETY: a heap of our own, destroyed below.
        let heap = unsafe { HeapCreate(0, 0, 0) };
        assert!(!heap.is_null());
        assert!(own_heaps().contains(&heap));
        // SAFETY: created above, used by nothing else.
        unsafe { HeapDestroy(heap) };
        assert!(!own_heaps().contains(&heap));
    }

    #[test]
    fn a_heap_block_shows_in_the_heap_figure() {
        const BLOCK: usize = 1 << 20;
        // SAFETY: a heap of our own and one block of it, freed and destroyed below.
        unsafe {
            let heap = HeapCreate(0, 0, 0);
            let before = own_heap().heap_used;
            let block = HeapAlloc(heap, 0, BLOCK);
            let during = own_heap().heap_used;
            HeapFree(heap, 0, block);
            HeapDestroy(heap);
            // Other tests allocate meanwhile: a little slack.
            assert!(during >= before + BLOCK as u64 - (64 << 10), "{before} then {during}");
        }
    }

    #[test]
    fn a_thread_is_listed_while_it_runs() {
        let (tid_tx, tid) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            // SAFETY: no preconditions.
            tid_tx.send(unsafe { GetCurrentThreadId() }).unwrap();
            let _ = stopped.recv();
        });
        let tid = tid.recv().unwrap();
        let listed = |tid| threads(std::process::id()).unwrap().iter().any(|&(t, _)| t == tid);
        assert!(listed(tid));
        drop(stop);
        worker.join().unwrap();
        assert!(!listed(tid));
    }

    #[test]
    fn a_process_runs_until_it_exits() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("cmd").args(["/C", "exit"]).spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Its process object lives on while `child` holds a handle: exited all the same.
        assert!(!is_running(pid));
    }

    #[test]
    fn reads_its_own_metrics() {
        let m = metrics(std::process::id()).unwrap();
        assert!(m.rss > 0 && m.threads >= 1, "{m:?}");
        let own = own_memory().unwrap();
        assert!(own.rss > 0, "{own:?}");
    }
}
