//! `?body=` (`routes::ws::request::decode_body`): whatever a client appends, the gate decodes
//! only to JSON; and every form in which a client may return `/start`'s base64 of a JSON body
//! (standard or URL-safe alphabet, padded or not, `+` turned into a space by a query parser,
//! appended verbatim to the URL and read by the gate's query parser) decodes to exactly that
//! body, byte for byte, and reaches the bot in a form it decodes to the same bytes.
//!
//! An input is read both ways: as the text of a `?body=` and as a JSON body.
#![no_main]

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD},
};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use session_broker::routes::ws::request::{WsQuery, decode_body, encode_body};

/// JSON as RFC 8259 has it: UTF-8 text (which `serde_json::from_slice` does not check inside the
/// strings it skips) of one value.
fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(body) = decode_body(text)
    {
        assert!(is_json(&body), "decoded to something that is not JSON");
        // What the bot gets: standard padded base64, as Python's base64.b64decode reads it.
        let to_bot = encode_body(&body);
        assert_eq!(STANDARD.decode(&to_bot).as_deref(), Ok(&body[..]));
        assert_eq!(decode_body(&to_bot).ok().as_deref(), Some(&body[..]));
    }

    if is_json(data) {
        let standard = STANDARD.encode(data);
        let forms = [
            standard.clone(),
            STANDARD_NO_PAD.encode(data),
            URL_SAFE.encode(data),
            URL_SAFE_NO_PAD.encode(data),
            standard.replace('+', " "),
        ];
        for form in &forms {
            assert_eq!(decode_body(form).ok().as_deref(), Some(data), "{form:?}");
        }
        // Appended verbatim as `?body=`, then read as the gate reads its query string.
        for form in [&standard, &forms[3]] {
            let query = WsQuery::read(&format!("token=t&body={form}"), usize::MAX)
                .expect("base64 is a valid query value");
            let raw = query.body.expect("the body is there");
            assert_eq!(decode_body(&raw).ok().as_deref(), Some(data), "?body={form}");
        }
    }
});
