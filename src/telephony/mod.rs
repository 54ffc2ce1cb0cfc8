//! Telephony providers, as the broker meets them: their answer webhooks (signed, each its own
//! way, see [`signatures`]), the markup that connects a call to a media stream, and the opening
//! messages of their media streams. What Pipecat Cloud serves, provider by provider:
//! `/ws/twilio` (the agent named by the `_pipecatCloudServiceHost` custom parameter of Twilio's
//! `start` message), `/ws/telnyx`, `/ws/plivo`, `/ws/exotel` (`?serviceHost=agent.org`).

pub mod signatures;

use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Twilio,
    Telnyx,
    Plivo,
    Exotel,
}

/// The custom parameter of Twilio's `start` message that names the agent.
pub const TWILIO_SERVICE_HOST_PARAMETER: &str = "_pipecatCloudServiceHost";

impl Provider {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "twilio" => Some(Self::Twilio),
            "telnyx" => Some(Self::Telnyx),
            "plivo" => Some(Self::Plivo),
            "exotel" => Some(Self::Exotel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Telnyx => "telnyx",
            Self::Plivo => "plivo",
            Self::Exotel => "exotel",
        }
    }

    /// The call's id, caller and callee, from the answer webhook's parameters.
    pub fn call(self, params: &[(String, String)]) -> Call {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let id = match self {
            Self::Plivo => get(&["CallUUID"]),
            Self::Twilio | Self::Telnyx | Self::Exotel => get(&["CallSid"]),
        };
        Call {
            id,
            caller: get(&["From", "CallFrom", "Caller"]),
            callee: get(&["To", "CallTo", "Called"]),
        }
    }

    /// What the provider is answered, to stream the call to `stream_url` (which ends with the
    /// session token: Twilio drops query strings). `service_host` is repeated as Pipecat Cloud's
    /// custom parameter for bots that read it.
    pub fn answer(
        self,
        stream_url: &str,
        service_host: &str,
        call: &Call,
    ) -> (&'static str, String) {
        let url = xml_escape(stream_url);
        match self {
            Self::Twilio => {
                let mut parameters = vec![(TWILIO_SERVICE_HOST_PARAMETER, service_host.to_owned())];
                if let Some(from) = &call.caller {
                    parameters.push(("from_number", from.clone()));
                }
                if let Some(to) = &call.callee {
                    parameters.push(("to_number", to.clone()));
                }
                let parameters: String = parameters
                    .iter()
                    .map(|(name, value)| {
                        format!("<Parameter name=\"{name}\" value=\"{}\"/>", xml_escape(value))
                    })
                    .collect();
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect><Stream url=\"{url}\">{parameters}</Stream></Connect></Response>"
                );
                ("text/xml", xml)
            }
            // `rtp`: raw μ-law both ways, as Pipecat sends it (Telnyx's default, mp3, is silence).
            Self::Telnyx => (
                "text/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect><Stream url=\"{url}\" bidirectionalMode=\"rtp\"></Stream></Connect></Response>"
                ),
            ),
            // μ-law, as Pipecat's serializer reads it (Plivo's default is 16-bit PCM); the URL is
            // the element's text.
            Self::Plivo => (
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Stream bidirectional=\"true\" keepCallAlive=\"true\" contentType=\"audio/x-mulaw;rate=8000\">{url}</Stream></Response>"
                ),
            ),
            // Exotel's Voicebot applet, given an https URL, expects JSON naming the stream.
            Self::Exotel => ("application/json", json!({"url": stream_url}).to_string()),
        }
    }
}

/// A call as the answer webhook describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Call {
    pub id: Option<String>,
    pub caller: Option<String>,
    pub callee: Option<String>,
}

impl Call {
    /// The body a webhook-minted session hands its bot: the call, the provider and the
    /// operator's custom parameters (which cannot override the call's own fields).
    pub fn body(
        &self,
        provider: Provider,
        custom: &std::collections::BTreeMap<String, String>,
    ) -> Vec<u8> {
        let mut body = Map::new();
        for (name, value) in custom {
            body.insert(name.clone(), Value::String(value.clone()));
        }
        body.insert("provider".into(), provider.as_str().into());
        body.insert("callId".into(), self.id.clone().into());
        body.insert("caller".into(), self.caller.clone().into());
        body.insert("callee".into(), self.callee.clone().into());
        // A map of strings serializes.
        serde_json::to_vec(&Value::Object(body)).expect("body serializes")
    }
}

/// What the opening messages of a provider-direct stream tell: whether routing can start, and
/// the service host they name (Twilio's custom parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Read more: the `start` message has not come yet.
    More,
    /// `start` came; the agent it names, if it names one.
    Start { service_host: Option<String> },
    /// Not a provider's message.
    Invalid,
}

/// Reads one opening message. Routing waits for `start`: Twilio, Telnyx and Exotel send
/// `connected` first, Plivo does not.
pub fn opening(provider: Provider, text: &str) -> Opening {
    let Ok(message) = serde_json::from_str::<Value>(text) else { return Opening::Invalid };
    match message.get("event").and_then(Value::as_str) {
        Some("start") => {
            let named = match provider {
                Provider::Twilio => message.pointer("/start/customParameters"),
                Provider::Exotel => message.pointer("/start/custom_parameters"),
                Provider::Telnyx | Provider::Plivo => None,
            };
            let service_host = named
                .and_then(|p| p.get(TWILIO_SERVICE_HOST_PARAMETER).or_else(|| p.get("serviceHost")))
                .and_then(Value::as_str)
                .map(str::to_owned);
            Opening::Start { service_host }
        }
        Some(_) => Opening::More,
        None => Opening::Invalid,
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_waits_for_start_and_reads_twilio_s_parameter() {
        assert_eq!(
            opening(Provider::Twilio, r#"{"event":"connected","protocol":"Call"}"#),
            Opening::More
        );
        let start =
            r#"{"event":"start","start":{"customParameters":{"_pipecatCloudServiceHost":"a.o"}}}"#;
        assert_eq!(
            opening(Provider::Twilio, start),
            Opening::Start { service_host: Some("a.o".into()) }
        );
        let plivo = r#"{"event":"start","sequenceNumber":1,"start":{"callId":"x"}}"#;
        assert_eq!(opening(Provider::Plivo, plivo), Opening::Start { service_host: None });
        assert_eq!(opening(Provider::Telnyx, "not json"), Opening::Invalid);
    }

    #[test]
    fn markup_escapes_what_it_embeds() {
        let call = Call { id: Some("CA1".into()), caller: Some("+1<2>".into()), callee: None };
        let (kind, xml) = Provider::Twilio.answer("wss://b/ws/generic/a.o/t?x=1&y=2", "a.o", &call);
        assert_eq!(kind, "text/xml");
        assert!(xml.contains("url=\"wss://b/ws/generic/a.o/t?x=1&amp;y=2\""), "{xml}");
        assert!(xml.contains("value=\"+1&lt;2&gt;\""), "{xml}");
        let (_, json) = Provider::Exotel.answer("wss://b/t", "a.o", &call);
        assert_eq!(json, r#"{"url":"wss://b/t"}"#);
    }
}
