//! Session tokens: minting and verification. Nothing else in the crate knows their format.
//!
//! A token is `base64url(payload) "." base64url(signature)`, both without padding, so it is safe
//! in a URL path. The payload is JSON whose first claim is `sh` (`"agent.org"`, as Pipecat Cloud's
//! tokens begin), followed by the session id `sid`, the expiry `exp` in Unix milliseconds, the
//! signing key id `kid`, the minting region `rg`, the store's fence `fe` (see
//! `migrations-lua/007_mint_session.lua`) and, when a body was minted, its digest `bd`. The
//! signature is HMAC-SHA256, with the key named by `kid`, over [`FORMAT_TAG`] followed by the
//! encoded payload.
//!
//! Verification order matters: size first (no work on oversized input), then decoding, then the
//! signature (constant-time), and only then the claims, so that nothing about an unsigned payload
//! influences the answer beyond "malformed" or "bad signature".

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

/// Tokens longer than this are refused before any decoding. Real tokens are about 200 bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Length of an HMAC-SHA256 signature.
const SIGNATURE_BYTES: usize = 32;
/// Shortest HMAC key accepted: 256 bits, the output size of SHA-256.
pub const MIN_KEY_BYTES: usize = 32;

/// Signed ahead of every payload: the token format's version. Tokens of format 2 carry the
/// store's fence and are consumed under keys that brokers of the first format do not know, so
/// neither kind of broker must accept the other's tokens (during a rolling upgrade, say): a
/// signature over another format's input never verifies.
pub const FORMAT_TAG: &[u8] = b"sbt2.";

type HmacSha256 = Hmac<Sha256>;

/// What a valid token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Service host, `agent.org`. Declared first so that it leads the serialized payload.
    pub sh: String,
    pub sid: Uuid,
    /// Expiry, Unix time in milliseconds.
    pub exp: u64,
    pub kid: String,
    /// Region that minted the token.
    pub rg: String,
    /// Digest of the body minted with the token ([`body_digest`]); absent when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bd: Option<String>,
    /// The store's fence when the token was minted: a connect under another fence (the store
    /// lost data since) is refused.
    #[serde(default)]
    pub fe: String,
}

/// The digest a token carries of the body it was minted with: base64url of the first 16 bytes
/// of its SHA-256. A client cannot swap the body a trusted back end chose without breaking it.
pub fn body_digest(body: &[u8]) -> String {
    use sha2::Digest;
    URL_SAFE_NO_PAD.encode(&Sha256::digest(body)[..16])
}

/// Why a token was refused. Each maps to a 403 with its own reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token was issued for another agent")]
    WrongScope,
    #[error("token claims a longer lifetime than this broker mints")]
    LifetimeTooLong,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("token.keys.{0}: at least {MIN_KEY_BYTES} bytes are required")]
    TooShort(String),
    #[error("token.signing_key_id: `{0}` is not one of the keys")]
    UnknownSigningKey(String),
}

/// The verification keys by id, and which one signs. Each key is kept as a pre-keyed HMAC state
/// that is cloned per use, which saves re-deriving the padded key blocks on every token.
pub struct SigningKeys {
    signing_kid: String,
    keys: HashMap<String, HmacSha256>,
    /// The key ids, the signing key first: verification tries them in this order.
    order: Vec<String>,
    /// Longest lifetime a valid token can have left: the configured lifetime plus clock skew.
    max_lifetime_ms: u64,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("SigningKeys")
            .field("signing_kid", &self.signing_kid)
            .field("kids", &kids)
            .finish()
    }
}

