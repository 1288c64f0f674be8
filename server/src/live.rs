//! The live view: versioned topology snapshots and the sources that change them.
//!
//! STUB — filled in by the topology work.
