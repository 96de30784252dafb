//! The heap figure of the polling backend, alone in its test binary: mallinfo2 sums every
//! thread's arena, so a concurrent test would move it.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // a test crate: an unwrap that fails is a test that fails

use psleak::backends::poll::own_heap;

const BLOCK: usize = 200;

fn hold() -> [*mut libc::c_void; 7] {
    // SAFETY: malloc has no preconditions.
    [(); 7].map(|_| unsafe { libc::malloc(BLOCK) })
}

fn release(blocks: [*mut libc::c_void; 7]) {
    for block in blocks {
        // SAFETY: each block came from malloc in `hold` and is freed once.
        unsafe { libc::free(block) };
    }
}

fn raw_heap_used() -> usize {
    // SAFETY: mallinfo2 has no preconditions.
    unsafe { libc::mallinfo2() }.uordblks
}

#[test]
fn the_heap_reading_does_not_depend_on_what_the_thread_cache_holds() {
    own_heap();
    // Two states with the same live memory (seven blocks of one size), the thread cache of
    // that size empty in the first and full in the second.
    let first = hold();
    let (raw_empty, read_empty) = (raw_heap_used(), own_heap().heap_used);
    let second = hold();
    release(first);
    let (raw_full, read_full) = (raw_heap_used(), own_heap().heap_used);
    release(second);
    assert!(raw_full >= raw_empty + 7 * BLOCK, "mallinfo2 alone: {raw_empty} then {raw_full}");
    assert_eq!(read_empty, read_full);
}
