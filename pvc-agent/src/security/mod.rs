//! Security (paper §4.3): host and master keys, master-signed membership,
//! the mutual challenge-response that precedes every path, and policy.
//!
//! Nothing a broker says is believed without a signature: records and lists
//! carry the master's, exchanges between agents carry each host's.

pub mod challenge;
pub mod keys;
pub mod master;
pub mod membership;
pub mod policy;
