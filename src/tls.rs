//! TLS where traffic leaves the host: `rediss://` to Redis and `wss://` to bots, both rustls.
//!
//! Whom the broker trusts: the system's root certificates, unless a CA bundle is configured
//! (`redis.tls_ca_file`, `bots.tls_ca_file`); a bundle then *replaces* the system's roots for
//! that side, because a private CA signs internal servers and no public CA should be able to
//! vouch for them. Redis may also require a client certificate (`redis.tls_client_cert_file`
//! and `redis.tls_client_key_file`).
//!
//! Everything here is read and checked once at start-up (validation builds it, and start-up
//! builds it again from the same files), so a bad file stops the broker with an error naming the
//! setting instead of failing the first connection.

use std::{error::Error, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use url::{Host, Url};

use crate::config::{BotSettings, RedisSettings};

/// A TLS setting that cannot be used, named as in the settings.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {why}")]
pub struct TlsSettingError {
    pub setting: &'static str,
    pub why: String,
}

fn bad(setting: &'static str, why: String) -> TlsSettingError {
    TlsSettingError { setting, why }
}

/// The CA bundle and client certificate for `rediss://` connections; `None` when neither is
/// set (the system's roots, no client certificate). Checked by building the rustls
/// configuration they make, so that a file redis-rs would refuse later is refused now.
pub fn redis_certificates(
    settings: &RedisSettings,
) -> Result<Option<redis::TlsCertificates>, TlsSettingError> {
    let (ca, cert, key) = (
        settings.tls_ca_file.as_deref(),
        settings.tls_client_cert_file.as_deref(),
        settings.tls_client_key_file.as_deref(),
    );
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let ca_pem = ca.map(|path| read("redis.tls_ca_file", path)).transpose()?;
    let roots = match (ca, &ca_pem) {
        (Some(path), Some(pem)) => ca_roots("redis.tls_ca_file", path, pem)?,
        // redis-rs loads the system's roots itself; here they would only slow the check.
        _ => RootCertStore::empty(),
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let client_tls = match (cert, key) {
        (None, None) => None,
        (Some(cert_path), Some(key_path)) => {
            let client_cert = read("redis.tls_client_cert_file", cert_path)?;
            let client_key = read("redis.tls_client_key_file", key_path)?;
            let chain = certificates("redis.tls_client_cert_file", cert_path, &client_cert)?;
            let private = PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                bad(
                    "redis.tls_client_key_file",
                    format!("{}: no PEM private key ({e})", key_path.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                bad(
                    "redis.tls_client_key_file",
                    format!("does not go with redis.tls_client_cert_file ({e})"),
                )
            })?;
            Some(redis::ClientTlsConfig { client_cert, client_key })
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(bad(
                "redis.tls_client_cert_file",
                "set both or neither of redis.tls_client_cert_file and redis.tls_client_key_file"
                    .into(),
            ));
        }
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert: ca_pem }))
}

/// The rustls configuration every `wss://` bot dial uses: `bots.tls_ca_file`, or the system's
/// roots.
pub fn bot_client_config(settings: &BotSettings) -> Result<Arc<ClientConfig>, TlsSettingError> {
    let roots = match settings.tls_ca_file.as_deref() {
        Some(path) => ca_roots("bots.tls_ca_file", path, &read("bots.tls_ca_file", path)?)?,
        None => system_roots(),
    };
    if roots.is_empty() {
        tracing::warn!(
            "no system root certificates found and no bots.tls_ca_file: every wss:// bot will \
             be refused as untrusted"
        );
    }
    Ok(Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

/// The name a `wss://` URL's certificate must carry, if its host can be one: a DNS name or an
/// IP address. A host the URL parser accepts may still be no DNS name (`a..b`, say).
pub fn server_name(url: &Url) -> Option<ServerName<'static>> {
    match url.host()? {
        Host::Domain(name) => ServerName::try_from(name.to_owned()).ok(),
        Host::Ipv4(ip) => Some(ServerName::from(std::net::IpAddr::from(ip))),
        Host::Ipv6(ip) => Some(ServerName::from(std::net::IpAddr::from(ip))),
    }
}

/// Whether `error` is, at bottom, a TLS failure: a certificate that was not trusted, one that
/// was required and not sent, or a peer that does not speak TLS. Such a failure repeats on every
/// attempt with the same settings, unlike a server that is down.
pub fn is_tls_failure(error: &(dyn Error + 'static)) -> bool {
    if error.is::<rustls::Error>() {
        return true;
    }
    // redis-rs keeps an I/O error behind an `Arc<dyn Error>`, and `io::Error::source` skips the
    // error it wraps (tokio-rustls wraps rustls's there): look inside both by hand.
    if let Some(inner) = error.downcast_ref::<Arc<dyn Error + Send + Sync>>()
        && is_tls_failure(&**inner)
    {
        return true;
    }
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
        && is_tls_failure(inner)
    {
        return true;
    }
    error.source().is_some_and(is_tls_failure)
}

/// Reads a file named by `setting`.
fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsSettingError> {
    std::fs::read(path).map_err(|e| bad(setting, format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates in `pem`, at least one.
fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsSettingError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(setting, format!("{}: not PEM certificates ({e})", path.display())))?;
    if certs.is_empty() {
        return Err(bad(setting, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// A CA bundle as trust roots; every certificate in it must be usable as one.
fn ca_roots(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<RootCertStore, TlsSettingError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(setting, path, pem)? {
        roots.add(cert).map_err(|e| {
            bad(setting, format!("{}: a certificate is no usable CA ({e})", path.display()))
        })?;
    }
    Ok(roots)
}

/// The system's trusted roots. Entries that cannot be read or parsed are skipped, as other TLS
/// clients on the host skip them.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
}
