//! SIGHUP reload: compare the config in force with a freshly read one, refuse what cannot
//! change in a running daemon, and apply the rest without touching queued or running work.
//!
//! Owns: the split of config keys into *live* and *restart-only*, and the two-phase reload.
//! Invariant: a reload is all or nothing. [`plan`] checks everything first (the new file's own
//! validity, its `[security]` and `[exec]` resolved again as at start, every restart-only key,
//! every workqueue change against the engine's current contents) and touches nothing; only a
//! complete [`Plan`] is [`apply`]d. The one step that can
//! still fail while applying, toggling `ordered` on a workqueue that became non-empty after
//! the check, runs first and is rolled back on failure, so the old config stays in force.
//!
//! Live keys: `[[workqueue]]` (new entries are created, changed ones updated; an entry removed
//! from the file leaves its workqueue as it is, with a log line: deleting it is an explicit
//! `wqctl wq delete`), `[[group]]`, `[[partition]]`, `topology.shard_cores` (a new group map,
//! published as a new epoch), `limits.*` except `max_message_bytes` and `max_result_bytes`, `[exec]` (the handler
//! registry is replaced; queued items keep their handler), `[log] level`, and
//! `engine.shutdown_grace`. Every other key (listeners and their connection limits, metrics
//! address, sysfs root, pinning, rescan, netlink, isolated CPUs, the engine's tuning,
//! `[security]`, and any section this module does not know) needs a restart: a change to it
//! refuses the whole reload.
//!
//! An entry whose attributes did not change in the file is not touched, so changes made over
//! the API (`UpdateWorkqueue`) survive a reload that did not mention that workqueue.

use std::collections::BTreeMap;

use crate::config::{Config, ConfigError};
use crate::rpc::limits::{Limits, SharedLimits};
use crate::security::{Security, SecurityError};
use wqd_core::engine::{Engine, EngineError, WorkqueueAttrs, WorkqueueStats};
use wqd_core::groups::GroupsConfig;
use wqd_core::handler::exec::ExecConfig;
use wqd_core::handler::Registry;
use wqd_core::live::LiveView;

/// Why a reload was refused. The old config stays in force in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `[security]` (or an `[exec]` that would run as root) no longer resolves: a user, group
    /// or file changed under the running daemon.
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("config key {key} changed ({old} -> {new}) but cannot change while wqd runs; restart wqd to apply it")]
    NeedsRestart {
        key: String,
        old: String,
        new: String,
    },
    #[error("config key {key}: {problem}")]
    Workqueue { key: String, problem: String },
    #[error("applying workqueue {name}: {source} (nothing was changed)")]
    Apply {
        name: String,
        #[source]
        source: EngineError,
    },
}

pub use crate::logging::LogSetter;

/// What a reload will do, computed by [`plan`] without side effects.
#[derive(Debug, Default)]
pub struct Plan {
    /// Updates that toggle `ordered` (applied first; the only fallible step). With the
    /// attributes in force before, for the rollback.
    pub toggles: Vec<(WorkqueueAttrs, WorkqueueAttrs)>,
    pub updates: Vec<WorkqueueAttrs>,
    pub creates: Vec<WorkqueueAttrs>,
    /// Workqueues that left the file; left as they are.
    pub left_alone: Vec<String>,
    pub groups: Option<GroupsConfig>,
    pub limits: Option<Limits>,
    pub exec: Option<Option<ExecConfig>>,
    /// The new `[log] level` (`None`: back to `info`), when it changed.
    pub log: Option<Option<String>>,
}

impl Plan {
    /// Whether the reload changes nothing.
    pub fn is_empty(&self) -> bool {
        self.toggles.is_empty()
            && self.updates.is_empty()
            && self.creates.is_empty()
            && self.groups.is_none()
            && self.limits.is_none()
            && self.exec.is_none()
            && self.log.is_none()
    }

