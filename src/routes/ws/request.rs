//! What a WebSocket connect asks for, read from its request: the service host and token place in
//! the path, the token from the first place that holds one, and the `?body=` for the bot.

use actix_web::{HttpRequest, http::header, web};
use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use serde::Deserialize;

use crate::{api_keys, error::ApiError};

/// Accepts `?body=` in the standard or the URL-safe alphabet, padded or not.
const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// The rest of the path after the WebSocket prefix: the service host and, maybe, the token.
/// An empty rest (`/ws/generic?serviceHost=agent.org`, the documented query form) names no
/// service here; the query does.
pub fn parse_path(rest: &str) -> Option<(&str, Option<&str>)> {
    if rest.is_empty() {
        return Some(("", None));
    }
    let rest = rest.strip_prefix('/')?;
    match rest.split_once('/') {
        None => Some((rest, None)),
        Some((service, token)) if !token.contains('/') => Some((service, Some(token))),
        Some(_) => None,
    }
}

/// The query parameters the gate reads; the rest of the query string is dropped, never passed
/// to the bot.
#[derive(Debug, Default, Deserialize)]
pub struct WsQuery {
    pub token: Option<String>,
    pub body: Option<String>,
    /// `agent.org`, for the query form of the URL.
    #[serde(rename = "serviceHost")]
    pub service_host: Option<String>,
}

impl WsQuery {
    /// Parses the query string, once its length is known to be at most `max_bytes`: a stranger
    /// controls it, and nothing of it is decoded before that check.
    pub fn read(query: &str, max_bytes: usize) -> Result<Self, ApiError> {
        if query.len() > max_bytes {
            return Err(ApiError::QueryTooLong);
        }
        if query.is_empty() {
            return Ok(Self::default());
        }
        web::Query::<Self>::from_query(query)
            .map(web::Query::into_inner)
            .map_err(|e| ApiError::BadRequest(format!("Invalid query string: {e}")))
    }
}

/// The token, from the first place that holds one: `Authorization: Bearer`, then `?token=`,
/// then the last path segment (telephony providers such as Twilio drop query strings). A public
/// key left in the header (a server client reusing its HTTP headers) is not a session token and
/// does not count.
pub fn find_token<'a>(
    req: &'a HttpRequest,
    query: Option<&'a str>,
    path: Option<&'a str>,
) -> Option<&'a str> {
    api_keys::bearer(req.headers().get(header::AUTHORIZATION))
        .filter(|credential| !credential.starts_with(api_keys::PUBLIC_KEY_PREFIX))
        .or(query.filter(|t| !t.is_empty()))
        .or(path.filter(|t| !t.is_empty()))
}

/// Decodes `?body=` to the JSON bytes it carries. Clients append `/start`'s base64 verbatim, so
/// a `+` may have reached us as a space (a query parser's reading of `+`): spaces are read back
/// as `+`. Either alphabet, padded or not.
pub fn decode_body(raw: &str) -> Result<Vec<u8>, ApiError> {
    let raw = raw.replace(' ', "+");
    let bytes = STANDARD_LENIENT
        .decode(&raw)
        .or_else(|_| URL_SAFE_LENIENT.decode(&raw))
        .map_err(|_| ApiError::BadRequest("body must be base64-encoded JSON".into()))?;
    // JSON is UTF-8 (RFC 8259), which serde_json does not check in the strings it skips: checked
    // first, or `"\xff"` would reach the bot, whose JSON parser refuses it.
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).ok())
        .ok_or_else(|| ApiError::BadRequest("body must be base64-encoded JSON".into()))?;
    Ok(bytes)
}

/// The body as the bot receives it in `?body=`: standard base64, padded, which Pipecat's base
/// image decodes with `base64.b64decode`.
pub fn encode_body(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::{decode_body, encode_body, parse_path};

    #[test]
    fn paths() {
        assert_eq!(parse_path("/a.o"), Some(("a.o", None)));
        assert_eq!(parse_path("/a.o/tok"), Some(("a.o", Some("tok"))));
        assert_eq!(parse_path("/a.o/"), Some(("a.o", Some(""))));
        assert_eq!(parse_path("/a.o/tok/more"), None);
        assert_eq!(parse_path(""), Some(("", None)), "the query form names the service");
        assert_eq!(parse_path("x"), None);
    }

    #[test]
    fn a_body_is_utf_8_json() {
        // Found by fuzzing (docs/fuzzing.md): a string that is not UTF-8 passed as JSON.
        assert!(decode_body(&encode_body(b"\"\xff\"")).is_err());
        assert!(decode_body(&encode_body(b"{\"a\":\"\xc3\"}")).is_err());
        assert_eq!(
            decode_body(&encode_body("\"\u{e9}\"".as_bytes())).unwrap(),
            "\"\u{e9}\"".as_bytes()
        );
    }
}
