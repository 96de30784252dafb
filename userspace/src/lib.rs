//! psleak's collector: the event model, the ledger of live resources, the verdict, and the
//! polling metrics, on every platform; the eBPF backend, its sessions, the daemon and the live
//! `trace` of a running process on Linux; the ETW records' translation for Windows, and there
//! the live `trace` through ETW.

pub mod answer;
#[cfg(windows)]
pub mod dbghelp;
pub mod etw;
pub mod etw_collector;
#[cfg(windows)]
pub mod etw_target;
#[cfg(windows)]
pub mod etw_trace;
pub mod event;
pub mod ledger;
pub mod metrics;
pub mod poll;
pub mod protocol;
pub mod report;
pub mod verdict;

#[cfg(any(target_os = "linux", windows))]
pub mod cli;
#[cfg(target_os = "linux")]
pub mod daemon;
#[cfg(target_os = "linux")]
pub mod error;
#[cfg(target_os = "linux")]
pub mod listen;
#[cfg(target_os = "linux")]
pub mod live;
#[cfg(target_os = "linux")]
pub mod process;
#[cfg(target_os = "linux")]
pub mod session;
#[cfg(target_os = "linux")]
pub mod sites;
#[cfg(target_os = "linux")]
pub mod symbols;
#[cfg(target_os = "linux")]
pub mod trace;
#[cfg(target_os = "linux")]
pub mod tracer;
#[cfg(target_os = "linux")]
pub mod unwind;
