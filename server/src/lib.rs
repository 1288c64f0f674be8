//! wqd, the daemon: the `wqd` binary's library. It serves the engine of [`wqd_core`] over gRPC
//! (a Unix socket, optionally TCP with TLS), guarded by [`security`], with Prometheus
//! [`metrics`], SIGHUP [`reload`] and [`systemd`] integration, configured by one TOML file
//! ([`config`]) and wired together by [`daemon`].
//!
//! # Which way imports point
//!
//! The modules form a strict order: a module imports only modules below it, never one above
//! or beside it, so no two modules import each other directly or through a chain. From the
//! bottom:
//!
//! 1. [`shared`] (the stop signal, `write_through!`), [`settings`] (what a section check
//!    returns, serde helpers), [`authority`] (the `:authority` rewriter), [`systemd`]: they
//!    import nothing from the crate.
//! 2. [`peer`] (a Unix connection's credentials) → `shared`.
//! 3. [`conn`] (accepting, capping and timing out connections) → `peer`, `authority`, `shared`.
//! 4. The layers, each owning its config section and its pure check: [`listen`] (`[listen]`)
//!    → `conn`, `settings`; [`logging`] (`[log]`) → `settings`; [`metrics`] (`[metrics]`) →
//!    `conn`, `shared`, `settings`; [`security`] (`[security]`, its resolution, the policy
//!    and guard) → `conn`, `peer`, `settings`.
//! 5. [`rpc`] (the gRPC services; `[limits]` in `rpc::limits`, `[workers]` in `rpc::worker`)
//!    → `metrics`, `security`, `conn`, `shared`, `settings`.
//! 6. [`fleet`] (`[fleet]`, the member of a fleet over NATS JetStream) → `rpc`, `metrics`,
//!    `shared`, `settings`.
//! 7. [`config`] (the file: aggregates every section, parses TOML, runs the pure checks; no
//!    I/O of its own) → the sections' modules.
//! 8. [`reload`] → `config`, `rpc`, `security`, `logging`.
//! 9. [`daemon`] (start-up in named steps, run, stop) → everything; the binary (`bin/wqd.rs`)
//!    → `config`, `daemon`, `reload`, `systemd`.
//!
//! Only `daemon`, the binary and `reload` import `config`. Anything that does I/O about the
//! config (resolving users and groups, reading TLS keys and tokens, the daemon's own uid)
//! happens once, in `daemon`'s start-up (and again in `reload`, only to re-check), and the
//! resolved value is passed on.

pub mod authority;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod fleet;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod reload;
pub mod rpc;
pub mod security;
pub mod settings;
pub mod shared;
pub mod systemd;
