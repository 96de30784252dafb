//! psleak's collector. The data path, one folder per idea, each using only those above it:
//!
//! - `model`: the event model, the ledger of live resources, the verdict, the metrics — plain
//!   data, no I/O, every platform;
//! - `process` (Linux): access to a traced process (its mappings, credentials, pidfd);
//! - `sites`: naming where a resource was made — frames, unwinding, symbols (dbghelp on Windows);
//! - `backends`: what feeds the ledger — eBPF probes (Linux), ETW's records (translated
//!   everywhere, followed on Windows), and the psutil-style polling of every platform;
//! - `report`: what the ledger holds as a report, and that report as text;
//! - `serve`: the wire protocol, its answers, and the sessions that serve it (the private
//!   collector's on Linux and Windows, the daemon's);
//! - `trace`: the `psleak trace` front ends;
//! - `cli`, `error`: the command line, and the errors a user can meet.

pub mod backends;
pub mod error;
pub mod model;
pub mod report;
pub mod serve;
pub mod sites;

#[cfg(any(target_os = "linux", windows))]
pub mod cli;
#[cfg(target_os = "linux")]
pub mod process;
#[cfg(any(target_os = "linux", windows))]
pub mod trace;
