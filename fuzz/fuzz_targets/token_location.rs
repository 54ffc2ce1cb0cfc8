//! Where the WebSocket gate finds a token (`routes::ws::request`): `Authorization: Bearer`, then
//! `?token=`, then the last path segment, the first place that holds one deciding, and a public
//! key in the header not counting (the contract's order).
//!
//! An input is `<Authorization value>\n<query string>\n<path after /ws/generic>` (missing parts
//! are absent). The header reaches the gate as an HTTP request would bring it; the query string
//! goes through the gate's own parser, the path through its own splitter.
#![no_main]

use actix_web::{
    http::header::{AUTHORIZATION, HeaderValue},
    test::TestRequest,
};
use libfuzzer_sys::fuzz_target;
use session_broker::{
    api_keys::PUBLIC_KEY_PREFIX,
    error::ApiError,
    routes::ws::request::{WsQuery, find_token, parse_path},
};

/// `limits.max_query_bytes` by default.
const MAX_QUERY_BYTES: usize = 8 * 1024;

/// The credential of an `Authorization` header as RFC 6750 reads it: the scheme `Bearer` in any
/// case, one space, the credential (surrounding blanks aside). Only visible ASCII is text.
fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    if !text.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return None;
    }
    let (scheme, credential) = text.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let header = parts.next().filter(|h| !h.is_empty());
    let (Ok(query), Ok(path)) = (
        std::str::from_utf8(parts.next().unwrap_or_default()),
        std::str::from_utf8(parts.next().unwrap_or_default()),
    ) else {
        return;
    };

    // The path: at most a service and a token, and nothing of it lost or invented.
    let Some((service, path_token)) = parse_path(path) else {
        assert!(
            !(path.is_empty() || (path.starts_with('/') && path.matches('/').count() <= 2)),
            "a well-formed path refused: {path:?}"
        );
        return;
    };
    let rebuilt = match path_token {
        None => format!("/{service}"),
        Some(token) => format!("/{service}/{token}"),
    };
    // `/ws/generic` and `/ws/generic/` both leave the service to the query.
    assert!(rebuilt == path || (path.is_empty() && service.is_empty()), "{path:?}");
    assert!(!service.contains('/') && !path_token.is_some_and(|t| t.contains('/')));

    // The query: its length is checked before anything of it is read.
    if !query.is_empty() {
        let short = WsQuery::read(query, query.len() - 1);
        assert!(matches!(short, Err(ApiError::QueryTooLong)), "an over-long query was read");
    }
    let Ok(query) = WsQuery::read(query, MAX_QUERY_BYTES) else { return };

    let header = header.and_then(|h| HeaderValue::from_bytes(h).ok());
    let mut req = TestRequest::default();
    if let Some(value) = &header {
        req = req.insert_header((AUTHORIZATION, value.clone()));
    }
    let req = req.to_http_request();
    let found = find_token(&req, query.token.as_deref(), path_token);

    let expected = header
        .as_ref()
        .and_then(|h| bearer(h.as_bytes()))
        .filter(|credential| !credential.starts_with(PUBLIC_KEY_PREFIX))
        .or(query.token.as_deref().filter(|t| !t.is_empty()))
        .or(path_token.filter(|t| !t.is_empty()));
    assert_eq!(found, expected, "header over query over path");
});
