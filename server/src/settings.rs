//! Building blocks of the config sections that each layer owns ([`crate::listen`],
//! [`crate::metrics`], [`crate::security`], [`crate::rpc::limits`], [`crate::rpc::worker`],
//! [`crate::logging`]): the error a section's pure check returns, and the serde helpers the
//! sections share.
//!
//! Owns: [`Invalid`]. Invariant: nothing here does I/O, and this module imports nothing from
//! the crate, so every section can use it; a section check that fails names the full config
//! key (`listen.idle_timeout`, `workers.allow[2].handlers`) and the problem, and
//! [`crate::config::ConfigError::Invalid`] carries both unchanged.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A setting that cannot be honoured: the full config key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key {key}: {problem}")]
pub struct Invalid {
    pub key: String,
    pub problem: String,
}

/// An [`Invalid`] for `key`.
pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Deserializes a humantime duration (`"500ms"`, `"10s"`).
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("bad duration {s:?}: {e} (e.g. \"500ms\", \"10s\")"))
    })
}
