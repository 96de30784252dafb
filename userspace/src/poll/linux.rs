//! Linux: procfs and glibc's mallinfo2. The tested reference of the other platforms.

use std::fs;
use std::io;

use super::HeapUse;
use crate::event::FdKind;
use crate::metrics::{MemoryUse, Metrics};

/// See [`HeapUse`]: the glibc allocator's (mallinfo2).
pub fn own_heap() -> HeapUse {
    fill_thread_cache();
    // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
    let info = unsafe { libc::mallinfo2() };
    HeapUse { heap_used: info.uordblks as u64, mmap_used: info.hblkhd as u64 }
}

/// glibc counts the freed small blocks that it keeps in this thread's cache (tcache: up to 7
/// per size class, 24 to 1032 bytes) as used, so how full the cache happens to be moves
/// `heap_used` by up to kilobytes between two readings with the same live memory — enough to
/// fail a clean test. Filling every size class to the brim first makes the cache's share the
/// same at every reading: what a class already held is handed out and comes back, and the
/// blocks that do not fit go to the allocator's free lists, which count as free.
fn fill_thread_cache() {
    const CLASSES: usize = 64;
    // Above glibc's default of 7 per class, in case a tunable raised it a little.
    const PER_CLASS: usize = 16;
    let mut blocks = [std::ptr::null_mut::<libc::c_void>(); CLASSES * PER_CLASS];
    for (i, block) in blocks.iter_mut().enumerate() {
        // Request sizes 24, 40, ... 1032: one per chunk size class of the cache.
        // SAFETY: malloc has no preconditions; a null result is freed harmlessly below.
        *block = unsafe { libc::malloc(16 * (i % CLASSES) + 24) };
    }
    for block in blocks {
        // SAFETY: each block came from malloc above and is freed once.
        unsafe { libc::free(block) };
    }
}

/// Gives free heap memory back to the system, so that what stays is what is used.
pub fn trim_own_heap() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Open fds of `pid` and what each refers to (a path, `socket:[inode]`, `pipe:[inode]`).
pub fn open_fds(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<(i32, String)> = fs::read_dir(&dir)?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            // An fd closed between the listing and the readlink is gone: skip it.
            let target = fs::read_link(entry.path()).ok()?.to_string_lossy().into_owned();
            // The listing's own fd, when we list ourselves.
            (target != dir).then_some((fd, target))
        })
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// What an fd of the calling process is, as the tracer would describe it.
pub fn own_fd_kind(fd: i32) -> FdKind {
    // SAFETY: fstat and getsockopt only write into the out-parameters given, sized right.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return FdKind::Other;
        }
        let (mut family, mut sock_type) = (0i32, 0i32);
        if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
            let mut len = size_of::<i32>() as libc::socklen_t;
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&raw mut family).cast(), &mut len);
            len = size_of::<i32>() as libc::socklen_t;
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut sock_type).cast(), &mut len);
        }
        FdKind::from_mode(u64::from(st.st_mode), family as u16, sock_type as u16)
    }
}

/// Threads of `pid` with their names, those on their way out left aside: pthread_join returns
/// as soon as the kernel clears the thread's tid, a little before the thread leaves
/// /proc/PID/task, and a joined thread must not count as one left running.
pub fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    let mut threads: Vec<(u32, String)> = fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let tid = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (name, flags) = name_and_flags(&stat)?;
            (flags & PF_EXITING == 0).then(|| (tid, name.to_string()))
        })
        .collect();
    threads.sort_unstable();
    Ok(threads)
}

/// The kernel's flag for a task in do_exit (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;

/// The name and the kernel flags (the 9th field) of a /proc/PID/task/TID/stat line. The name is
/// in parentheses and may hold any character, so the fields are counted from the last ')'.
fn name_and_flags(stat: &str) -> Option<(&str, u64)> {
    let (head, fields) = stat.rsplit_once(')')?;
    let (_, name) = head.split_once('(')?;
    // state ppid pgrp session tty_nr tpgid flags
    let flags = fields.split_ascii_whitespace().nth(6)?.parse().ok()?;
    Some((name, flags))
}

/// The metrics of `pid`, from procfs.
pub(crate) fn metrics(pid: u32) -> io::Result<Metrics> {
    let proc = format!("/proc/{pid}");
    let MemoryUse { rss, vms, uss } = memory_of(&proc)?;
    let fds = fs::read_dir(format!("{proc}/fd"))?.count() as u64;
    let threads = kib_fields(&fs::read_to_string(format!("{proc}/status"))?, &["Threads:"]);
    Ok(Metrics { rss, vms, uss, fds, threads })
}

