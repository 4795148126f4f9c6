//! The coordinator (paper §4, Fig. 2): runs the peer's workflow. It sets up
//! interposition and virtualization, keeps the broker session, checks what
//! the broker relays against the master's signatures, authenticates each
//! peer before its path is used, compiles the policies into the kernel, and
//! undoes everything on a clean stop.
//!
//! - `core`: the state and its rules, pure (events in, effects out), with
//!   `members` (membership) and `paths` (authenticated paths) beside it;
//! - `agent`: carries the effects out (kernel maps, routes, packets, broker)
//!   and feeds the core what happens;
//! - `lifecycle`: claim, set-up, the wait for admission, teardown;
//! - `status`: what `pvc status` shows; `broker`: the broker session.

mod agent;
pub mod broker;
mod claim;
pub mod core;
mod lifecycle;
mod members;
pub mod metrics;
mod paths;
pub mod relay;
mod service;
mod site;
mod status;
#[cfg(test)]
mod tests;
mod traversal;

pub use lifecycle::{Ending, cleanup, default_cgroup, run};
