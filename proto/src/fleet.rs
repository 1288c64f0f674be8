//! The fleet's names on NATS: subjects, stream, consumer and bucket names, and the id grammar
//! that members and clients must agree on (the messages are `wqd.fleet.v1`, in
//! [`crate::wqd::fleet::v1`]).
//!
//! Owns [`Names`] and the functions that build every subject. Invariant: every subject is
//! built here, from tokens [`is_token`] accepts, so a host name or batch id can never add a
//! subject level or a wildcard, and a member and a client configured with the same [`Names`]
//! address the same streams.

pub use crate::wqd::fleet::v1::{BatchManifest, FleetItem, FleetResult, HostRecord};

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "wqd.fleet";
/// Default work stream (work-queue retention).
pub const DEFAULT_WORK_STREAM: &str = "WQD_FLEET_WORK";
/// Default results stream (limits retention, de-duplication by `Nats-Msg-Id`).
pub const DEFAULT_RESULTS_STREAM: &str = "WQD_FLEET_RESULTS";
/// Default KV bucket of host records.
pub const DEFAULT_HOSTS_BUCKET: &str = "wqd_fleet_hosts";
/// The durable consumer every member shares for `any` items.
pub const ANY_CONSUMER: &str = "any";

/// The `selector` of an item for any member with a live CPU in its group.
pub const ANY: &str = "any";
/// The `selector` of an item copied once to every member.
pub const EACH_HOST: &str = "each-host";
/// The prefix of the `selector` of an item for one named member (`host=web-12`).
pub const HOST_PREFIX: &str = "host=";

/// Where a fleet lives on NATS. Members and clients of one fleet use the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Subject prefix (dot-separated tokens).
    pub prefix: String,
    pub work_stream: String,
    pub results_stream: String,
    pub hosts_bucket: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            prefix: DEFAULT_PREFIX.into(),
            work_stream: DEFAULT_WORK_STREAM.into(),
            results_stream: DEFAULT_RESULTS_STREAM.into(),
            hosts_bucket: DEFAULT_HOSTS_BUCKET.into(),
        }
    }
}

/// True for a non-empty subject token of `[A-Za-z0-9_-]`, at most 64 bytes: what host names,
/// batch ids, stream and bucket names must be.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Names {
    /// Why these names cannot be used, if they cannot (names the field).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.prefix.is_empty() || !self.prefix.split('.').all(is_token) {
            return Some((
                "prefix",
                format!(
                    "{:?} is not dot-separated tokens of [A-Za-z0-9_-]",
                    self.prefix
                ),
            ));
        }
        for (k, v) in [
            ("work_stream", &self.work_stream),
            ("results_stream", &self.results_stream),
            ("hosts_bucket", &self.hosts_bucket),
        ] {
            if !is_token(v) {
                return Some((
                    k,
                    format!("{v:?} is not a name of [A-Za-z0-9_-] (1-64 bytes)"),
                ));
            }
        }
        if self.work_stream == self.results_stream {
            return Some(("results_stream", "must differ from work_stream".to_string()));
        }
        None
    }
    /// Every subject of the work stream.
    pub fn work_subjects(&self) -> String {
        format!("{}.work.>", self.prefix)
    }
    /// Items for member `host` (host=NAME and each-host copies).
    pub fn host_subject(&self, host: &str) -> String {
        format!("{}.work.host.{host}", self.prefix)
    }
    /// Items for any member.
    pub fn any_subject(&self) -> String {
        format!("{}.work.any", self.prefix)
    }
    /// The durable consumer of member `host`.
    pub fn host_consumer(&self, host: &str) -> String {
        format!("host-{host}")
    }
    /// Every subject of the results stream.
    pub fn results_subjects(&self) -> Vec<String> {
        vec![
            format!("{}.result.>", self.prefix),
            format!("{}.manifest.>", self.prefix),
        ]
    }
    /// The result of item `id` (`<batch>.<key>`).
    pub fn result_subject(&self, id: &str) -> String {
        format!("{}.result.{id}", self.prefix)
    }
    /// Every result of batch `batch`.
    pub fn batch_results(&self, batch: &str) -> String {
        format!("{}.result.{batch}.*", self.prefix)
    }
    /// The manifest of batch `batch`.
    pub fn manifest_subject(&self, batch: &str) -> String {
        format!("{}.manifest.{batch}", self.prefix)
    }
    /// JetStream's advisory when an item of the work stream reached `max_deliver` on `consumer`.
    pub fn max_deliveries_advisory(&self, consumer: &str) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{consumer}",
            self.work_stream
        )
    }
}

/// The id of item `index` of `batch`, for an each-host copy the host's too.
pub fn item_id(batch: &str, index: u32, each_host: Option<&str>) -> String {
    match each_host {
        Some(h) => format!("{batch}.{index}-{h}"),
        None => format!("{batch}.{index}"),
    }
}

/// The result id of group `group` (e.g. `cache:3`) of fan-out item `item_id`: the member
/// that expands an `each:` item publishes one result per group under this id.
pub fn group_id(item_id: &str, group: &str) -> String {
    format!("{item_id}/{group}")
}

/// Every item id a manifest promises, in index order (each-host copies in host order).
pub fn manifest_ids(m: &BatchManifest) -> Vec<String> {
    let each: std::collections::BTreeSet<u32> = m.each_index.iter().copied().collect();
    let mut out = Vec::with_capacity(m.count as usize);
    for i in 0..m.count {
        if each.contains(&i) {
            for h in &m.each_hosts {
                out.push(item_id(&m.batch, i, Some(h)));
            }
        } else {
            out.push(item_id(&m.batch, i, None));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refuse_what_would_change_a_subject() {
        assert!(is_token("web-12") && is_token("a_b") && is_token("X9"));
        for bad in ["", "a.b", "a*", ">", "a b", "é", &"x".repeat(65)] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_problems_name_the_field() {
        assert_eq!(Names::default().problem(), None);
        let n = Names {
            prefix: "a..b".into(),
            ..Names::default()
        };
        assert_eq!(n.problem().map(|p| p.0), Some("prefix"));
        let n = Names {
            hosts_bucket: "a.b".into(),
            ..Names::default()
        };
        assert_eq!(n.problem().map(|p| p.0), Some("hosts_bucket"));
        let n = Names {
            results_stream: DEFAULT_WORK_STREAM.into(),
            ..Names::default()
        };
        assert_eq!(n.problem().map(|p| p.0), Some("results_stream"));
    }

    #[test]
    fn manifest_ids_expand_each_host_items() {
        let m = BatchManifest {
            batch: "b1".into(),
            count: 3,
            each_index: vec![1],
            each_hosts: vec!["h1".into(), "h2".into()],
            submitted_at: None,
        };
        assert_eq!(
            manifest_ids(&m),
            ["b1.0", "b1.1-h1", "b1.1-h2", "b1.2"].map(String::from)
        );
        let n = Names::default();
        assert_eq!(n.result_subject("b1.1-h1"), "wqd.fleet.result.b1.1-h1");
        assert_eq!(n.batch_results("b1"), "wqd.fleet.result.b1.*");
        // A group's result stays one token below the batch: the batch filter matches it.
        let g = group_id("b1.1-h1", "cache:3");
        assert_eq!(g, "b1.1-h1/cache:3");
        assert_eq!(n.result_subject(&g), "wqd.fleet.result.b1.1-h1/cache:3");
    }
}
