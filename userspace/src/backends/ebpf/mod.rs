//! The eBPF backend: the probes' records decoded into the ledger (`tracer`), one live session
//! of them (`live`), and the names of their sites (`naming`).

pub mod live;
pub mod naming;
pub mod python;
pub mod tracer;
