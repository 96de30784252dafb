//! The wire protocol between a test process and its collector, the answers to its requests,
//! and the loops that serve them: the private collector's session (eBPF on Linux, ETW on
//! Windows) and the daemon, which runs such sessions for other users.

pub mod answer;
pub mod etw_session;
pub mod protocol;

#[cfg(target_os = "linux")]
pub mod daemon;
#[cfg(target_os = "linux")]
pub mod listen;
#[cfg(target_os = "linux")]
pub mod session;
