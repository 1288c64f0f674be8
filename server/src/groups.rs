//! Groups: which CPUs each target names, the widening chain, and placement (pure functions).
//!
//! STUB — filled in by the groups work.
