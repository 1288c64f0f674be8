//! `[log]`: the log filter the file asks for, its check, and the setter through which a reload
//! changes it.
//!
//! Owns: [`LogConfig`] and [`LogSetter`]. Invariant: a level that [`LogConfig::check`]
//! accepted builds a `tracing_subscriber::EnvFilter`; `--log-level` and `RUST_LOG` take
//! precedence over the file, at start and on reload (the binary then hands out no setter).

use serde::Deserialize;

use crate::settings::{invalid, Invalid};

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `wqd=debug`; `--log-level` and `RUST_LOG`
    /// take precedence.
    pub level: Option<String>,
}

impl LogConfig {
    /// Checks that `level` parses as a filter. Pure.
    ///
    /// # Errors
    /// [`Invalid`] naming `log.level`.
    pub fn check(&self) -> Result<(), Invalid> {
        if let Some(level) = &self.level {
            tracing_subscriber::EnvFilter::try_new(level).map_err(|err| {
                invalid(
                    "log.level",
                    format!(
                        "bad filter {level:?}: {err} (e.g. \"info\", \"wqd=debug,tonic=warn\")"
                    ),
                )
            })?;
        }
        Ok(())
    }
}

/// Sets the log filter (the binary's reload handle); `Err` names the problem.
pub type LogSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
