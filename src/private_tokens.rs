//! Private tokens (`pcc_pat_…`): an org's credential for the private API, which the `pipecat
//! cloud` CLI calls. Like public keys, only their SHA-256 hashes are stored. The prefix is the one
//! Pipecat Cloud's personal access tokens carry, so `pipecat cloud auth use-pat` accepts them.

use std::collections::HashMap;

use crate::api_keys::{ApiKeyHash, hash_api_key};

pub const PRIVATE_TOKEN_PREFIX: &str = "pcc_pat_";
/// Longest private token accepted; anything longer is not one of ours and is not hashed.
pub const MAX_PRIVATE_TOKEN_BYTES: usize = 256;

/// Why a private token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("missing Authorization: Bearer <private token> header")]
    Missing,
    #[error("unknown or revoked private token")]
    Unknown,
    #[error("this token belongs to another organization")]
    OtherOrg,
}

/// Which org each known private token belongs to.
#[derive(Debug, Default)]
pub struct PrivateTokenIndex {
    by_hash: HashMap<ApiKeyHash, String>,
}

impl PrivateTokenIndex {
    pub fn insert(&mut self, hash: ApiKeyHash, org: &str) {
        self.by_hash.insert(hash, org.to_owned());
    }

    /// The org `token` acts for. A public key, or anything not shaped like a private token, is
    /// simply unknown.
    pub fn org_of(&self, token: &str) -> Result<&str, TokenRejection> {
        if !token.starts_with(PRIVATE_TOKEN_PREFIX) || token.len() > MAX_PRIVATE_TOKEN_BYTES {
            return Err(TokenRejection::Unknown);
        }
        self.by_hash.get(&hash_api_key(token)).map(String::as_str).ok_or(TokenRejection::Unknown)
    }
}
