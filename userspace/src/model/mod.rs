//! Plain data, no I/O, on every platform: what the backends' events are, the ledger they keep
//! exact, what a session lost, the classic metrics, and the verdict on a measurement.

pub mod event;
pub mod ledger;
pub mod lost;
pub mod metrics;
pub mod verdict;
