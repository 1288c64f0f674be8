//! What a request may do: the class of each method ([`classify`]) and the [`Policy`] that
//! decides, for a peer and a class, whether it passes.
//!
//! Owns: the lists of non-mutating methods and the checks of both doors. Invariants: unknown
//! paths are [`Class::Mutating`] (fail closed); root passes every Unix check; a refusal is a
//! `Status` naming the peer and what is missing, never echoing a token; bearer tokens are
//! compared as SHA-256 digests in constant time. Pure: no I/O, no logging.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::Status;

use crate::peer::PeerCred;

/// What the [`Guard`] enforces. Immutable; shared by every connection of both listeners.
#[derive(Clone)]
pub(super) struct Policy {
    pub(super) uids: BTreeSet<u32>,
    pub(super) gids: BTreeSet<u32>,
    pub(super) read_open: bool,
    /// TCP: a verified client certificate is required (`client_ca` set).
    pub(super) client_cert: bool,
    /// TCP: SHA-256 of the bearer token.
    pub(super) token: Option<[u8; 32]>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("uids", &self.uids)
            .field("gids", &self.gids)
            .field("read_open", &self.read_open)
            .field("client_cert", &self.client_cert)
            .field("token", &self.token.map(|_| "<set>"))
            .finish()
    }
}

/// What a method does, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Changes state or runs work: submit, stream, cancel, drain, workqueue create/update/
    /// delete, and anything not listed below. Gated by `allowed_uids`/`allowed_gids`; logged
    /// with the peer at `info`.
    Mutating,
    /// Reads item results and outputs (Flush, GetResults). Gated like mutating calls, since
    /// outputs (of `exec`, say) may be sensitive; not logged at `info`.
    Results,
    /// Observes the machine and the daemon (topology, stats, workqueue list, worker list,
    /// health, reflection). Open when `read_open` (the default).
    Observe,
    /// Attaching a worker (`WorkerService/Attach`): not gated here; the worker service admits
    /// the peer by `[workers]` (which names it may serve), over either door.
    Worker,
}

const RESULTS: &[&str] = &[
    "/wqd.v1.DispatchService/Flush",
    "/wqd.v1.DispatchService/GetResults",
];
const OBSERVE: &[&str] = &[
    "/wqd.v1.TopologyService/GetTopology",
    "/wqd.v1.TopologyService/WatchTopology",
    "/wqd.v1.StatsService/GetStats",
    "/wqd.v1.WorkqueueService/ListWorkqueues",
    "/wqd.v1.WorkerService/ListWorkers",
];
const WORKER: &str = "/wqd.v1.WorkerService/Attach";
const OBSERVE_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The class of a request path (`/package.Service/Method`). Unknown paths are
/// [`Class::Mutating`].
pub fn classify(path: &str) -> Class {
    if path == WORKER {
        Class::Worker
    } else if RESULTS.contains(&path) {
        Class::Results
    } else if OBSERVE.contains(&path) || OBSERVE_SERVICES.iter().any(|s| path.starts_with(s)) {
        Class::Observe
    } else {
        Class::Mutating
    }
}

impl Policy {
    fn restricted(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    /// Unix socket: `allowed_uids`/`allowed_gids` for gated classes; root always passes.
    #[allow(clippy::result_large_err)]
    pub(super) fn check_unix(
        &self,
        peer: Option<&PeerCred>,
        class: Class,
        method: &str,
    ) -> Result<(), Status> {
        let gated = class == Class::Mutating
            || class == Class::Results
            || (class == Class::Observe && !self.read_open);
        if !gated || !self.restricted() {
            return Ok(());
        }
        let Some(p) = peer else {
            return Err(Status::permission_denied(format!(
                "{method}: the peer's credentials could not be read, and security.allowed_uids/\
                 allowed_gids restrict this call"
            )));
        };
        let allowed = p.uid == 0
            || self.uids.contains(&p.uid)
            || self.gids.contains(&p.gid)
            || p.groups.iter().any(|g| self.gids.contains(g));
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "uid {} (gid {}) may not call {method}: it is not in security.allowed_uids and \
                 none of its groups is in security.allowed_gids",
                p.uid, p.gid
            )))
        }
    }

    /// TCP: the client certificate when `client_ca` is set, then the bearer token when
    /// `token_file` is set. Applies to every call.
    #[allow(clippy::result_large_err)]
    pub(super) fn check_tcp(
        &self,
        has_cert: bool,
        auth: Option<&http::HeaderValue>,
        method: &str,
    ) -> Result<(), Status> {
        if self.client_cert && !has_cert {
            return Err(Status::unauthenticated(format!(
                "{method}: this listener requires a client certificate signed by \
                 security.client_ca, and none was presented"
            )));
        }
        if let Some(want) = &self.token {
            let Some(v) = auth else {
                return Err(Status::unauthenticated(format!(
                    "{method}: missing `authorization: Bearer <token>` metadata (this listener \
                     requires the token of security.token_file)"
                )));
            };
            let presented = v
                .as_bytes()
                .split_once_space()
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer"))
                .map(|(_, t)| t.trim_ascii());
            let ok = presented.is_some_and(|t| ct_eq(&Sha256::digest(t).into(), want));
            if !ok {
                return Err(Status::unauthenticated(format!(
                    "{method}: wrong bearer token"
                )));
            }
        }
        Ok(())
    }
}

