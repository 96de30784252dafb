//! What feeds the ledger: the eBPF probes on Linux, ETW on Windows (its records translated on
//! every platform, so that the translation is tested here), and polling everywhere.

#[cfg(target_os = "linux")]
pub mod ebpf;
pub mod etw;
pub mod poll;