    /// One line for the log and `STATUS=`.
    pub fn summary(&self) -> String {
        let names = |v: &[WorkqueueAttrs]| {
            v.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut parts = Vec::new();
        if !self.creates.is_empty() {
            parts.push(format!("created workqueues {}", names(&self.creates)));
        }
        let updated: Vec<WorkqueueAttrs> = self
            .toggles
            .iter()
            .map(|(n, _)| n.clone())
            .chain(self.updates.iter().cloned())
            .collect();
        if !updated.is_empty() {
            parts.push(format!("updated workqueues {}", names(&updated)));
        }
        if self.groups.is_some() {
            parts.push("new groups/partitions".into());
        }
        if self.limits.is_some() {
            parts.push("new limits".into());
        }
        if self.exec.is_some() {
            parts.push("new exec allowlist".into());
        }
        if self.log.is_some() {
            parts.push("new log level".into());
        }
        if parts.is_empty() {
            "no change".into()
        } else {
            parts.join("; ")
        }
    }
}

fn restart(key: &str, old: impl std::fmt::Debug, new: impl std::fmt::Debug) -> ReloadError {
    ReloadError::NeedsRestart {
        key: key.to_string(),
        old: format!("{old:?}"),
        new: format!("{new:?}"),
    }
}

/// Compares `$old.$f` and `$new.$f` for each field, refusing the first that differs.
macro_rules! same {
    ($old:expr, $new:expr, $section:literal, $($f:ident),+) => {
        $(
            if $old.$f != $new.$f {
                return Err(restart(concat!($section, ".", stringify!($f)), &$old.$f, &$new.$f));
            }
        )+
    };
}

/// The config with every live key reset, so that two configs that differ only in live keys
/// compare equal (catches restart-only keys of sections this module does not name).
fn restart_only_part(c: &Config) -> Config {
    let mut r = c.clone();
    r.groups.clear();
    r.partitions.clear();
    r.workqueues.clear();
    r.exec = None;
    r.log = Default::default();
    r.topology.shard_cores = 0;
    r.limits = Limits {
        max_message_bytes: c.limits.max_message_bytes,
        max_result_bytes: c.limits.max_result_bytes,
        ..Limits::default()
    };
    r.engine.shutdown_grace = Default::default();
    r
}

fn check_restart_only(old: &Config, new: &Config) -> Result<(), ReloadError> {
    same!(
        old.listen,
        new.listen,
        "listen",
        socket,
        socket_mode,
        tcp,
        allow_remote,
        max_connections,
        handshake_timeout,
        idle_timeout,
        keepalive_interval,
        rewrite_authority,
        rpc_threads
    );
    same!(old.metrics, new.metrics, "metrics", listen);
    same!(
        old.topology,
        new.topology,
        "topology",
        sysfs_root,
        rescan,
        netlink,
        include_isolated,
        pinning
    );
    same!(
        old.limits,
        new.limits,
        "limits",
        max_message_bytes,
        max_result_bytes
    );
    same!(
        old.engine,
        new.engine,
        "engine",
        results_max,
        results_ttl,
        watchdog_thresh,
        hog_thresh,
        max_workers_per_cpu,
        load_sample,
        results_memory
    );
    same!(
        old.security,
        new.security,
        "security",
        socket_group,
        allowed_uids,
        allowed_gids,
        read_open,
        tcp_plaintext_loopback,
        tls_cert,
        tls_key,
        client_ca,
        token_file,
        exec_as_root
    );
    same!(
        old.workers,
        new.workers,
        "workers",
        handlers,
        max_workers,
        max_credits,
        allow
    );
    if old.fleet != new.fleet {
        return Err(restart("fleet", &old.fleet, &new.fleet));
    }
    if restart_only_part(old) != restart_only_part(new) {
        return Err(ReloadError::NeedsRestart {
            key: "(a section that is not reloadable, e.g. [security])".into(),
            old: "the running config".into(),
            new: "the file".into(),
        });
    }
    Ok(())
}

/// The attributes each file entry gives, by name (`default` included, always).
fn wq_map(c: &Config) -> Result<BTreeMap<String, (usize, WorkqueueAttrs)>, ConfigError> {
    let mut m = BTreeMap::new();
    let default = c.engine_config()?.default_wq;
    let default_idx = c.workqueues.iter().position(|w| w.name == "default");
    m.insert("default".to_string(), (default_idx.unwrap_or(0), default));
    let extra = c.extra_workqueues()?;
    let indexes = c
        .workqueues
        .iter()
        .enumerate()
        .filter(|(_, w)| w.name != "default")
        .map(|(i, _)| i);
    for (i, a) in indexes.zip(extra) {
        m.insert(a.name.clone(), (i, a));
    }
    Ok(m)
}

/// Works out what reloading `new` over `old` does, given the engine's workqueues now.
/// Touches nothing.
///
/// # Errors
/// [`ReloadError::Config`] when `new` is invalid, [`ReloadError::Security`] when its
/// `[security]` or `[exec]` no longer resolves, [`ReloadError::NeedsRestart`] naming the
/// first restart-only key that changed, [`ReloadError::Workqueue`] for a change the engine
/// would refuse (toggling `ordered` on a non-empty workqueue).
pub fn plan(old: &Config, new: &Config, current: &[WorkqueueStats]) -> Result<Plan, ReloadError> {
    new.validate()?;
    // The I/O half of the checks start-up made: `[security]` is restart-only, but its users,
    // groups and files may have changed since, and `[exec]` is live (it must not start to run
    // as root). The daemon keeps the `Security` it resolved at start.
    Security::resolve(&new.security, new.listen.tcp, new.exec.as_ref())?;
    check_restart_only(old, new)?;
    let mut p = Plan::default();
    let was = wq_map(old)?;
    let now = wq_map(new)?;
    let engine: BTreeMap<&str, &WorkqueueStats> =
        current.iter().map(|s| (s.attrs.name.as_str(), s)).collect();
    for (name, (i, attrs)) in &now {
        let changed = was.get(name).is_none_or(|(_, a)| a != attrs);
        if !changed {
            continue;
        }
        match engine.get(name.as_str()) {
            None => p.creates.push(attrs.clone()),
            Some(s) if s.attrs == *attrs => {}
            Some(s) if s.attrs.ordered != attrs.ordered => {
                let items = s.delayed + s.pending + s.running;
                if items > 0 {
                    return Err(ReloadError::Workqueue {
                        key: format!("workqueue[{i}].ordered"),
                        problem: format!(
                            "workqueue {name:?} holds {items} items; `ordered` can change only on an empty workqueue (drain it first)"
                        ),
                    });
                }
                p.toggles.push((attrs.clone(), s.attrs.clone()));
            }
            Some(_) => p.updates.push(attrs.clone()),
        }
    }
    p.left_alone = was
        .keys()
        .filter(|n| !now.contains_key(*n) && engine.contains_key(n.as_str()))
        .cloned()
        .collect();
    let (og, ng) = (old.groups_config()?, new.groups_config()?);
    if og != ng {
        p.groups = Some(ng);
    }
    if old.limits != new.limits {
        p.limits = Some(new.limits.clone());
    }
    if old.exec != new.exec {
        p.exec = Some(new.exec.clone());
    }
    if old.log.level != new.log.level {
        p.log = Some(new.log.level.clone());
    }
    Ok(p)
}

/// What [`apply`] changes.
pub struct Targets<'a> {
    pub engine: &'a Engine,
    pub view: &'a LiveView,
    pub limits: &'a SharedLimits,
    /// `None` when `--log-level` or `RUST_LOG` fixed the filter (the file's level then does
    /// not apply, at start or on reload).
    pub log: Option<&'a LogSetter>,
}

