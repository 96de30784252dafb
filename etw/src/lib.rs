//! psleak's Windows probes: the ETW events that tell a process's heap blocks, private heaps,
//! virtual memory, handles and threads apart, and their decoding into [`Record`]s.
//!
//! | what | provider (GUID) | enabled by | opcodes |
//! |---|---|---|---|
//! | HeapAlloc, HeapFree, HeapReAlloc, HeapCreate, HeapDestroy | Heap trace `222962ab-6180-4b88-a825-346b75f2a24a` | a user session enabling that GUID, filtered on the target's pid; Windows only logs heap events for a process that opted in: its image's `TracingFlags = 1` under `Image File Execution Options`, read when the process starts | 33, 36, 34, 32, 35 |
//! | VirtualAlloc, VirtualFree | PageFault `3d6fa8d3-fe05-11d0-9dda-00c04fd7ba7c` | the kernel session, `EVENT_TRACE_FLAG_VIRTUAL_ALLOC` | 98, 99 |
//! | handle created, closed | Object manager `89497f50-effe-4440-8cf2-ce6b1cdcaca7` | the kernel session's group mask `PERF_OB_HANDLE`, added with `TraceSetInformation` once the session runs | 32, 33 |
//! | thread start, end | Thread `3d6fa8d1-fe05-11d0-9dda-00c04fd7ba7c` | the kernel session, `EVENT_TRACE_FLAG_THREAD` | 1, 2 (3, 4 for threads already running) |
//!
//! The kernel session needs an administrator (or the Performance Log Users group); stacks
//! come as extended data when the session asks for them (`EVENT_ENABLE_PROPERTY_STACK_TRACE`
//! for the heap; for the kernel events that create a resource, `TraceSetInformation` with
//! `TraceStackTracingInfo`). Where a session cannot be had
//! the collector polls instead: `GetProcessHandleCount`, `GetProcessHeaps` and a toolhelp
//! thread snapshot (see `psleak::poll`).
//!
//! [`records`] is plain Rust over the documented payload layouts, and [`names`] names the
//! sessions, both built and unit-tested on every platform; [`session`] (Windows only) runs the
//! ETW sessions through ferrisetw.

pub mod names;
pub mod records;
#[cfg(windows)]
pub mod session;

pub use records::{decode, DecodeError, Provider, Record};
