//! `psleak trace --pid PID`: the live investigation of a running process, through eBPF on
//! Linux and ETW on Windows.

#[cfg(target_os = "linux")]
pub mod ebpf;
#[cfg(windows)]
pub mod etw;
