//! The daemon's configuration file: the TOML (`--config FILE`, else `/etc/wqd/wqd.toml` when
//! present, else the embedded defaults), the [`Config`] that aggregates its sections, and the
//! conversion of the core's sections into what the core takes ([`EngineConfig`],
//! [`LiveConfig`], [`MonitorConfig`], the handler allowlist).
//!
//! Owns: the file format (every table is `deny_unknown_fields`), the sections that configure
//! the core (`[topology]`, `[[group]]`, `[[partition]]`, `[[workqueue]]`, `[engine]`, `[exec]`)
//! and [`ConfigError`]. Each daemon layer owns its own section type and its pure check
//! (`[listen]` in [`crate::listen`], `[metrics]` in [`crate::metrics`], `[security]` in
//! [`crate::security`], `[limits]` in [`crate::rpc::limits`], `[workers]` in
//! [`crate::rpc::worker`], `[log]` in [`crate::logging`], `[fleet]` in [`crate::fleet`]); they
//! are re-exported here.
//!
//! Invariants: a [`Config`] is plain data, and [`Config::validate`] does no I/O of its own:
//! it runs every section's pure check (resolving users and groups, `[exec]`'s `run_as_user`
//! among them, and reading TLS and token files is `Security::resolve`'s, once at start and
//! again on reload). A config that `validate` accepted converts into the engine, live
//! view and handler settings without further errors; every error names the key (`limits.
//! max_batch_items`, `group[2].cpus`, ...) and the problem. Command-line flags are applied on
//! top of the file by the binary before `validate` runs. Only the daemon's wiring
//! (`crate::daemon`, the binary) and `crate::reload` import this module.
//!
//! To add a section, give its layer the section type (`#[serde(default, deny_unknown_fields)]`)
//! and a pure `check`, add a field to [`Config`] and the call to [`Config::validate`], and
//! its keys to `docs/daemon.md` and `deploy/wqd.toml`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{EngineConfig, WorkqueueAttrs, WorkqueueChanges};
use wqd_core::groups::GroupsConfig;
use wqd_core::handler::exec::ExecConfig;
use wqd_core::live::{LiveConfig, MonitorConfig};

use crate::settings::{de_duration, Invalid};

// The sections each layer owns, re-exported so `wqd::config::X` names every section type.
pub use crate::fleet::FleetConfig;
pub use crate::listen::{parse_mode, ListenConfig, KEEPALIVE_TIMEOUT};
pub use crate::logging::LogConfig;
pub use crate::metrics::MetricsConfig;
pub use crate::rpc::limits::{Limits, SharedLimits};
pub use crate::rpc::worker::{WorkerRule, WorkersSection};
pub use crate::security::{IdSpec, SecurityConfig};

/// The file read when `--config` is not given, if it exists.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/wqd/wqd.toml";

/// Errors of the config layer. The binary exits 64 (`EX_USAGE`) on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key {key}: {problem}")]
    Invalid { key: String, problem: String },
}

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        ConfigError::Invalid {
            key: e.key,
            problem: e.problem,
        }
    }
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    crate::settings::invalid(key, problem).into()
}

/// Whether worker threads are pinned to their CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pinning {
    /// On, unless `--sysfs-root` names CPUs this process may not run on.
    #[default]
    Auto,
    /// Always pin.
    On,
    /// Never pin.
    Off,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub metrics: MetricsConfig,
    pub limits: Limits,
    pub topology: TopologyConfig,
    #[serde(rename = "group")]
    pub groups: Vec<GroupEntry>,
    #[serde(rename = "partition")]
    pub partitions: Vec<PartitionEntry>,
    #[serde(rename = "workqueue")]
    pub workqueues: Vec<WorkqueueEntry>,
    /// The `exec` handler's allowlist; absent means no `exec` handler.
    pub exec: Option<ExecConfig>,
    pub engine: EngineSection,
    pub log: LogConfig,
    /// Who may connect and call what: see `crate::security` and `docs/security.md`.
    pub security: SecurityConfig,
    /// Attached workers (`WorkerService`): who may serve which handler names; see
    /// `docs/workers.md`.
    pub workers: WorkersSection,
    /// Membership of a fleet over NATS JetStream; absent (the default) means standalone: the
    /// daemon never touches the network for it. See `docs/fleet.md`.
    pub fleet: Option<FleetConfig>,
}

