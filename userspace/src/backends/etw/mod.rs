//! The ETW backend: records translated into events (`translate`, every platform), the seam the
//! Windows collector's loop follows a process through (`follow`), and ETW's follower (`target`,
//! Windows only).

pub mod follow;
#[cfg(windows)]
pub mod target;
pub mod translate;
