//! The opening messages of a provider-direct stream (`telephony::opening`, and
//! `routes::ws::providers::OpeningMessages`, which reads them for `/ws/twilio` and the others).
//!
//! Any text is classified without a panic, the same way for every provider (`start` routes,
//! another event reads on, anything else is refused); only Twilio and Exotel name an agent. The
//! reader keeps at most its count and its bytes of messages, replays exactly what it read, in
//! order, and routes exactly when a `start` comes within those bounds.
//!
//! An input is the provider's name (`twilio`, `telnyx`, `plivo`, `exotel`; another picks one by
//! its length), then the stream's text messages, each after a `\0`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use session_broker::{
    routes::ws::providers::{MAX_OPENING_BYTES, MAX_OPENING_MESSAGES, OpeningMessages},
    telephony::{Opening, Provider, opening},
};

const PROVIDERS: [Provider; 4] =
    [Provider::Twilio, Provider::Telnyx, Provider::Plivo, Provider::Exotel];
/// Bounds small enough for short inputs to reach, beside the real ones.
const TIGHT: (usize, usize) = (2, 300);

/// What happens to an opening, from the classification of its messages alone.
#[derive(Debug, PartialEq)]
enum Outcome {
    Routed {
        read: usize,
        service_host: Option<String>,
    },
    Refused {
        read: usize,
    },
    /// The stream ended first.
    Waiting {
        read: usize,
    },
}

fn read(
    provider: Provider,
    messages: &[String],
    (max_messages, max_bytes): (usize, usize),
) -> Outcome {
    let mut reader = OpeningMessages::new(provider, max_messages, max_bytes);
    for message in messages {
        let taken = reader.take(message);
        let read = reader.messages.len();
        assert!(read <= max_messages, "kept {read} messages");
        let bytes: usize = reader.messages.iter().map(String::len).sum();
        assert!(bytes <= max_bytes, "kept {bytes} bytes");
        assert_eq!(reader.messages[..], messages[..read], "replays what it read, in order");
        match taken {
            Ok(Opening::Start { service_host }) => return Outcome::Routed { read, service_host },
            Ok(Opening::More) => {}
            Ok(Opening::Invalid) => panic!("Invalid is a refusal"),
            Err(_) => return Outcome::Refused { read },
        }
    }
    Outcome::Waiting { read: reader.messages.len() }
}

/// The same, from the rules and the messages' classification: a `start` within the bounds
/// routes, a message past them or one that is not the provider's is refused.
fn expected(
    seen: &[Opening],
    messages: &[String],
    (max_messages, max_bytes): (usize, usize),
) -> Outcome {
    let mut bytes = 0;
    for (i, (message, seen)) in messages.iter().zip(seen).enumerate() {
        bytes += message.len();
        if i >= max_messages || bytes > max_bytes {
            return Outcome::Refused { read: i };
        }
        match seen {
            Opening::Start { service_host } => {
                return Outcome::Routed { read: i + 1, service_host: service_host.clone() };
            }
            Opening::More => {}
            Opening::Invalid => return Outcome::Refused { read: i + 1 },
        }
    }
    Outcome::Waiting { read: messages.len() }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let name = parts.next().unwrap_or_default();
    let provider = std::str::from_utf8(name)
        .ok()
        .and_then(Provider::parse)
        .unwrap_or(PROVIDERS[name.len() % PROVIDERS.len()]);
    let messages: Vec<String> = parts.map(|m| String::from_utf8_lossy(m).into_owned()).collect();

    let mut seen = Vec::with_capacity(messages.len());
    for message in &messages {
        let event = serde_json::from_str::<Value>(message)
            .ok()
            .and_then(|v| v.get("event").and_then(Value::as_str).map(str::to_owned));
        for other in PROVIDERS {
            match (opening(other, message), event.as_deref()) {
                (Opening::Start { service_host }, Some("start")) => {
                    if matches!(other, Provider::Telnyx | Provider::Plivo) {
                        assert_eq!(service_host, None, "{other:?} names no agent");
                    }
                }
                (Opening::More, Some(event)) => assert_ne!(event, "start"),
                (Opening::Invalid, None) => {}
                (seen, event) => panic!("{other:?}: {seen:?} for event {event:?}"),
            }
        }
        seen.push(opening(provider, message));
    }

    for bounds in [TIGHT, (MAX_OPENING_MESSAGES, MAX_OPENING_BYTES)] {
        assert_eq!(read(provider, &messages, bounds), expected(&seen, &messages, bounds));
    }
});
