//! How each provider signs its webhooks, checked exactly as its own SDK does (the reference
//! validators: `twilio/request_validator.py`, `telnyx/lib/webhook_verification.py`,
//! `plivo/utils/signature_v3.py`). Every comparison is constant-time. The unit tests hold
//! vectors computed with those SDKs.

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use url::Url;

/// How far a Telnyx timestamp may be from now, in seconds, as Telnyx's SDK allows.
pub const TELNYX_TOLERANCE_SECS: u64 = 300;

/// Twilio: HMAC-SHA1 (base64) with the Auth Token over the full URL as Twilio requested it,
/// followed by each POST parameter, sorted by name, as `name + value` (distinct values sorted).
/// Twilio's own validator accepts the URL with and without its default port; so does this.
pub fn twilio(auth_token: &[u8], url: &str, params: &[(String, String)], signature: &str) -> bool {
    let mut sorted: Vec<(&str, &str)> =
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    sorted.sort();
    sorted.dedup();
    let signed_params: String = sorted.iter().map(|(k, v)| format!("{k}{v}")).collect();
    url_variants(url).iter().any(|url| {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token).expect("HMAC takes any key");
        mac.update(url.as_bytes());
        mac.update(signed_params.as_bytes());
        STANDARD.decode(signature).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
    })
}

/// The URL as given, and with its default port added or removed.
fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_owned()];
    if let Ok(mut parsed) = Url::parse(url) {
        match parsed.port() {
            // `Url` drops a default port it is given; the text may still carry it.
            None if url.contains(&format!("{}:", parsed.host_str().unwrap_or_default())) => {
                variants.push(parsed.to_string());
            }
            None => {
                if let Some(port) = parsed.port_or_known_default()
                    && let Some(host) = parsed.host_str()
                {
                    let with_port = url.replacen(host, &format!("{host}:{port}"), 1);
                    variants.push(with_port);
                }
            }
            Some(_) => {
                let _ = parsed.set_port(None);
                variants.push(parsed.to_string());
            }
        }
    }
    variants
}

