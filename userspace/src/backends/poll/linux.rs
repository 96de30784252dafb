//! Linux: procfs and glibc's mallinfo2. The tested reference of the other platforms.

use std::fs;
use std::io;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use super::HeapUse;
use crate::model::event::FdKind;
use crate::model::metrics::{MemoryUse, Metrics};

/// See [`HeapUse`]: the glibc allocator's (mallinfo2). Its heaps' extent is `arena`: the main
/// heap's, which brk moves and vms counts page for page, and the part of each thread heap in
/// use (their reservations are in vms, whole, from their creation on).
pub fn own_heap() -> HeapUse {
    fill_thread_cache();
    // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
    let info = unsafe { libc::mallinfo2() };
    let mmap_used = info.hblkhd as u64;
    HeapUse { heap_used: info.uordblks as u64, mmap_used, from_system: (info.arena as u64).saturating_add(mmap_used) }
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
    let (vms, rss) = mapped_and_resident(&proc)?;
    let uss = within(format!("{proc}/smaps_rollup"), USS_WAIT, |path| fs::read_to_string(path))?
        .map(|rollup| private_bytes(&rollup));
    let fds = fs::read_dir(format!("{proc}/fd"))?.count() as u64;
    let threads = kib_fields(&fs::read_to_string(format!("{proc}/status"))?, &["Threads:"]);
    Ok(Metrics { rss, vms, uss, fds, threads })
}

pub fn own_memory() -> io::Result<MemoryUse> {
    let (vms, rss) = mapped_and_resident("/proc/self")?;
    Ok(MemoryUse { rss, vms, uss: private_bytes(&fs::read_to_string("/proc/self/smaps_rollup")?) })
}

/// (vms, rss) in bytes, from `proc`'s statm (counters: no lock to wait for).
fn mapped_and_resident(proc: &str) -> io::Result<(u64, u64)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let statm = fs::read_to_string(format!("{proc}/statm"))?;
    let mut pages = statm.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let vms = pages.next().unwrap_or(0) * page;
    Ok((vms, pages.next().unwrap_or(0) * page))
}

fn private_bytes(rollup: &str) -> u64 {
    kib_fields(rollup, &["Private_Clean:", "Private_Dirty:"]) * 1024
}

/// How long a report waits for another process's smaps_rollup. The kernel walks the whole
/// memory map for it under the map's lock, which it yields to writers: a target whose 200
/// threads kept mapping (their malloc arenas, on two cores) held the reader off for 11 to 80 s,
/// and with it psleak trace's reports and its answer to SIGTERM.
const USS_WAIT: Duration = Duration::from_millis(250);

/// Reads still under way, by path, with where their answer will come.
type UnderWay = Vec<(String, mpsc::Receiver<io::Result<String>>)>;

/// Blocks every signal on this thread: a process-directed one (psleak trace's SIGINT, read from
/// a signalfd by its main thread) goes to any thread that does not block it, and if that is a
/// reader (started before the main thread blocked it, waiting on a map lock or just exiting),
/// its default action ends the process. A CI run saw psleak trace die of its SIGINT so.
fn block_signals() {
    // SAFETY: a sigset_t filled by sigfillset, set as this thread's mask only.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// `read(path)` on a thread of its own, waited for up to `wait`: None when it has not answered
/// by then. A read still under way from an earlier call is waited for again (its answer is the
/// freshest to be had), never started twice: a process that keeps its map locked must not
/// collect a blocked thread per report.
fn within(path: String, wait: Duration, read: fn(&str) -> io::Result<String>) -> io::Result<Option<String>> {
    static UNDER_WAY: Mutex<UnderWay> = Mutex::new(Vec::new());
    let under_way = || UNDER_WAY.lock().unwrap_or_else(|e| e.into_inner());
    let earlier = {
        let mut reads = under_way();
        reads.iter().position(|(p, _)| *p == path).map(|i| reads.swap_remove(i).1)
    };
    let answer = match earlier {
        Some(answer) => answer,
        None => {
            let (tx, answer) = mpsc::channel();
            let reading = path.clone();
            let reader = move || {
                block_signals();
                tx.send(read(&reading))
            };
            std::thread::Builder::new().name("psleak-read".into()).spawn(reader)?;
            answer
        }
    };
    match answer.recv_timeout(wait) {
        Ok(read) => read.map(Some),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            under_way().push((path, answer));
            Ok(None)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other(format!("reading {path} failed"))),
    }
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
    fn a_reader_thread_takes_no_signal() {
        // Its SIGINT's default action would end psleak trace, whose main thread reads it from a signalfd.
        let blocked = within("/proc/mask".into(), Duration::from_secs(10), |_| {
            // SAFETY: reads this thread's mask into a zeroed sigset_t.
            let sigint = unsafe {
                let mut mask = std::mem::zeroed::<libc::sigset_t>();
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
                libc::sigismember(&mask, libc::SIGINT)
            };
            Ok(sigint.to_string())
        });
        assert_eq!(blocked.unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn a_read_that_does_not_answer_in_time_is_unknown_and_never_started_twice() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        static RELEASED: AtomicBool = AtomicBool::new(false);
        // A map that stays locked until released.
        fn held(path: &str) -> io::Result<String> {
            STARTED.fetch_add(1, SeqCst);
            while !RELEASED.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(format!("read {path}"))
        }
        let (path, short, long) = ("/proc/held".to_string(), Duration::from_millis(50), Duration::from_secs(10));
        assert_eq!(within(path.clone(), short, held).unwrap(), None);
        assert_eq!(within(path.clone(), short, held).unwrap(), None);
        assert_eq!(STARTED.load(SeqCst), 1, "the second call waits for the first read");
        RELEASED.store(true, SeqCst);
        assert_eq!(within(path.clone(), long, held).unwrap().as_deref(), Some("read /proc/held"));
        assert_eq!(within(path, long, held).unwrap().as_deref(), Some("read /proc/held"));
        assert_eq!(STARTED.load(SeqCst), 2, "once answered, the next call reads anew");
        let gone = within("/proc/0/smaps_rollup".into(), long, |path| fs::read_to_string(path));
        assert_eq!(gone.unwrap_err().kind(), io::ErrorKind::NotFound, "an error is the caller's");
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
        let (a, b) = (metrics(plain.id()).unwrap(), metrics(more.id()).unwrap());
        for child in [&mut plain, &mut more] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(b.since(&a).fds, 3, "{a:?} {b:?}");
        assert_eq!((a.threads, b.threads), (1, 1));
        assert!(a.rss > 0 && a.vms >= a.rss && a.uss.unwrap() <= a.rss, "{a:?}");
    }

    #[test]
    fn follows_memory_this_process_touches() {
        let me = std::process::id();
        let before = metrics(me).unwrap();
        let touched = vec![1u8; 32 << 20];
        let change = metrics(me).unwrap().since(&before);
        assert!(change.rss >= 16 << 20 && change.uss.unwrap() >= 16 << 20, "32 MiB were touched: {change:?}");
        drop(touched);
    }
}
