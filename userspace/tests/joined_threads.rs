//! The polling backend's thread list right after a join, alone in its test binary: a
//! concurrent test's threads would change the count.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

use psleak::backends::poll::threads;

/// A thread whose exit takes long after its join returned: pthread_join wakes when the kernel
/// clears the tid, and the kernel closes the thread's own fd table after that.
fn slow_to_leave() {
    // SAFETY: unshare touches only this thread's fd table, which is then its own.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_FILES) }, 0);
    let null = std::fs::File::open("/dev/null").unwrap();
    for _ in 0..500 {
        // SAFETY: dup of an open fd; the copies are closed with the private table.
        assert!(unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&null)) } >= 0);
    }
}

#[test]
fn a_joined_thread_is_never_listed() {
    let me = std::process::id();
    let alone = threads(me).unwrap();
    // Listing the threads on their way out, 79 to 132 of these 200 joins showed one.
    let listed_after_join = (0..200)
        .filter(|_| {
            std::thread::spawn(slow_to_leave).join().unwrap();
            threads(me).unwrap() != alone
        })
        .count();
    assert_eq!(listed_after_join, 0, "{alone:?}");
}
