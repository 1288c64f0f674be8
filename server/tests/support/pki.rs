//! A throwaway PKI for tests of the TCP listener: a CA, a server certificate for
//! 127.0.0.1/localhost and a client certificate signed by it, and a client certificate from an
//! unrelated ("rogue") CA, written as PEM files into a temporary folder that lives as long as
//! the [`Pki`]. Shared by the daemon's tests (`server/tests/support`) and the end-to-end tests
//! (`tests/wqctl.rs`, `tests/conn.rs` include this file by path); it needs only `rcgen` and
//! `tempfile`.
#![allow(dead_code)]

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// The PEM files: `ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key` (names
/// `client.test`), `rogue.pem`/`rogue.key` (same name, unrelated CA).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the CA and the three leaf certificates.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca();
        let (server, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], &issuer);
        let (client, client_key) = leaf(vec!["client.test".into()], &issuer);
        let (_, rogue_issuer) = ca();
        let (rogue, rogue_key) = leaf(vec!["client.test".into()], &rogue_issuer);
        for (name, pem) in [
            ("ca.pem", ca_pem),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
            ("rogue.pem", rogue),
            ("rogue.key", rogue_key),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { dir }
    }

    /// The path of file `name` (`ca.pem`, `server.key`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The contents of file `name`.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

/// A self-signed CA: its certificate (PEM) and the issuer that signs leaves.
fn ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf certificate for `names` signed by `issuer`: (certificate PEM, key PEM).
fn leaf(names: Vec<String>, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}