/// A Telnyx public key: base64 of 32 bytes.
pub fn telnyx_key(base64: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = STANDARD.decode(base64.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Why a Telnyx webhook was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelnyxRefusal {
    Stale,
    BadSignature,
}

/// Telnyx: Ed25519 over `"{timestamp}|{raw body}"`, the timestamp within
/// [`TELNYX_TOLERANCE_SECS`] of `now_secs`.
pub fn telnyx(
    key: &VerifyingKey,
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now_secs: u64,
) -> Result<(), TelnyxRefusal> {
    let at: u64 = timestamp.trim().parse().map_err(|_| TelnyxRefusal::Stale)?;
    if at.abs_diff(now_secs) > TELNYX_TOLERANCE_SECS {
        return Err(TelnyxRefusal::Stale);
    }
    let signature = STANDARD
        .decode(signature.trim())
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or(TelnyxRefusal::BadSignature)?;
    let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'|');
    signed.extend_from_slice(body);
    key.verify(&signed, &signature).map_err(|_| TelnyxRefusal::BadSignature)
}

/// Plivo V3: HMAC-SHA256 (base64) with the Auth Token over the URL without its query, then `?`
/// and its query parameters (decoded) sorted as `k=v&…`, then for POST `.` (when there was a
/// query) and the POST parameters sorted as `kv…`, then `.` and the nonce. The header may hold
/// several signatures, comma-separated.
pub fn plivo(
    auth_token: &[u8],
    method_is_get: bool,
    url: &str,
    post_params: &[(String, String)],
    nonce: &str,
    signatures: &str,
) -> bool {
    let Ok(parsed) = Url::parse(url) else { return false };
    let mut base = format!(
        "{}://{}{}",
        parsed.scheme(),
        &url[url.find("://").map_or(0, |i| i + 3)..].split(['/', '?']).next().unwrap_or_default(),
        parsed.path()
    );
    let mut query: Vec<(String, String)> =
        parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    query.sort();
    let query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let params_follow = !method_is_get && !post_params.is_empty();
    if !query.is_empty() || params_follow {
        base.push('?');
        base.push_str(&query);
    }
    if !query.is_empty() && params_follow {
        base.push('.');
    }
    if params_follow {
        let mut sorted: Vec<(&str, &str)> =
            post_params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sorted.sort();
        for (k, v) in sorted {
            base.push_str(k);
            base.push_str(v);
        }
    }
    base.push('.');
    base.push_str(nonce);
    signatures.split(',').any(|signature| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(auth_token).expect("HMAC takes any key");
        mac.update(base.as_bytes());
        STANDARD.decode(signature.trim()).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn twilio_vectors() {
        let a = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(twilio(b"12345", url, &a, "GvWf1cFY/Q7PnoempGyD5oXAezc="));
        let b = params(&[
            ("AccountSid", "AC00000000000000000000000000000001"),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", "CA00000000000000000000000000000002"),
            ("CallStatus", "ringing"),
            ("Called", "+15005550006"),
            ("Caller", "+14155551234"),
            ("Direction", "inbound"),
            ("From", "+14155551234"),
            ("To", "+15005550006"),
        ]);
        let token = b"test_auth_token_0123456789abcdef";
        let url = "https://broker.example.com/telephony/twilio/answer?agent=my-agent.my-org";
        assert!(twilio(token, url, &b, "CGlgcPX0L3LSn9WqRWFsuGYS7q8="));
        assert!(twilio(token, url, &b, "Ujn6Va89TkpsLlMiiWrPmVGTiic="), "signed with :443");
        assert!(!twilio(token, &url.replace("https", "http"), &b, "CGlgcPX0L3LSn9WqRWFsuGYS7q8="));
        let mut tampered = b.clone();
        tampered[7].1 = "+14155559999".into();
        assert!(!twilio(token, url, &tampered, "CGlgcPX0L3LSn9WqRWFsuGYS7q8="));
        let get = "https://broker.example.com/telephony/twilio/answer?CallSid=CA00000000000000000000000000000002&From=%2B14155551234&To=%2B15005550006";
        assert!(twilio(token, get, &[], "wK4is20f/k9d3Osc4WMHr5WT1Ws="));
        let repeated = params(&[("a", "x"), ("b", "2"), ("b", "1")]);
        assert!(twilio(b"12345", "https://x/y", &repeated, "H7SBHWZsKpMIZQLbAS/+RiK+XAI="));
    }

    #[test]
    fn telnyx_vectors() {
        let key = telnyx_key("A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=").unwrap();
        let body = b"AccountSid=f5586561-8ff0-4291-a51b-c7dfe4139ff9&CallSid=v3%3A9X2vxPDFY2RHSJ1EdMS0RHRksMTg7ldNxdjWbVr9zBjbGjGsSe-aiQ&CallStatus=ringing&Direction=inbound&From=%2B13125550100&To=%2B13125550199";
        let sig = "XuP9CJxXi+0LmoP4Vk7ZbibMgCTo6IbalSCRMjNnFaNfE6gy/2mFrYOetveftNLb6beSW8ISjGwthtCLpNdoAQ==";
        let ts = "1767225600";
        assert_eq!(telnyx(&key, ts, body, sig, 1767225610), Ok(()));
        assert_eq!(telnyx(&key, ts, body, sig, 1767225900), Ok(()));
        assert_eq!(telnyx(&key, ts, body, sig, 1767225901), Err(TelnyxRefusal::Stale));
        let mut tampered = body.to_vec();
        tampered.push(b'x');
        assert_eq!(telnyx(&key, ts, &tampered, sig, 1767225610), Err(TelnyxRefusal::BadSignature));
        assert_eq!(
            telnyx(&key, "1767225601", body, sig, 1767225610),
            Err(TelnyxRefusal::BadSignature)
        );
        assert!(telnyx_key("c2hvcnQ=").is_none());
    }

    #[test]
    fn plivo_vectors() {
        let token = b"MY_PLIVO_AUTH_TOKEN_0123456789";
        let nonce = "05429567804466091622";
        let post = params(&[
            ("CallUUID", "8f1c1f9e-4a3b-4c2d-9e1f-0123456789ab"),
            ("CallStatus", "ringing"),
            ("Direction", "inbound"),
            ("Event", "StartApp"),
            ("From", "14155551234"),
            ("To", "14155556789"),
        ]);
        let with_query = "https://broker.example.com/telephony/plivo/answer?agent=my-agent.my-org";
        assert!(plivo(
            token,
            false,
            with_query,
            &post,
            nonce,
            "R2eehJLcVyG3bY8/06rnZoOmGDQsZOq5JP3u4qGBN+o="
        ));
        assert!(plivo(
            token,
            false,
            with_query,
            &post,
            nonce,
            "AAAA,R2eehJLcVyG3bY8/06rnZoOmGDQsZOq5JP3u4qGBN+o="
        ));
        let bare = "https://broker.example.com/telephony/plivo/answer";
        assert!(plivo(
            token,
            false,
            bare,
            &post,
            nonce,
            "AyrlzvfxAEGx2GRm2sEe8hxNSmx2d0gLPzwYYzzhEaA="
        ));
        let get = "https://broker.example.com/telephony/plivo/answer?agent=my-agent.my-org&CallUUID=8f1c1f9e-4a3b-4c2d-9e1f-0123456789ab&From=14155551234&To=14155556789&Direction=inbound&CallStatus=ringing&Event=StartApp";
        assert!(plivo(
            token,
            true,
            get,
            &[],
            nonce,
            "5Fi3ySWT3ac+OIKYXYrG3W7aYLXCxhDGt4eEtH89AdM="
        ));
        assert!(!plivo(
            token,
            false,
            bare,
            &post,
            "05429567804466091623",
            "AyrlzvfxAEGx2GRm2sEe8hxNSmx2d0gLPzwYYzzhEaA="
        ));
    }
}