/// `[topology]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// A tree standing in for `/sys` (fixture); topology and allowed CPUs both come from it.
    pub sysfs_root: Option<PathBuf>,
    /// Period of the periodic rescan.
    #[serde(deserialize_with = "de_duration")]
    pub rescan: Duration,
    /// Listen to kernel CPU uevents for immediate rescans.
    pub netlink: bool,
    /// Count isolated CPUs as live.
    pub include_isolated: bool,
    /// Cores per shard (0: one shard per LLC).
    pub shard_cores: u32,
    pub pinning: Pinning,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            sysfs_root: None,
            rescan: Duration::from_secs(1),
            netlink: true,
            include_isolated: false,
            shard_cores: GroupsConfig::default().shard_cores,
            pinning: Pinning::Auto,
        }
    }
}

/// `[[group]]`: a named group.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub name: String,
    /// A kernel cpulist.
    pub cpus: String,
}

/// `[[partition]]`: `name:0`, `name:1`, ... each `size` CPU numbers wide.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartitionEntry {
    pub name: String,
    pub cpus: String,
    pub size: u32,
}

/// `[[workqueue]]`: created at start (`name = "default"` sets the default workqueue's
/// attributes). Unset keys take the engine's defaults (and `limits.max_queued`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkqueueEntry {
    pub name: String,
    pub max_active: Option<u32>,
    pub max_waiting: Option<u32>,
    pub group_max_active: Option<u32>,
    pub ordered: Option<bool>,
    pub nice: Option<i32>,
    /// `first`, `spread`, `least-loaded` or `idle`.
    pub placement: Option<String>,
    /// `widen`, `wait` or `reject`.
    pub fallback: Option<String>,
    pub max_queued: Option<usize>,
    /// `fail` or `requeue` (attached-worker handlers).
    pub on_worker_lost: Option<String>,
    /// `wait` or `reject` (attached-worker handlers).
    pub unserved: Option<String>,
    /// `full`, `summary` or `none`: what is kept of each item once it ends.
    pub results: Option<String>,
}

/// `[engine]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// Results kept at most after items are terminal.
    pub results_max: usize,
    /// How long results are kept.
    #[serde(deserialize_with = "de_duration")]
    pub results_ttl: Duration,
    /// Lockup report threshold (0 = off).
    #[serde(deserialize_with = "de_duration")]
    pub watchdog_thresh: Duration,
    /// CPU hog report threshold (0 = off).
    #[serde(deserialize_with = "de_duration")]
    pub hog_thresh: Duration,
    /// Worker threads per CPU at most.
    pub max_workers_per_cpu: usize,
    /// On SIGTERM/SIGINT, how long running items get before they are cancelled.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Period of the host load sampler (GetTopology `busy`, `idle` placement).
    #[serde(deserialize_with = "de_duration")]
    pub load_sample: Duration,
    /// Bytes all retained results may take (estimated); the oldest are forgotten beyond it.
    pub results_memory: usize,
    /// `spread` wakes a worker on the CPU the RPC thread runs on first, when that CPU is in
    /// the group and runs no item (see `EngineConfig::wake_local`).
    pub wake_local: bool,
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            results_max: e.results_max,
            results_ttl: e.results_ttl,
            watchdog_thresh: e.watchdog_thresh,
            hog_thresh: e.hog_thresh,
            max_workers_per_cpu: e.max_workers_per_cpu,
            shutdown_grace: Duration::from_secs(10),
            load_sample: wqd_core::load::DEFAULT_PERIOD,
            results_memory: e.results_memory,
            // The library's default is off (an in-process submitter may keep its CPU); the
            // daemon's RPC thread gives it up.
            wake_local: true,
        }
    }
}