impl SigningKeys {
    pub fn new<'a>(
        signing_kid: &str,
        keys: impl IntoIterator<Item = (&'a String, &'a SecretString)>,
    ) -> Result<Self, SigningKeyError> {
        let mut ring = HashMap::new();
        for (kid, secret) in keys {
            let bytes = secret.expose_secret().as_bytes();
            if bytes.len() < MIN_KEY_BYTES {
                return Err(SigningKeyError::TooShort(kid.clone()));
            }
            // new_from_slice only fails for fixed-size-key MACs; HMAC takes keys of any length.
            let mac = HmacSha256::new_from_slice(bytes).expect("HMAC accepts any key length");
            ring.insert(kid.clone(), mac);
        }
        if !ring.contains_key(signing_kid) {
            return Err(SigningKeyError::UnknownSigningKey(signing_kid.to_owned()));
        }
        let mut order: Vec<String> = ring.keys().cloned().collect();
        order.sort_by_key(|kid| (kid != signing_kid, kid.clone()));
        Ok(Self {
            signing_kid: signing_kid.to_owned(),
            keys: ring,
            order,
            max_lifetime_ms: u64::MAX,
        })
    }

    /// Refuses tokens whose expiry lies more than `max` ahead: no replica mints those, so such a
    /// token was made with a leaked key, or by a misconfigured replica.
    pub fn with_max_lifetime(mut self, max: std::time::Duration) -> Self {
        self.max_lifetime_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self
    }

    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// Mints a token for `service_host` (`agent.org`) that expires at `exp_ms`.
    pub fn mint(
        &self,
        service_host: &str,
        sid: Uuid,
        region: &str,
        exp_ms: u64,
        body: Option<&[u8]>,
        fence: &str,
    ) -> String {
        let claims = Claims {
            sh: service_host.to_owned(),
            sid,
            exp: exp_ms,
            kid: self.signing_kid.clone(),
            rg: region.to_owned(),
            bd: body.map(body_digest),
            fe: fence.to_owned(),
        };
        // Serializing a struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        let mut token = URL_SAFE_NO_PAD.encode(payload);
        let mut mac = self.keys[&self.signing_kid].clone();
        mac.update(FORMAT_TAG);
        mac.update(token.as_bytes());
        let signature = mac.finalize().into_bytes();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        token
    }

    /// Verifies a token for `service_host` at time `now_ms` and returns its claims.
    pub fn verify(
        &self,
        token: &str,
        service_host: &str,
        now_ms: u64,
    ) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let (payload_b64, signature_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        // The strict no-pad engine rejects padding and non-canonical trailing bits, so each
        // token string decodes to exactly one byte sequence and no two strings verify alike.
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).map_err(|_| TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD.decode(signature_b64).map_err(|_| TokenError::Malformed)?;
        if payload.is_empty() || signature.len() != SIGNATURE_BYTES {
            return Err(TokenError::Malformed);
        }
        // Nothing of the unsigned payload is read before a key verifies it: each key is tried
        // (the signing key first; a rotation holds two or three), and only a signed payload is
        // parsed. Its `kid` must then name the key that verified it.
        let signed_by = self
            .order
            .iter()
            .find(|kid| {
                let mut mac = self.keys[*kid].clone();
                mac.update(FORMAT_TAG);
                mac.update(payload_b64.as_bytes());
                mac.verify_slice(&signature).is_ok()
            })
            .ok_or(TokenError::BadSignature)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if &claims.kid != signed_by {
            return Err(TokenError::BadSignature);
        }
        if claims.exp <= now_ms {
            return Err(TokenError::Expired);
        }
        if claims.exp - now_ms > self.max_lifetime_ms {
            return Err(TokenError::LifetimeTooLong);
        }
        if claims.sh != service_host {
            return Err(TokenError::WrongScope);
        }
        Ok(claims)
    }
}

