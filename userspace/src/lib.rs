//! psleak's collector: the event model, the ledger of live resources, the eBPF backend, and
//! the live `trace` of a running process.

pub mod cli;
pub mod daemon;
pub mod error;
pub mod event;
pub mod ledger;
pub mod metrics;
pub mod poll;
pub mod process;
pub mod protocol;
pub mod report;
pub mod session;
pub mod sites;
pub mod symbols;
pub mod trace;
pub mod tracer;
pub mod unwind;
pub mod verdict;