impl Config {
    /// Reads `path` if given, else [`SYSTEM_CONFIG_PATH`] if it exists, else the defaults.
    /// Does not [`validate`](Self::validate) (flags are applied first).
    ///
    /// # Errors
    /// [`ConfigError::Read`] for a given file that cannot be read, [`ConfigError::Parse`]
    /// naming the key and line for bad TOML, unknown keys or wrong types.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(SYSTEM_CONFIG_PATH);
                if !p.exists() {
                    return Ok(Config::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Checks everything the types cannot.
    ///
    /// # Errors
    /// The first [`ConfigError::Invalid`] found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen.check()?;
        self.metrics.check(self.listen.allow_remote)?;
        self.workers.check()?;
        self.limits.check()?;
        if self.engine.results_memory == 0 {
            return Err(invalid("engine.results_memory", "must be at least 1"));
        }
        if self.topology.rescan < Duration::from_millis(10) {
            return Err(invalid(
                "topology.rescan",
                format!("{:?} is too short (at least 10ms)", self.topology.rescan),
            ));
        }
        self.groups_config()?;
        let mut names = BTreeSet::new();
        for (i, w) in self.workqueues.iter().enumerate() {
            if !names.insert(w.name.as_str()) {
                return Err(invalid(
                    format!("workqueue[{i}].name"),
                    format!("workqueue {:?} is defined twice", w.name),
                ));
            }
            self.wq_attrs(i, w)?;
        }
        if let Some(exec) = &self.exec {
            // The pure part; the user and group lookups run once, in `Security::resolve`.
            exec.check().map_err(|e| invalid("exec", e))?;
        }
        let e = &self.engine;
        if e.results_max == 0 {
            return Err(invalid("engine.results_max", "must be at least 1"));
        }
        if e.max_workers_per_cpu == 0 {
            return Err(invalid("engine.max_workers_per_cpu", "must be at least 1"));
        }
        self.log.check()?;
        // [security]: only what needs no I/O; users, groups and files are resolved once at
        // start (crate::daemon) and re-checked on reload (crate::reload).
        self.security.check(self.listen.tcp)?;
        if let Some(f) = &self.fleet {
            f.check()?;
        }
        Ok(())
    }

    /// The groups settings from `[topology]`, `[[group]]` and `[[partition]]`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the entry.
    pub fn groups_config(&self) -> Result<GroupsConfig, ConfigError> {
        let mut g = GroupsConfig {
            shard_cores: self.topology.shard_cores,
            ..GroupsConfig::default()
        };
        for (i, e) in self.groups.iter().enumerate() {
            let cpus = CpuSet::parse_list(&e.cpus)
                .map_err(|err| invalid(format!("group[{i}].cpus"), err.to_string()))?;
            if cpus.is_empty() {
                return Err(invalid(format!("group[{i}].cpus"), "names no CPU"));
            }
            wqd_core::target::check_name(&e.name)
                .map_err(|err| invalid(format!("group[{i}].name"), err.to_string()))?;
            if g.named.insert(e.name.clone(), cpus).is_some() {
                return Err(invalid(
                    format!("group[{i}].name"),
                    format!("group {:?} is defined twice", e.name),
                ));
            }
        }
        for (i, e) in self.partitions.iter().enumerate() {
            let cpus = CpuSet::parse_list(&e.cpus)
                .map_err(|err| invalid(format!("partition[{i}].cpus"), err.to_string()))?;
            if g.partitions.contains_key(&e.name) {
                return Err(invalid(
                    format!("partition[{i}].name"),
                    format!("partition {:?} is defined twice", e.name),
                ));
            }
            g.partition_ranges(&e.name, &cpus, e.size)
                .map_err(|err| invalid(format!("partition[{i}]"), err.to_string()))?;
        }
        g.validate()
            .map_err(|err| invalid("group", err.to_string()))?;
        Ok(g)
    }

    fn wq_attrs(&self, i: usize, w: &WorkqueueEntry) -> Result<WorkqueueAttrs, ConfigError> {
        /// A word key (`placement = "spread"`) read with the type's `FromStr`.
        fn word<T: std::str::FromStr>(
            i: usize,
            k: &str,
            v: &Option<String>,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e: T::Err| invalid(format!("workqueue[{i}].{k}"), e.to_string()))
        }
        let changes = WorkqueueChanges {
            max_active: w.max_active,
            max_waiting: w.max_waiting,
            group_max_active: w.group_max_active,
            ordered: w.ordered,
            nice: w.nice,
            placement: word(i, "placement", &w.placement)?,
            fallback: word(i, "fallback", &w.fallback)?,
            max_queued: w.max_queued,
            on_worker_lost: word(i, "on_worker_lost", &w.on_worker_lost)?,
            unserved: word(i, "unserved", &w.unserved)?,
            results: word(i, "results", &w.results)?,
        };
        let a = WorkqueueAttrs::new(&w.name, self.limits.max_queued).with(&changes);
        a.validate()
            .map_err(|e| invalid(format!("workqueue[{i}]"), e.to_string()))?;
        Ok(a)
    }