/// Splits `b"Scheme value"` at its first space.
trait SplitOnceSpace {
    fn split_once_space(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitOnceSpace for [u8] {
    fn split_once_space(&self) -> Option<(&[u8], &[u8])> {
        let i = self.iter().position(|&b| b == b' ')?;
        Some((&self[..i], &self[i + 1..]))
    }
}

/// Constant-time equality of two digests: every byte is looked at, whatever differs first.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn policy(uids: &[u32], gids: &[u32], read_open: bool) -> Policy {
        Policy {
            uids: uids.iter().copied().collect(),
            gids: gids.iter().copied().collect(),
            read_open,
            client_cert: false,
            token: None,
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCred {
        PeerCred {
            uid,
            gid,
            pid: Some(42),
            groups: groups.to_vec(),
        }
    }

    const SUBMIT: &str = "/wqd.v1.DispatchService/Submit";

    #[test]
    fn classes() {
        for m in [
            "Submit",
            "SubmitStream",
            "Session",
            "Cancel",
            "Drain",
            "NewRpcAddedLater",
        ] {
            let p = format!("/wqd.v1.DispatchService/{m}");
            assert_eq!(classify(&p), Class::Mutating, "{p}");
        }
        for m in ["CreateWorkqueue", "UpdateWorkqueue", "DeleteWorkqueue"] {
            let p = format!("/wqd.v1.WorkqueueService/{m}");
            assert_eq!(classify(&p), Class::Mutating, "{p}");
        }
        assert_eq!(classify("/wqd.v1.DispatchService/Flush"), Class::Results);
        assert_eq!(
            classify("/wqd.v1.DispatchService/GetResults"),
            Class::Results
        );
        assert_eq!(
            classify("/wqd.v1.WorkqueueService/ListWorkqueues"),
            Class::Observe
        );
        assert_eq!(classify("/grpc.health.v1.Health/Check"), Class::Observe);
        assert_eq!(classify("/grpc.health.v1.HealthX/Check"), Class::Mutating);
        assert_eq!(classify(""), Class::Mutating);
    }

    /// Every RPC of wqd.v1 is classified on purpose: a new one fails here until it is put in
    /// a list (or accepted as mutating).
    #[test]
    fn every_wqd_rpc_has_a_deliberate_class() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(wqd_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = Vec::new();
        for f in &set.file {
            for s in &f.service {
                for m in &s.method {
                    let path = format!("/{}.{}/{}", f.package(), s.name(), m.name());
                    seen.push((path.clone(), classify(&path)));
                }
            }
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let mutating: Vec<_> = seen
            .iter()
            .filter(|(_, c)| *c == Class::Mutating)
            .map(|(p, _)| p.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(
            mutating,
            [
                "Cancel",
                "Drain",
                "Session",
                "Submit",
                "SubmitStream",
                "CreateWorkqueue",
                "DeleteWorkqueue",
                "UpdateWorkqueue"
            ]
        );
        let worker: Vec<_> = seen
            .iter()
            .filter(|(_, c)| *c == Class::Worker)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(worker, ["/wqd.v1.WorkerService/Attach"]);
        assert_eq!(
            classify("/wqd.v1.WorkerService/ListWorkers"),
            Class::Observe
        );
        assert_eq!(seen.len(), 16, "{seen:?}");
    }

    #[test]
    fn unrestricted_lets_everyone_in() {
        let p = policy(&[], &[], true);
        assert!(p
            .check_unix(Some(&peer(1000, 1000, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p.check_unix(None, Class::Mutating, SUBMIT).is_ok());
    }

    #[test]
    fn uids_gids_and_root() {
        let p = policy(&[1000], &[500], true);
        assert!(p
            .check_unix(Some(&peer(1000, 1000, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(0, 0, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(7, 500, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(7, 7, &[3, 500])), Class::Results, SUBMIT)
            .is_ok());
        let e = p
            .check_unix(Some(&peer(1001, 1001, &[4])), Class::Mutating, SUBMIT)
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message()
                .starts_with("uid 1001 (gid 1001) may not call /wqd.v1.DispatchService/Submit"),
            "{}",
            e.message()
        );
        assert_eq!(
            p.check_unix(Some(&peer(1001, 1001, &[])), Class::Results, SUBMIT)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            p.check_unix(None, Class::Mutating, SUBMIT)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        // Observing calls: open by default, gated when read_open = false.
        assert!(p
            .check_unix(Some(&peer(1001, 1001, &[])), Class::Observe, "x")
            .is_ok());
        let closed = policy(&[1000], &[], false);
        assert_eq!(
            closed
                .check_unix(Some(&peer(1001, 1001, &[])), Class::Observe, "x")
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn tcp_cert_and_token() {
        let mut p = policy(&[], &[], true);
        p.client_cert = true;
        p.token = Some(Sha256::digest(b"s3cret-token-value").into());
        let hv = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let e = p
            .check_tcp(false, Some(&hv("Bearer s3cret-token-value")), SUBMIT)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message().contains("client certificate"),
            "{}",
            e.message()
        );
        assert!(p
            .check_tcp(true, Some(&hv("Bearer s3cret-token-value")), SUBMIT)
            .is_ok());
        assert!(p
            .check_tcp(true, Some(&hv("bearer s3cret-token-value")), SUBMIT)
            .is_ok());
        for bad in [
            "Bearer nope",
            "Basic s3cret-token-value",
            "s3cret-token-value",
            "Bearer ",
        ] {
            let e = p.check_tcp(true, Some(&hv(bad)), SUBMIT).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad}");
            assert!(e.message().contains("wrong bearer token"), "{bad}");
            assert!(!e.message().contains("s3cret"), "the token is never echoed");
        }
        let e = p.check_tcp(true, None, SUBMIT).unwrap_err();
        assert!(e.message().contains("missing"), "{}", e.message());
    }

    #[test]
    fn ct_eq_compares() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
    }
}
