//! FreeBSD: jemalloc's own statistics and the kern.proc sysctls (type-checked in CI, never run
//! there: see the README). FreeBSD has no USS; like psutil, it reads 0.

use std::ffi::CStr;
use std::io;
use std::mem::{offset_of, size_of};

use super::HeapUse;
use crate::model::metrics::{MemoryUse, Metrics};

/// See [`HeapUse`]: jemalloc's `stats.allocated`, refreshed by bumping its epoch (jemalloc
/// maps large blocks itself and does not count them apart: `mmap_used` is 0).
pub fn own_heap() -> HeapUse {
    let mut epoch: u64 = 1;
    let mut allocated: usize = 0;
    let mut len = size_of::<usize>();
    // SAFETY: each mallctl reads or writes exactly the sizes given.
    unsafe {
        libc::mallctl(
            c"epoch".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut epoch).cast(),
            size_of::<u64>(),
        );
        libc::mallctl(c"stats.allocated".as_ptr(), (&raw mut allocated).cast(), &mut len, std::ptr::null_mut(), 0);
    }
    HeapUse { heap_used: allocated as u64, mmap_used: 0, from_system: 0 }
}

/// Purges every arena's dirty pages (`arena.<MALLCTL_ARENAS_ALL>.purge`).
pub fn trim_own_heap() {
    // SAFETY: purge takes and returns nothing.
    unsafe {
        libc::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// The raw answer of the kern.proc sysctl `mib`.
fn sysctl(mib: &[libc::c_int]) -> io::Result<Vec<u8>> {
    let mut len = 0;
    // SAFETY: without a buffer, sysctl writes the size it needs into `len`.
    if unsafe { libc::sysctl(mib.as_ptr(), mib.len() as u32, std::ptr::null_mut(), &mut len, std::ptr::null(), 0) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    len += len / 8; // room for what appears between the two calls
    let mut buf = vec![0u8; len];
    // SAFETY: sysctl writes at most `len` bytes into `buf`, and says how many.
    if unsafe { libc::sysctl(mib.as_ptr(), mib.len() as u32, buf.as_mut_ptr().cast(), &mut len, std::ptr::null(), 0) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len);
    Ok(buf)
}

/// One kinfo_proc per entry of `buf`.
fn kinfo_procs(buf: &[u8]) -> Vec<libc::kinfo_proc> {
    buf.chunks_exact(size_of::<libc::kinfo_proc>())
        // SAFETY: kinfo_proc is plain data; each chunk is one whole entry.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) })
        .collect()
}

fn kinfo_proc(pid: u32) -> io::Result<libc::kinfo_proc> {
    let buf = sysctl(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid as libc::c_int])?;
    kinfo_procs(&buf).into_iter().next().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

fn memory(info: &libc::kinfo_proc) -> MemoryUse {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    MemoryUse { rss: info.ki_rssize as u64 * page, vms: info.ki_size as u64, uss: 0 }
}

pub(crate) fn metrics(pid: u32) -> io::Result<Metrics> {
    let info = kinfo_proc(pid)?;
    // FreeBSD does not tell uss (psutil shows 0): unknown, never a figure that cannot grow.
    let MemoryUse { rss, vms, .. } = memory(&info);
    Ok(Metrics { rss, vms, uss: None, fds: open_fds(pid)?.len() as u64, threads: info.ki_numthreads as u64 })
}

pub fn own_memory() -> io::Result<MemoryUse> {
    Ok(memory(&kinfo_proc(std::process::id())?))
}

/// Open fds of `pid` and their paths, where the kernel knows one. The sysctl packs
/// variable-size kinfo_file records, each starting with its own size.
pub fn open_fds(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let buf = sysctl(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_FILEDESC, pid as libc::c_int])?;
    let mut fds = Vec::new();
    let mut at = 0;
    while at + size_of::<libc::c_int>() <= buf.len() {
        let mut size = [0; 4];
        size.copy_from_slice(&buf[at..at + 4]);
        let size = i32::from_ne_bytes(size) as usize;
        if size == 0 || at + size > buf.len() {
            break;
        }
        // SAFETY: kinfo_file is plain integers and arrays, for which zero is a valid value.
        let mut file: libc::kinfo_file = unsafe { std::mem::zeroed() };
        let n = size.min(size_of::<libc::kinfo_file>());
        // SAFETY: copies the record's first `n` bytes into a zeroed kinfo_file of at least `n`.
        unsafe { std::ptr::copy_nonoverlapping(buf[at..].as_ptr(), (&raw mut file).cast::<u8>(), n) };
        if n > offset_of!(libc::kinfo_file, kf_fd) && file.kf_fd >= 0 {
            // SAFETY: kf_path is NUL-terminated within the zeroed struct.
            let path = unsafe { CStr::from_ptr(file.kf_path.as_ptr()) };
            fds.push((file.kf_fd, path.to_string_lossy().into_owned()));
        }
        at += size;
    }
    fds.sort_unstable();
    Ok(fds)
}

/// Threads of `pid` with their names (one kinfo_proc per thread).
pub fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    let mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID | libc::KERN_PROC_INC_THREAD, pid as libc::c_int];
    let mut threads: Vec<(u32, String)> = kinfo_procs(&sysctl(&mib)?)
        .iter()
        .map(|t| {
            // SAFETY: ki_tdname is a NUL-terminated array.
            let name = unsafe { CStr::from_ptr(t.ki_tdname.as_ptr()) };
            (t.ki_tid as u32, name.to_string_lossy().into_owned())
        })
        .collect();
    threads.sort_unstable();
    Ok(threads)
}