    /// The workqueues to create at start (not `default`), in file order.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn extra_workqueues(&self) -> Result<Vec<WorkqueueAttrs>, ConfigError> {
        self.workqueues
            .iter()
            .enumerate()
            .filter(|(_, w)| w.name != "default")
            .map(|(i, w)| self.wq_attrs(i, w))
            .collect()
    }

    /// The engine settings (hooks and pinning are the daemon's to fill in).
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn engine_config(&self) -> Result<EngineConfig, ConfigError> {
        let mut default_wq = WorkqueueAttrs::new("default", self.limits.max_queued);
        if let Some((i, w)) = self
            .workqueues
            .iter()
            .enumerate()
            .find(|(_, w)| w.name == "default")
        {
            default_wq = self.wq_attrs(i, w)?;
        }
        let e = &self.engine;
        Ok(EngineConfig {
            results_max: e.results_max,
            results_ttl: e.results_ttl,
            watchdog_thresh: e.watchdog_thresh,
            hog_thresh: e.hog_thresh,
            max_workers_per_cpu: e.max_workers_per_cpu,
            results_memory: e.results_memory,
            max_result_bytes: self.limits.max_result_bytes,
            max_delay: self.limits.max_delay,
            max_deadline: self.limits.max_deadline,
            default_wq,
            max_credits: self.workers.max_credits,
            wake_local: e.wake_local,
            ..EngineConfig::default()
        })
    }

    /// The live view settings.
    ///
    /// # Errors
    /// As [`groups_config`](Self::groups_config).
    pub fn live_config(&self) -> Result<LiveConfig, ConfigError> {
        Ok(LiveConfig {
            include_isolated: self.topology.include_isolated,
            groups: self.groups_config()?,
        })
    }

    /// The monitor settings.
    pub fn monitor_config(&self) -> MonitorConfig {
        MonitorConfig {
            rescan: self.topology.rescan,
            netlink: self.topology.netlink,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wqd_core::engine::ResultsMode;
    use wqd_core::groups::{Fallback, Placement};

    fn parse(t: &str) -> Result<Config, ConfigError> {
        let c = Config::from_toml(t, "test.toml")?;
        c.validate()?;
        Ok(c)
    }

    fn err(t: &str) -> String {
        parse(t).expect_err("must fail").to_string()
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.socket_mode, 0o660);
        assert_eq!(c.limits.max_batch_items, 1 << 22);
        assert_eq!(c.engine.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.engine_config().unwrap().default_wq.max_queued, 1 << 22);
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
[listen]
socket = "/tmp/x.sock"
socket_mode = "0600"
tcp = "127.0.0.1:7070"
[metrics]
listen = "127.0.0.1:9100"
[limits]
max_message_bytes = 1048576
max_batch_items = 100
max_payload_bytes = 10
max_queued = 50
[topology]
rescan = "250ms"
netlink = false
include_isolated = true
shard_cores = 2
pinning = "off"
[[group]]
name = "io"
cpus = "0-1"
[[partition]]
name = "rcu"
cpus = "0-7"
size = 4
[[workqueue]]
name = "default"
max_active = 2
[[workqueue]]
name = "bulk"
placement = "least-loaded"
fallback = "wait"
ordered = true
results = "summary"
[exec]
[engine]
results_ttl = "1m"
hog_thresh = "0s"
[security]
tcp_plaintext_loopback = true
read_open = true
"#,
        )
        .unwrap();
        assert_eq!(c.listen.socket_mode, 0o600);
        assert_eq!(c.topology.pinning, Pinning::Off);
        assert_eq!(c.topology.rescan, Duration::from_millis(250));
        let g = c.groups_config().unwrap();
        assert_eq!(g.partitions["rcu"].len(), 2);
        assert_eq!(g.named["io"].to_string(), "0-1");
        let e = c.engine_config().unwrap();
        assert_eq!(e.default_wq.max_active, 2);
        assert_eq!(e.default_wq.max_queued, 50);
        assert_eq!(e.results_ttl, Duration::from_secs(60));
        let w = c.extra_workqueues().unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].placement, Placement::LeastLoaded);
        assert_eq!(w[0].fallback, Fallback::Wait);
        assert_eq!(w[0].results, ResultsMode::Summary);
        assert_eq!(e.default_wq.results, ResultsMode::Full);
        assert!(c.exec.is_some());
        assert!(c.security.tcp_plaintext_loopback);
    }

    /// `engine.wake_local` is on unless the config turns it off (the library's own default is
    /// off), and reaches the engine's config; a value that is not a boolean is refused.
    #[test]
    fn wake_local_defaults_on_for_the_daemon() {
        assert!(!EngineConfig::default().wake_local);
        assert!(parse("").unwrap().engine_config().unwrap().wake_local);
        let off = parse("[engine]\nwake_local = false").unwrap();
        assert!(!off.engine_config().unwrap().wake_local);
        let e = err("[engine]\nwake_local = \"yes\"");
        assert!(e.contains("wake_local"), "{e}");
    }

    /// `listen.rpc_threads`: 0 picks one thread per four CPUs (at least one), a number is
    /// taken as written up to 256, beyond is refused naming the key.
    #[test]
    fn rpc_threads_default_to_one_per_four_cpus() {
        let auto = parse("").unwrap().listen;
        assert_eq!(auto.rpc_threads, 0);
        let by_cpus: Vec<usize> = [1, 2, 4, 7, 8, 64, 4096]
            .iter()
            .map(|&n| auto.rpc_threads_in_force(n))
            .collect();
        assert_eq!(by_cpus, [1, 1, 1, 1, 2, 16, 256]);
        let three = parse("[listen]\nrpc_threads = 3").unwrap().listen;
        assert_eq!(
            three.rpc_threads_in_force(2),
            3,
            "as written, whatever the CPUs"
        );
        assert!(parse("[listen]\nrpc_threads = 256").is_ok());
        let e = err("[listen]\nrpc_threads = 257");
        assert!(e.contains("listen.rpc_threads") && e.contains("256"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[limits]\nmax_batch_itmes = 3").contains("max_batch_itmes"));
        assert!(err("[limits]\nmax_batch_items = 0").contains("limits.max_batch_items"));
        assert!(err("[topology]\nrescan = \"soon\"").contains("rescan"));
        assert!(err("[topology]\npinning = \"maybe\"").contains("pinning"));
        assert!(err("[listen]\nsocket_mode = \"999\"").contains("socket_mode"));
        assert!(err("[listen]\nsocket_mode = 0o7777").contains("listen.socket_mode"));
        assert!(err("[listen]\nmax_connections = 0").contains("listen.max_connections"));
        let e = err("[listen]\nhandshake_timeout = \"0s\"");
        assert!(e.contains("listen.handshake_timeout"), "{e}");
        let e = err("[listen]\nidle_timeout = \"1ms\"");
        assert!(e.contains("listen.idle_timeout"), "{e}");
        assert!(err("[listen]\nkeepalive_interval = \"soon\"").contains("keepalive_interval"));
        let e = err("[listen]\nidle_timeout = \"5s\"");
        assert!(
            e.contains("listen.idle_timeout") && e.contains("handshake_timeout"),
            "{e}"
        );
        let c = parse("[listen]\nidle_timeout = \"0s\"\nkeepalive_interval = \"0s\"").unwrap();
        assert!(c.listen.idle_timeout.is_zero());
        let e = err("[listen]\ntcp = \"0.0.0.0:7070\"");
        assert!(
            e.contains("listen.tcp") && e.contains("allow_remote"),
            "{e}"
        );
        // allow_remote passes [listen]; [security] still refuses plaintext off loopback.
        let e = err("[listen]\ntcp = \"0.0.0.0:7070\"\nallow_remote = true");
        assert!(
            e.contains("config key security.tcp_plaintext_loopback"),
            "{e}"
        );
        let e = err("[[group]]\nname = \"io\"\ncpus = \"3-1\"");
        assert!(e.contains("group[0].cpus"), "{e}");
        let e = err("[[group]]\nname = \"cpu\"\ncpus = \"1\"");
        assert!(e.contains("group[0].name") && e.contains("reserved"), "{e}");
        // `each` is the fan-out keyword (each:cache): no group or partition may take it.
        let e = err("[[group]]\nname = \"each\"\ncpus = \"1\"");
        assert!(e.contains("group[0].name") && e.contains("reserved"), "{e}");
        let e = err("[[partition]]\nname = \"each\"\ncpus = \"0-3\"\nsize = 2");
        assert!(e.contains("partition[0]") && e.contains("reserved"), "{e}");
        let e = err("[[partition]]\nname = \"p\"\ncpus = \"0-3\"\nsize = 0");
        assert!(e.contains("partition[0]"), "{e}");
        let e = err("[[workqueue]]\nname = \"a\"\nmax_active = 0");
        assert!(
            e.contains("workqueue[0]") && e.contains("max_active"),
            "{e}"
        );
        let e = err("[[workqueue]]\nname = \"a\"\nplacement = \"random\"");
        assert!(e.contains("workqueue[0].placement"), "{e}");
        let e = err("[[workqueue]]\nname = \"a\"\n[[workqueue]]\nname = \"b\"\nresults = \"some\"");
        assert!(
            e.contains("workqueue[1].results") && e.contains("expected full, summary or none"),
            "{e}"
        );
        let e = err("[[workqueue]]\nname = \"a\"\n[[workqueue]]\nname = \"a\"");
        assert!(e.contains("workqueue[1].name"), "{e}");
        let e = err("[exec.commands.x]\npath = \"relative\"");
        assert!(
            e.contains("config key exec") && e.contains("absolute"),
            "{e}"
        );
        assert!(err("[bogus]\n").contains("bogus"));
    }

    /// `deploy/wqd.toml` documents every key: as shipped it is exactly the defaults, and with
    /// its `#=` example lines switched on it still parses (no key in it is misspelled or
    /// gone) and mentions every field the structs have (no key is undocumented).
    #[test]
    fn deploy_wqd_toml_is_the_defaults_and_documents_every_key() {
        let text = include_str!("../../deploy/wqd.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
        let full: String = text
            .lines()
            .map(|l| l.strip_prefix("#= ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        // Parsed, not validated: the example exec user need not exist on this machine.
        let c = Config::from_toml(&full, "deploy/wqd.toml with examples").unwrap();
        assert!(c.listen.socket.is_some() && c.listen.tcp.is_some());
        assert!(!c.groups.is_empty() && !c.partitions.is_empty() && !c.workqueues.is_empty());
        assert!(c.exec.as_ref().is_some_and(|e| !e.commands.is_empty()));
        // Field names from the Debug form of the fully populated config.
        let debug = format!("{c:#?}");
        let renamed = [
            ("groups", "[[group]]"),
            ("partitions", "[[partition]]"),
            ("workqueues", "[[workqueue]]"),
            ("allow", "[[workers.allow]]"),
        ];
        let mut missing = Vec::new();
        for line in debug.lines() {
            let t = line.trim_start();
            let Some((field, _)) = t.split_once(": ") else {
                continue;
            };
            if field.is_empty() || !field.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_') {
                continue;
            }
            let documented = match renamed.iter().find(|(f, _)| *f == field) {
                Some((_, table)) => text.contains(table),
                None => {
                    text.contains(&format!("{field} ="))
                        || text.contains(&format!("[{field}]"))
                        || text.contains(&format!(".{field}."))
                }
            };
            if !documented {
                missing.push(field.to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "deploy/wqd.toml does not document: {missing:?}"
        );
    }

    #[test]
    fn fleet_is_absent_unless_configured_and_its_errors_name_the_key() {
        assert_eq!(parse("").unwrap().fleet, None);
        let c = parse("[fleet]\nservers = [\"nats://127.0.0.1:4222\"]\nhost = \"h1\"").unwrap();
        assert_eq!(c.fleet.as_ref().and_then(|f| f.host.as_deref()), Some("h1"));
        let e = err("[fleet]\nservers = []");
        assert!(e.contains("config key fleet.servers"), "{e}");
        let e = err("[fleet]\nservers = [\"nats://a:1\"]\nnak_delay = \"1ms\"");
        assert!(e.contains("config key fleet.nak_delay"), "{e}");
        let e = err("[fleet]\nservers = [\"nats://a:1\"]\nack_wait = \"soon\"");
        assert!(e.contains("ack_wait"), "{e}");
    }

    #[test]
    fn bad_log_level_names_the_key() {
        let e = err("[log]\nlevel = \"wqd=loud\"");
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn missing_file_is_a_read_error_naming_it() {
        let e = Config::load(Some(Path::new("/nonexistent/wqd.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/wqd.toml"));
    }
}
