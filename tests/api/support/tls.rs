//! A throwaway certificate authority, made afresh by each test that needs one: its CA
//! certificate and a leaf certificate for `127.0.0.1` and `localhost`, as PEM files in a
//! temporary directory. The leaf serves (Redis, a `wss://` bot) and authenticates clients (the
//! broker, Redis replicas and sentinels) alike.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls::{
    self, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The CA and its leaf, removed from disk when dropped.
pub struct TestCa {
    pub ca_file: PathBuf,
    pub leaf: CertFiles,
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "session-broker test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let leaf =
            CertFiles { cert: dir.path().join("leaf.pem"), key: dir.path().join("leaf.key") };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        Self { ca_file, leaf, dir }
    }

    /// Where further files of the test (a config, say) may go.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A TLS server configuration presenting the leaf, for a `wss://` bot.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let chain = CertificateDer::pem_file_iter(&self.leaf.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.leaf.key).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    /// What a Redis client of the CA's servers presents: the CA to check them by, and the leaf.
    pub fn redis_certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&self.leaf.cert).unwrap(),
                client_key: std::fs::read(&self.leaf.key).unwrap(),
            }),
            root_cert: Some(std::fs::read(&self.ca_file).unwrap()),
        }
    }
}
