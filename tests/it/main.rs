//! The integration-test binary: every test runs against a real mongod replica set.
//!
//! One binary (not one per file) so the shared mongod starts once. Each capability has its own
//! module; the harness is in `harness/`.

mod harness;

mod admin;
mod auth;
mod browser;
mod budget;
mod core_faults;
mod core_ops;
mod core_resume;
mod core_transports;
mod docview;
mod exposure;
mod fanin;
mod feeds;
mod filtering;
mod http_edge;
mod limits;
mod membership;
mod multi;
mod ops;
mod relay;
mod security;
mod snapshot;
mod snapshot_fair;