/// Applies a plan. Postcondition on `Ok`: every change of the plan is in force; queued and
/// running items were not touched (an updated workqueue's queues are re-resolved, as
/// `UpdateWorkqueue` does). On `Err` nothing was changed.
///
/// # Errors
/// [`ReloadError::Apply`] when an `ordered` toggle races with a submission (rolled back).
pub fn apply(p: &Plan, t: &Targets<'_>) -> Result<(), ReloadError> {
    for (k, (attrs, _)) in p.toggles.iter().enumerate() {
        if let Err(source) = t.engine.update_workqueue(attrs.clone()) {
            for (_, before) in p.toggles[..k].iter().rev() {
                if let Err(e) = t.engine.update_workqueue(before.clone()) {
                    tracing::error!(workqueue = %before.name, error = %e, "cannot roll back a workqueue's `ordered`");
                }
            }
            return Err(ReloadError::Apply {
                name: attrs.name.clone(),
                source,
            });
        }
    }
    for a in &p.updates {
        if let Err(e) = t.engine.update_workqueue(a.clone()) {
            // Only a concurrent DeleteWorkqueue can get here; the file wins: create it again.
            tracing::warn!(workqueue = %a.name, error = %e, "workqueue vanished during reload; creating it");
            create_or_update(t.engine, a);
        }
    }
    for a in &p.creates {
        create_or_update(t.engine, a);
    }
    for name in &p.left_alone {
        tracing::info!(workqueue = %name, "workqueue removed from the config file is left as it is (delete it with `wqctl wq delete` once empty)");
    }
    if let Some(g) = &p.groups {
        t.view.set_groups_config(g.clone());
    }
    if let Some(l) = &p.limits {
        t.engine.set_max_durations(l.max_delay, l.max_deadline);
        t.limits.store(l.clone());
    }
    if let Some(exec) = &p.exec {
        t.engine.set_handlers(Registry::with_builtins(exec.clone()));
    }
    if let (Some(level), Some(set)) = (&p.log, t.log) {
        let level = level.as_deref().unwrap_or("info");
        if let Err(e) = set(level) {
            // Validated before; a failure here is the subscriber's and not worth a refusal.
            tracing::error!(level, error = %e, "cannot change the log level");
        }
    }
    Ok(())
}