/// A loggable prefix of a secret string: enough to correlate, never enough to use.
pub fn redact(secret: &str) -> String {
    let prefix: String = secret.chars().take(8).collect();
    format!("{prefix}…({} chars)", secret.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const HOST: &str = "my-agent.my-org";

    fn ring(pairs: &[(&str, &str)], signing: &str) -> SigningKeys {
        let keys: Vec<(String, SecretString)> =
            pairs.iter().map(|(k, v)| (k.to_string(), SecretString::from(v.to_string()))).collect();
        SigningKeys::new(signing, keys.iter().map(|(k, v)| (k, v))).unwrap()
    }

    fn default_ring() -> SigningKeys {
        ring(&[("k1", "0123456789abcdef0123456789abcdef")], "k1")
    }

    #[test]
    fn round_trip_and_payload_starts_with_service_host() {
        let ring = default_ring();
        let sid = Uuid::new_v4();
        let token = ring.mint(HOST, sid, "us-west", NOW + 1000, None, "f1");
        assert!(token.starts_with("eyJzaCI6"), "payload must begin with the sh claim: {token}");
        assert!(!token.contains('=') && !token.contains('/') && !token.contains('+'));
        let claims = ring.verify(&token, HOST, NOW).unwrap();
        assert_eq!(claims.sid, sid);
        assert_eq!(claims.sh, HOST);
        assert_eq!(claims.kid, "k1");
        assert_eq!(claims.rg, "us-west");
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let ring = default_ring();
        let token = ring.mint(HOST, Uuid::new_v4(), "us-west", NOW + 1000, None, "f1");
        for i in 0..token.len() {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut bytes = token.clone().into_bytes();
                bytes[i] ^= flip;
                let Ok(tampered) = String::from_utf8(bytes) else { continue };
                assert!(
                    ring.verify(&tampered, HOST, NOW).is_err(),
                    "byte {i} flipped with {flip:#x} was accepted"
                );
            }
        }
    }

    #[test]
    fn a_lifetime_beyond_the_configured_one_is_refused() {
        let ring = default_ring().with_max_lifetime(std::time::Duration::from_secs(330));
        let fine = ring.mint(HOST, Uuid::new_v4(), "x", NOW + 330_000, None, "f1");
        assert!(ring.verify(&fine, HOST, NOW).is_ok());
        let forever = ring.mint(HOST, Uuid::new_v4(), "x", NOW + 330_001, None, "f1");
        assert_eq!(ring.verify(&forever, HOST, NOW), Err(TokenError::LifetimeTooLong));
    }

    #[test]
    fn a_payload_naming_another_key_than_its_signer_is_refused() {
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let both = ring(&[("k1", &a), ("k2", &b)], "k2");
        // Signed with k2, but claiming k1: the claim is not believed.
        let claims = Claims {
            sh: HOST.into(),
            sid: Uuid::new_v4(),
            exp: NOW + 1000,
            kid: "k1".into(),
            rg: "x".into(),
            bd: None,
            fe: "f1".into(),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let sign = |tag: &[u8], kid: &str| {
            let mut mac = both.keys[kid].clone();
            mac.update(tag);
            mac.update(payload.as_bytes());
            format!("{payload}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
        };
        assert_eq!(both.verify(&sign(FORMAT_TAG, "k2"), HOST, NOW), Err(TokenError::BadSignature));
        assert!(both.verify(&sign(FORMAT_TAG, "k1"), HOST, NOW).is_ok(), "the same, signed right");
    }

    /// Tokens of the first format (signed over the payload alone) are consumed under keys this
    /// broker does not read: they must not verify, nor must ours on a broker of that format.
    #[test]
    fn tokens_of_the_first_format_are_refused() {
        let ring = default_ring();
        let token = ring.mint(HOST, Uuid::new_v4(), "x", NOW + 1000, None, "f1");
        let payload = token.split_once('.').unwrap().0;
        let mut mac = ring.keys[ring.signing_kid()].clone();
        mac.update(payload.as_bytes());
        let first = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        assert_eq!(ring.verify(&first, HOST, NOW), Err(TokenError::BadSignature));
        assert!(ring.verify(&token, HOST, NOW).is_ok());
    }

    #[test]
    fn expiry_is_exclusive() {
        let ring = default_ring();
        let token = ring.mint(HOST, Uuid::new_v4(), "us-west", NOW, None, "f1");
        assert_eq!(ring.verify(&token, HOST, NOW - 1).map(|_| ()), Ok(()));
        assert_eq!(ring.verify(&token, HOST, NOW), Err(TokenError::Expired));
    }

    #[test]
    fn scope_is_the_exact_service_host() {
        let ring = default_ring();
        let token = ring.mint(HOST, Uuid::new_v4(), "us-west", NOW + 1000, None, "f1");
        assert_eq!(ring.verify(&token, "other.my-org", NOW), Err(TokenError::WrongScope));
        assert_eq!(ring.verify(&token, "my-agent.other", NOW), Err(TokenError::WrongScope));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_and_foreign_keys_fail() {
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let old = ring(&[("k1", &a)], "k1");
        let both = ring(&[("k1", &a), ("k2", &b)], "k2");
        let old_token = old.mint(HOST, Uuid::new_v4(), "x", NOW + 1000, None, "f1");
        let new_token = both.mint(HOST, Uuid::new_v4(), "x", NOW + 1000, None, "f1");
        assert!(both.verify(&old_token, HOST, NOW).is_ok());
        assert_eq!(old.verify(&new_token, HOST, NOW), Err(TokenError::BadSignature));
        // Same key id, different secret: a token from another deployment.
        let impostor = ring(&[("k1", &b)], "k1");
        let forged = impostor.mint(HOST, Uuid::new_v4(), "x", NOW + 1000, None, "f1");
        assert_eq!(old.verify(&forged, HOST, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_inputs() {
        let ring = default_ring();
        let good = ring.mint(HOST, Uuid::new_v4(), "x", NOW + 1000, None, "f1");
        let oversized = format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES));
        for bad in ["", ".", "abc", "a.b.c", "!!!.???", &format!("{good}="), &oversized] {
            assert_eq!(ring.verify(bad, HOST, NOW), Err(TokenError::Malformed), "{bad:.40}");
        }
        // Correctly signed garbage payload is still malformed, not accepted.
        let payload = URL_SAFE_NO_PAD.encode(b"{\"sh\":1}");
        let mut mac = ring.keys["k1"].clone();
        mac.update(FORMAT_TAG);
        mac.update(payload.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(ring.verify(&format!("{payload}.{sig}"), HOST, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn short_keys_are_refused() {
        let short = [("k1".to_string(), SecretString::from("x".repeat(31)))];
        assert!(matches!(
            SigningKeys::new("k1", short.iter().map(|(k, v)| (k, v))),
            Err(SigningKeyError::TooShort(_))
        ));
    }

    #[test]
    fn redact_never_shows_the_whole_secret() {
        let token = default_ring().mint(HOST, Uuid::new_v4(), "x", NOW, None, "f1");
        let shown = redact(&token);
        assert!(!shown.contains(&token[8..]));
    }
}
