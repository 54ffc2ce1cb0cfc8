//! Public API keys (`pk_…`). The broker stores and compares only their SHA-256 hashes: a leaked
//! configuration or Redis dump does not leak a usable key.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// Public keys must start with this.
pub const PUBLIC_KEY_PREFIX: &str = "pk_";
/// Longest public key accepted; anything longer is not a key of ours and is not hashed.
pub const MAX_PUBLIC_KEY_BYTES: usize = 256;
/// The key that the built-in demo accepts, and only the demo.
pub const DEMO_PUBLIC_KEY: &str = "pk_demo";

pub type ApiKeyHash = [u8; 32];

pub fn hash_api_key(key: &str) -> ApiKeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Parses a configured hash: 64 hex digits, optionally prefixed `sha256:`.
pub fn parse_api_key_hash(text: &str) -> Option<ApiKeyHash> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex, &mut hash).ok()?;
    Some(hash)
}

/// Which org each known public key belongs to.
#[derive(Debug, Default)]
pub struct ApiKeyIndex {
    by_hash: HashMap<ApiKeyHash, String>,
}

/// Why a presented key was refused. All of them answer 401; the message differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyRejection {
    #[error("missing Authorization: Bearer <public key> header")]
    Missing,
    #[error("malformed public API key")]
    Malformed,
    #[error("unknown or revoked public API key")]
    Unknown,
    #[error("public API key belongs to another organization")]
    OtherOrg,
}

impl ApiKeyIndex {
    pub fn insert(&mut self, hash: ApiKeyHash, org: &str) {
        self.by_hash.insert(hash, org.to_owned());
    }

    /// The org that owns `key`. Looking up by hash means the comparison never touches the
    /// secret itself, and a hash-table probe reveals nothing useful about near misses.
    pub fn org_of(&self, key: &str) -> Result<&str, ApiKeyRejection> {
        if !key.starts_with(PUBLIC_KEY_PREFIX) || key.len() > MAX_PUBLIC_KEY_BYTES {
            return Err(ApiKeyRejection::Malformed);
        }
        self.by_hash.get(&hash_api_key(key)).map(String::as_str).ok_or(ApiKeyRejection::Unknown)
    }
}

/// Extracts the credential from an `Authorization: Bearer <credential>` header value.
pub fn bearer(header: Option<&actix_web::http::header::HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_hash_only() {
        let mut index = ApiKeyIndex::default();
        index.insert(hash_api_key("pk_alpha"), "org-a");
        assert_eq!(index.org_of("pk_alpha"), Ok("org-a"));
        assert_eq!(index.org_of("pk_alphb"), Err(ApiKeyRejection::Unknown));
        assert_eq!(index.org_of("sk_alpha"), Err(ApiKeyRejection::Malformed));
        assert_eq!(
            index.org_of(&format!("pk_{}", "x".repeat(300))),
            Err(ApiKeyRejection::Malformed)
        );
    }

    #[test]
    fn configured_hashes_parse_with_or_without_prefix() {
        let hex = hex::encode(hash_api_key("pk_alpha"));
        assert_eq!(parse_api_key_hash(&hex), Some(hash_api_key("pk_alpha")));
        assert_eq!(parse_api_key_hash(&format!("sha256:{hex}")), Some(hash_api_key("pk_alpha")));
        assert_eq!(parse_api_key_hash("pk_alpha"), None);
    }
}