fn create_or_update(engine: &Engine, a: &WorkqueueAttrs) {
    let r = match engine.create_workqueue(a.clone()) {
        Err(EngineError::WorkqueueExists(_)) => engine.update_workqueue(a.clone()),
        r => r,
    };
    if let Err(e) = r {
        tracing::error!(workqueue = %a.name, error = %e, "cannot apply a workqueue from the config");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: &str) -> Config {
        let c = Config::from_toml(t, "t.toml").unwrap();
        c.validate().unwrap();
        c
    }

    fn stats(c: &Config, busy: &[(&str, usize)]) -> Vec<WorkqueueStats> {
        wq_map(c)
            .unwrap()
            .into_values()
            .map(|(_, attrs)| WorkqueueStats {
                pending: busy
                    .iter()
                    .find(|(n, _)| *n == attrs.name)
                    .map_or(0, |b| b.1),
                attrs,
                draining: false,
                delayed: 0,
                running: 0,
                totals: Default::default(),
                submitted: 0,
            })
            .collect()
    }

    #[test]
    fn live_changes_are_planned() {
        let old = cfg("[[workqueue]]\nname = \"a\"\n[[workqueue]]\nname = \"gone\"\n");
        let new = cfg(r#"
[limits]
max_batch_items = 7
[[workqueue]]
name = "a"
max_active = 4
[[workqueue]]
name = "b"
[[group]]
name = "io"
cpus = "0-1"
[log]
level = "debug"
"#);
        let p = plan(&old, &new, &stats(&old, &[("a", 5)])).unwrap();
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].max_active, 4);
        assert_eq!(p.creates.len(), 1);
        assert_eq!(p.creates[0].name, "b");
        assert_eq!(p.left_alone, vec!["gone".to_string()]);
        assert!(p.groups.is_some());
        assert_eq!(p.limits.as_ref().unwrap().max_batch_items, 7);
        assert_eq!(p.log, Some(Some("debug".into())));
        assert!(p.summary().contains("created workqueues b"));
        assert!(plan(&old, &old, &stats(&old, &[])).unwrap().is_empty());
    }

    #[test]
    fn restart_only_changes_are_refused_naming_the_key() {
        let old = cfg("");
        for (t, key) in [
            ("[listen]\nsocket = \"/tmp/other.sock\"", "listen.socket"),
            (
                "[listen]\ntcp = \"127.0.0.1:1\"\n[security]\ntcp_plaintext_loopback = true",
                "listen.tcp",
            ),
            ("[security]\nallowed_uids = [0]", "security.allowed_uids"),
            ("[security]\nread_open = false", "security.read_open"),
            ("[topology]\nsysfs_root = \"/x\"", "topology.sysfs_root"),
            ("[topology]\npinning = \"off\"", "topology.pinning"),
            (
                "[limits]\nmax_message_bytes = 4096",
                "limits.max_message_bytes",
            ),
            ("[engine]\nresults_max = 5", "engine.results_max"),
            ("[metrics]\nlisten = \"127.0.0.1:9\"", "metrics.listen"),
        ] {
            let e = plan(&old, &cfg(t), &stats(&old, &[])).unwrap_err();
            assert!(
                matches!(&e, ReloadError::NeedsRestart { key: k, .. } if k == key),
                "{t}: {e}"
            );
            assert!(e.to_string().contains("restart"), "{e}");
        }
        // Live ones pass.
        assert!(plan(
            &old,
            &cfg("[engine]\nshutdown_grace = \"3s\"\n[topology]\nshard_cores = 2"),
            &stats(&old, &[])
        )
        .is_ok());
    }

    #[test]
    fn ordered_toggle_on_a_busy_workqueue_is_refused() {
        let old = cfg("[[workqueue]]\nname = \"a\"");
        let new = cfg("[[workqueue]]\nname = \"a\"\nordered = true");
        let e = plan(&old, &new, &stats(&old, &[("a", 3)])).unwrap_err();
        assert!(e.to_string().contains("workqueue[0].ordered"), "{e}");
        let p = plan(&old, &new, &stats(&old, &[])).unwrap();
        assert_eq!(p.toggles.len(), 1);
    }

    #[test]
    fn an_invalid_file_is_refused_naming_the_key() {
        let old = cfg("");
        let new = Config::from_toml("[limits]\nmax_queued = 0", "t.toml").unwrap();
        let e = plan(&old, &new, &stats(&old, &[])).unwrap_err();
        assert!(e.to_string().contains("limits.max_queued"), "{e}");
    }
}
