//! macOS: the default malloc zone's statistics and libproc (type-checked in CI, never run
//! there: see the README).

use std::io;
use std::mem::{size_of, MaybeUninit};

use super::HeapUse;
use crate::model::metrics::{MemoryUse, Metrics};

/// See [`HeapUse`]: the default malloc zone's bytes in use (it has no separate mmap figure).
pub fn own_heap() -> HeapUse {
    let mut stats = MaybeUninit::<libc::malloc_statistics_t>::zeroed();
    // SAFETY: the default zone always exists; the statistics are written into `stats`.
    let stats = unsafe {
        libc::malloc_zone_statistics(libc::malloc_default_zone(), stats.as_mut_ptr());
        stats.assume_init()
    };
    HeapUse { heap_used: stats.size_in_use as u64, mmap_used: 0, from_system: 0 }
}

/// macOS's malloc returns freed memory by itself, lazily; nothing to ask for.
pub fn trim_own_heap() {}

fn task_info(pid: u32) -> io::Result<libc::proc_taskinfo> {
    let mut info = MaybeUninit::<libc::proc_taskinfo>::zeroed();
    let size = size_of::<libc::proc_taskinfo>() as libc::c_int;
    // SAFETY: proc_pidinfo writes at most `size` bytes into `info`.
    let written =
        unsafe { libc::proc_pidinfo(pid as libc::c_int, libc::PROC_PIDTASKINFO, 0, info.as_mut_ptr().cast(), size) };
    if written != size {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fully written, as checked above.
    Ok(unsafe { info.assume_init() })
}

/// USS: the physical footprint (private, dirty and compressed pages), what Activity Monitor
/// calls memory.
fn footprint(pid: u32) -> io::Result<u64> {
    let mut usage = MaybeUninit::<libc::rusage_info_v2>::zeroed();
    // SAFETY: proc_pid_rusage writes one rusage_info_v2 into `usage`.
    let rc = unsafe { libc::proc_pid_rusage(pid as libc::c_int, libc::RUSAGE_INFO_V2, usage.as_mut_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: written, as checked above.
    Ok(unsafe { usage.assume_init() }.ri_phys_footprint)
}

fn fd_infos(pid: u32) -> io::Result<Vec<libc::proc_fdinfo>> {
    let entry = size_of::<libc::proc_fdinfo>();
    // SAFETY: with no buffer, proc_pidinfo returns the size the list needs.
    let needed = unsafe { libc::proc_pidinfo(pid as libc::c_int, libc::PROC_PIDLISTFDS, 0, std::ptr::null_mut(), 0) };
    if needed <= 0 {
        return Err(io::Error::last_os_error());
    }
    // Room for fds opened between the two calls.
    let mut fds: Vec<libc::proc_fdinfo> = Vec::with_capacity(needed as usize / entry + 16);
    let capacity = (fds.capacity() * entry) as libc::c_int;
    // SAFETY: proc_pidinfo writes at most `capacity` bytes of proc_fdinfo entries.
    let written =
        unsafe { libc::proc_pidinfo(pid as libc::c_int, libc::PROC_PIDLISTFDS, 0, fds.as_mut_ptr().cast(), capacity) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `written` bytes of whole entries were initialized.
    unsafe { fds.set_len(written as usize / entry) };
    Ok(fds)
}

pub(crate) fn metrics(pid: u32) -> io::Result<Metrics> {
    let info = task_info(pid)?;
    Ok(Metrics {
        rss: info.pti_resident_size,
        vms: info.pti_virtual_size,
        uss: Some(footprint(pid)?),
        fds: fd_infos(pid)?.len() as u64,
        threads: info.pti_threadnum as u64,
    })
}

pub fn own_memory() -> io::Result<MemoryUse> {
    let me = std::process::id();
    let info = task_info(me)?;
    Ok(MemoryUse { rss: info.pti_resident_size, vms: info.pti_virtual_size, uss: footprint(me)? })
}

/// Open fds of `pid`, with the kind of object libproc names for each (`vnode`, `socket`...).
pub fn open_fds(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let kind = |t: u32| match t as i32 {
        libc::PROX_FDTYPE_VNODE => "vnode",
        libc::PROX_FDTYPE_SOCKET => "socket",
        libc::PROX_FDTYPE_PIPE => "pipe",
        libc::PROX_FDTYPE_KQUEUE => "kqueue",
        _ => "other",
    };
    let mut fds: Vec<(i32, String)> =
        fd_infos(pid)?.into_iter().map(|f| (f.proc_fd, kind(f.proc_fdtype).to_string())).collect();
    fds.sort_unstable();
    Ok(fds)
}

/// Threads of `pid`: libproc gives their number, not their ids, so they come as 0..n unnamed.
pub fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    Ok((0..task_info(pid)?.pti_threadnum as u32).map(|i| (i, String::new())).collect())
}
