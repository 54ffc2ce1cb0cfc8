//! `SigningKeys::verify` accepts exactly the tokens a broker with its keys minted, and nothing
//! else: no change to a real token, however small, is accepted.
//!
//! An input is read one of three ways, by its first byte:
//! - `{`: a claims payload, signed with each key of the ring as a replica would sign it. Whatever
//!   it holds, verification does not panic, and what it accepts is in scope, unexpired, within
//!   the lifetime, and names the key that signed it.
//! - a control byte (below 0x20): edits applied to one of the fixture's valid tokens (the rest
//!   of the input, three bytes an edit: what, where, with what). The result is accepted only if
//!   the edits changed nothing.
//! - anything else: a token as a client presents it. It is accepted only if it is one of the
//!   fixture's valid tokens, with their claims. The seed corpus holds those tokens, so the
//!   fuzzer's own mutations of real tokens arrive here too.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use session_broker::token::{Claims, MAX_TOKEN_BYTES, SigningKeys, TokenError};
use sha2::Sha256;
use uuid::Uuid;

/// The verifier's clock; the fixture's tokens expire a minute later.
const NOW: u64 = 1_700_000_000_000;
const HOST: &str = "my-agent.my-org";
/// The longest lifetime the verifier believes, as `token.lifetime` plus skew would set it.
const LIFETIME: Duration = Duration::from_secs(330);
/// The ring: `k2` signs, `k1` is the key being rotated out.
const KEYS: [(&str, &str); 2] =
    [("k1", "0123456789abcdef0123456789abcdef"), ("k2", "fedcba9876543210fedcba9876543210")];

struct Fixture {
    ring: SigningKeys,
    /// Tokens the ring must accept, with their claims.
    valid: Vec<(String, Claims)>,
}

fn ring(keys: &[(&str, &str)], signing: &str) -> SigningKeys {
    let keys: Vec<(String, SecretString)> =
        keys.iter().map(|(kid, key)| (kid.to_string(), SecretString::from(*key))).collect();
    SigningKeys::new(signing, keys.iter().map(|(kid, key)| (kid, key)))
        .expect("the fixture's keys are long enough")
        .with_max_lifetime(LIFETIME)
}

/// Deterministic, so that the seed corpus holds these very tokens.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let ring_now = ring(&KEYS, "k2");
    let old = ring(&KEYS[..1], "k1");
    let sid = |n: u128| Uuid::from_u128(0x639f91d8_d511_4677_a83b_bd7564d5d900 + n);
    let exp = NOW + 60_000;
    let minted = [
        ring_now.mint(HOST, sid(1), "us-west", exp, None, "fence-1"),
        ring_now.mint(HOST, sid(2), "eu-central", exp, Some(br#"{"caller":"+15551234567"}"#), "fence-1"),
        // Minted before the rotation: still good while k1 verifies.
        old.mint(HOST, sid(3), "us-west", exp, None, "fence-1"),
    ];
    let valid = minted
        .into_iter()
        .map(|token| {
            let claims = ring_now.verify(&token, HOST, NOW).expect("a fresh token verifies");
            (token, claims)
        })
        .collect();
    Fixture { ring: ring_now, valid }
});

fn sign(payload: &[u8], key: &str) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(session_broker::token::FORMAT_TAG);
    mac.update(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
    token
}

/// Applies edits, three bytes each: (what, where, with what).
fn edit(token: &str, edits: &[u8]) -> Vec<u8> {
    let mut bytes = token.as_bytes().to_vec();
    for e in edits.chunks_exact(3) {
        let at = usize::from(e[1]) % (bytes.len() + 1);
        match e[0] % 4 {
            0 if at < bytes.len() => bytes[at] ^= e[2].max(1),
            1 => bytes.insert(at, e[2]),
            2 if at < bytes.len() => drop(bytes.remove(at)),
            3 => bytes.truncate(at),
            _ => {}
        }
    }
    bytes
}

/// A presented token is accepted exactly when it is one of the valid ones.
fn check_presented(token: &str) {
    let fixture = &*FIXTURE;
    let verdict = fixture.ring.verify(token, HOST, NOW);
    match fixture.valid.iter().find(|(valid, _)| valid == token) {
        Some((_, claims)) => assert_eq!(verdict.as_ref(), Ok(claims), "a valid token refused"),
        None => assert!(verdict.is_err(), "accepted a token it did not sign: {token:?}"),
    }
    if token.len() > MAX_TOKEN_BYTES {
        assert_eq!(verdict, Err(TokenError::Malformed), "oversized tokens are malformed");
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    match data.first() {
        Some(b'{') => {
            for (kid, key) in KEYS {
                let token = sign(data, key);
                let Ok(claims) = fixture.ring.verify(&token, HOST, NOW) else { continue };
                assert!(token.len() <= MAX_TOKEN_BYTES);
                assert_eq!(
                    claims.kid, kid,
                    "accepted a payload naming another key than its signer"
                );
                assert_eq!(claims.sh, HOST, "accepted a token for another agent");
                assert!(claims.exp > NOW, "accepted an expired token");
                assert!(claims.exp - NOW <= LIFETIME.as_millis() as u64, "lifetime not bounded");
            }
        }
        Some(&first) if first < 0x20 => {
            let (original, _) = &fixture.valid[usize::from(first) % fixture.valid.len()];
            let edited = edit(original, &data[1..]);
            if let Ok(edited) = std::str::from_utf8(&edited) {
                check_presented(edited);
            }
        }
        _ => {
            if let Ok(token) = std::str::from_utf8(data) {
                check_presented(token);
            }
        }
    }
});