pub(crate) fn own_memory() -> io::Result<MemoryUse> {
    memory_of("/proc/self")
}

/// From `proc`, the process's /proc directory.
fn memory_of(proc: &str) -> io::Result<MemoryUse> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let statm = fs::read_to_string(format!("{proc}/statm"))?;
    let mut pages = statm.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let vms = pages.next().unwrap_or(0) * page;
    let rss = pages.next().unwrap_or(0) * page;
    let rollup = fs::read_to_string(format!("{proc}/smaps_rollup"))?;
    let uss = kib_fields(&rollup, &["Private_Clean:", "Private_Dirty:"]) * 1024;
    Ok(MemoryUse { rss, vms, uss })
}

/// The sum of the numbers after the given `Name:` labels ("Private_Dirty:   12 kB").
fn kib_fields(text: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let label = labels.iter().find(|l| line.starts_with(**l))?;
            line[label.len()..].split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_heap_fds_and_threads_of_this_process() {
        let me = std::process::id();
        let before = own_heap();
        let block = vec![7u8; 10_000];
        assert!(own_heap().heap_used >= before.heap_used + 10_000, "{before:?} {:?}", own_heap());
        drop(block);
        let big = vec![7u8; 4 << 20]; // above the mmap threshold: its own mapping
        assert!(own_heap().mmap_used >= before.mmap_used + (4 << 20));
        drop(big);

        let path = std::env::temp_dir().join(format!("psleak-poll-{me}"));
        let file = fs::File::create(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let entry = (fd, path.to_string_lossy().into_owned());
        assert!(open_fds(me).unwrap().contains(&entry));
        drop(file);
        fs::remove_file(&path).unwrap();
        assert!(!open_fds(me).unwrap().contains(&entry), "closed");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(own_fd_kind(std::os::fd::AsRawFd::as_raw_fd(&listener)).describe(), "AF_INET SOCK_STREAM");

        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        // The new thread names itself: wait until it runs.
        let worker = std::thread::Builder::new()
            .name("psleak-probe".into())
            .spawn(move || {
                started_tx.send(()).unwrap();
                rx.recv()
            })
            .unwrap();
        started.recv().unwrap();
        assert!(threads(me).unwrap().iter().any(|(_, name)| name == "psleak-probe"));
        drop(tx);
        worker.join().unwrap().unwrap_err();
    }

    #[test]
    fn reads_name_and_flags_past_any_parenthesis_in_the_name() {
        let stat = "4242 (a) (b c)) R 1 4242 4242 0 -1 4194564 120 0 0 0 3 1 0 0 20 0 1 0";
        assert_eq!(name_and_flags(stat), Some(("a) (b c)", 4194564)));
        assert_eq!(name_and_flags("4242 (x) R 1"), None, "cut short");
    }

    #[test]
    fn sums_labelled_fields() {
        let rollup = "Rss:  100 kB\nPrivate_Clean:   8 kB\nPrivate_Dirty:  24 kB\nPrivate_Hugetlb: 0 kB\n";
        assert_eq!(kib_fields(rollup, &["Private_Clean:", "Private_Dirty:"]), 32);
        assert_eq!(kib_fields("Name:\tx\nThreads:\t7\n", &["Threads:"]), 7);
    }

    #[test]
    fn counts_fds_and_threads_exactly() {
        // Two sleeping children, one holding three more fds (non-CLOEXEC, kept across exec).
        let spawn = |script: &str| std::process::Command::new("sh").args(["-c", script]).spawn().unwrap();
        let mut plain = spawn("exec sleep 30");
        let mut more = spawn("exec 3</dev/null 4</dev/null 5</dev/null; exec sleep 30");
        std::thread::sleep(std::time::Duration::from_millis(200)); // both have exec'd sleep
        let (a, b) = (Metrics::of(plain.id()).unwrap(), Metrics::of(more.id()).unwrap());
        for child in [&mut plain, &mut more] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(b.since(&a).fds, 3, "{a:?} {b:?}");
        assert_eq!((a.threads, b.threads), (1, 1));
        assert!(a.rss > 0 && a.vms >= a.rss && a.uss <= a.rss, "{a:?}");
    }

    #[test]
    fn follows_memory_this_process_touches() {
        let me = std::process::id();
        let before = Metrics::of(me).unwrap();
        let touched = vec![1u8; 32 << 20];
        let change = Metrics::of(me).unwrap().since(&before);
        assert!(change.rss >= 16 << 20 && change.uss >= 16 << 20, "32 MiB were touched: {change:?}");
        drop(touched);
    }
}
