//! Calls, as providers place them: an answer webhook signed exactly as each provider signs it,
//! the markup parsed as XML (or JSON) and its stream URL followed with a real WebSocket that
//! speaks the provider's message sequence to a bot; tampered and replayed webhooks; and the
//! provider-direct streams of agents without tokens.

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signer, SigningKey};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use secrecy::SecretString;
use serde_json::{Value, json};
use session_broker::config::AgentTelephony;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const PUBLIC_URL: &str = "https://voice.example.net";
const TWILIO_TOKEN: &str = "twilio-auth-token-0123456789abcdef";
const PLIVO_TOKEN: &str = "plivo-auth-token-0123456789";
const EXOTEL_SECRET: &str = "exotel-url-secret-0123456789";
const TELNYX_SEED: [u8; 32] = [7; 32];

async fn telephony_app() -> (TestApp, RedisServer) {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    let telnyx = SigningKey::from_bytes(&TELNYX_SEED).verifying_key();
    let credentials = AgentTelephony {
        twilio_auth_token: Some(SecretString::from(TWILIO_TOKEN)),
        telnyx_public_key: Some(STANDARD.encode(telnyx.as_bytes())),
        plivo_auth_token: Some(SecretString::from(PLIVO_TOKEN)),
        exotel_url_secret: Some(SecretString::from(EXOTEL_SECRET)),
        parameters: [("lang".to_owned(), "en".to_owned())].into(),
    };
    let telephony = &mut options.settings.telephony;
    telephony.public_url = Some(PUBLIC_URL.into());
    telephony.agents.insert(format!("{TOKEN_AGENT}.{ORG}"), credentials);
    (TestApp::with(options, bot).await, redis)
}

fn form(params: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}

/// Twilio's scheme: HMAC-SHA1 over the URL and the sorted `name+value` pairs.
fn twilio_signature(url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(TWILIO_TOKEN.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Plivo V3, for a POST to a URL without a query: `url?` + sorted `kv` + `.` + nonce.
fn plivo_signature(url: &str, params: &[(&str, &str)], nonce: &str) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let concatenated: String = sorted.iter().map(|(k, v)| format!("{k}{v}")).collect();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(PLIVO_TOKEN.as_bytes()).unwrap();
    mac.update(format!("{url}?{concatenated}.{nonce}").as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

fn telnyx_signature(timestamp: &str, body: &str) -> String {
    let key = SigningKey::from_bytes(&TELNYX_SEED);
    STANDARD.encode(key.sign(format!("{timestamp}|{body}").as_bytes()).to_bytes())
}

fn now_secs() -> u64 {
    session_broker::store::unix_ms() / 1000
}

/// The stream URL of an answer, parsed as the provider would.
fn stream_url(provider: &str, content_type: &str, answer: &str) -> String {
    if provider == "exotel" {
        assert!(content_type.starts_with("application/json"), "{content_type}");
        let json: Value = serde_json::from_str(answer).unwrap();
        return json["url"].as_str().unwrap().to_owned();
    }
    assert!(content_type.contains("xml"), "{content_type}");
    let doc = roxmltree::Document::parse(answer).expect("the markup is XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "Response");
    let stream = root.descendants().find(|n| n.has_tag_name("Stream")).expect("a Stream element");
    match provider {
        "twilio" => {
            assert_eq!(stream.parent().unwrap().tag_name().name(), "Connect");
            let parameter = stream
                .children()
                .find(|n| n.attribute("name") == Some("_pipecatCloudServiceHost"))
                .expect("the service host parameter");
            assert_eq!(parameter.attribute("value"), Some(format!("{TOKEN_AGENT}.{ORG}").as_str()));
            stream.attribute("url").unwrap().to_owned()
        }
        "telnyx" => {
            assert_eq!(stream.attribute("bidirectionalMode"), Some("rtp"));
            stream.attribute("url").unwrap().to_owned()
        }
        "plivo" => {
            assert_eq!(stream.attribute("bidirectional"), Some("true"));
            assert_eq!(stream.attribute("keepCallAlive"), Some("true"));
            assert_eq!(stream.attribute("contentType"), Some("audio/x-mulaw;rate=8000"));
            stream.text().unwrap().trim().to_owned()
        }
        _ => unreachable!(),
    }
}

/// A webhook request for `provider`, signed (or not) as it signs, with the call's parameters.
fn webhook(
    app: &TestApp,
    provider: &str,
    params: &[(&str, &str)],
    signed: bool,
) -> reqwest::RequestBuilder {
    let host = format!("{TOKEN_AGENT}.{ORG}");
    let path = match provider {
        "exotel" if signed => format!("/telephony/exotel/{host}/{EXOTEL_SECRET}"),
        "exotel" => format!("/telephony/exotel/{host}/wrong-secret-0123456789"),
        _ => format!("/telephony/{provider}/{host}"),
    };
    let public = format!("{PUBLIC_URL}{path}");
    let body = form(params);
    let request = app.http.post(format!("http://{}{path}", app.addr)).body(body.clone());
    let request = request.header("content-type", "application/x-www-form-urlencoded");
    if !signed {
        return request;
    }
    match provider {
        "twilio" => request.header("x-twilio-signature", twilio_signature(&public, params)),
        "telnyx" => {
            let ts = now_secs().to_string();
            request
                .header("telnyx-timestamp", &ts)
                .header("telnyx-signature-ed25519", telnyx_signature(&ts, &body))
        }
        "plivo" => {
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            request
                .header("x-plivo-signature-v3", plivo_signature(&public, params, &nonce))
                .header("x-plivo-signature-v3-nonce", nonce)
        }
        _ => request,
    }
}

/// Each provider's media-stream messages, in the order it sends them.
fn call_messages(provider: &str, frames: usize) -> Vec<String> {
    let payload = STANDARD.encode([0xffu8; 160]);
    let mut messages = Vec::new();
    match provider {
        "twilio" => {
            messages.push(json!({"event":"connected","protocol":"Call","version":"1.0.0"}));
            messages.push(json!({"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","callSid":"CA1","customParameters":{"_pipecatCloudServiceHost":format!("{OPEN_AGENT}.{ORG}")},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}));
            for i in 0..frames {
                messages.push(json!({"event":"media","sequenceNumber":(i + 2).to_string(),"streamSid":"MZ1","media":{"track":"inbound","chunk":(i + 1).to_string(),"timestamp":(i * 20).to_string(),"payload":payload}}));
            }
            messages.push(json!({"event":"mark","streamSid":"MZ1","mark":{"name":"greeting"}}));
            messages.push(json!({"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"1"}}));
            messages.push(json!({"event":"stop","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}));
        }
        "telnyx" => {
            messages.push(json!({"event":"connected","version":"1.0.0"}));
            messages.push(json!({"event":"start","sequence_number":"1","stream_id":"S1","start":{"call_control_id":"v3:1","from":"+1","to":"+2","media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}}}));
            for i in 0..frames {
                messages.push(json!({"event":"media","sequence_number":(i + 2).to_string(),"stream_id":"S1","media":{"track":"inbound","chunk":(i + 1).to_string(),"timestamp":(i * 20).to_string(),"payload":payload}}));
            }
            messages.push(json!({"event":"dtmf","stream_id":"S1","dtmf":{"digit":"1"}}));
            messages
                .push(json!({"event":"stop","stream_id":"S1","stop":{"call_control_id":"v3:1"}}));
        }
        "plivo" => {
            messages.push(json!({"event":"start","sequenceNumber":1,"start":{"callId":"c1","streamId":"s1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}},"extra_headers":"a=b"}));
            for i in 0..frames {
                messages.push(json!({"event":"media","sequenceNumber":i + 2,"streamId":"s1","media":{"track":"inbound","payload":payload}}));
            }
            messages.push(json!({"event":"dtmf","streamId":"s1","dtmf":{"digit":"5"}}));
        }
        "exotel" => {
            let pcm = STANDARD.encode([0u8; 1600]);
            messages.push(json!({"event":"connected"}));
            messages.push(json!({"event":"start","sequence_number":"1","stream_sid":"MZ2","start":{"stream_sid":"MZ2","call_sid":"CA2","from":"+91","to":"+92","custom_parameters":{},"media_format":{"encoding":"audio/x-raw","sample_rate":"8000","bit_rate":"16"}}}));
            for i in 0..frames {
                messages.push(json!({"event":"media","sequence_number":(i + 2).to_string(),"stream_sid":"MZ2","media":{"chunk":(i + 1).to_string(),"timestamp":(i * 100).to_string(),"payload":pcm}}));
            }
            messages.push(json!({"event":"stop","stream_sid":"MZ2","stop":{"call_sid":"CA2","reason":"callended"}}));
        }
        _ => unreachable!(),
    }
    messages.into_iter().map(|m| m.to_string()).collect()
}

/// Plays a call's messages, paced like audio when `pace` is set, and checks that the bot got
/// each in order, unchanged (it echoes them). Returns each frame's round-trip time.
async fn play(ws: &mut Client, messages: &[String], pace: Option<Duration>) -> Vec<Duration> {
    // Providers send their opening through `start` at once, waiting for nothing: so does this.
    let opening =
        messages.iter().position(|m| m.contains("\"event\":\"start\"")).map_or(0, |i| i + 1);
    for message in &messages[..opening] {
        ws.send(Message::text(message.clone())).await.unwrap();
    }
    for message in &messages[..opening] {
        match tokio::time::timeout(Duration::from_secs(10), next_data(ws)).await {
            Ok(Some(Message::Text(echo))) => {
                assert_eq!(echo.as_str(), message, "replayed in order, unchanged")
            }
            other => panic!("expected the echo of {message:.60}, got {other:?}"),
        }
    }
    let mut round_trips = Vec::new();
    for message in &messages[opening..] {
        let sent = Instant::now();
        ws.send(Message::text(message.clone())).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), next_data(ws)).await {
            Ok(Some(Message::Text(echo))) => {
                assert_eq!(echo.as_str(), message, "in order, unchanged")
            }
            other => panic!("expected the echo of {message:.60}, got {other:?}"),
        }
        round_trips.push(sent.elapsed());
        if let Some(pace) = pace {
            tokio::time::sleep(pace.saturating_sub(sent.elapsed())).await;
        }
    }
    round_trips
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

#[tokio::test]
async fn each_provider_s_signed_webhook_answers_markup_that_carries_the_call() {
    let (app, _redis) = telephony_app().await;
    let calls: [(&str, &[(&str, &str)]); 4] = [
        (
            "twilio",
            &[
                ("CallSid", "CA00000000000000000000000000000002"),
                ("From", "+14155551234"),
                ("To", "+15005550006"),
                ("AccountSid", "AC1"),
                ("Direction", "inbound"),
            ],
        ),
        (
            "telnyx",
            &[
                ("CallSid", "v3:telnyx-call"),
                ("From", "+13125550100"),
                ("To", "+13125550199"),
                ("Direction", "inbound"),
            ],
        ),
        (
            "plivo",
            &[
                ("CallUUID", "8f1c1f9e-4a3b-4c2d-9e1f-0123456789ab"),
                ("From", "14155551234"),
                ("To", "14155556789"),
                ("Direction", "inbound"),
            ],
        ),
        (
            "exotel",
            &[("CallSid", "exotel-call-1"), ("CallFrom", "09876543210"), ("CallTo", "08047491899")],
        ),
    ];
    for (provider, params) in calls {
        let resp = webhook(&app, provider, params, true).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{provider}: {:?}", resp.text().await);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let url = stream_url(provider, &content_type, &resp.text().await.unwrap());
        assert!(url.contains(&format!("/ws/generic/{TOKEN_AGENT}.{ORG}/")), "{provider}: {url}");
        assert!(!url.contains('?'), "the token is the last path segment: {url}");
        let mut ws = connect(&url, None).await.unwrap_or_else(|e| panic!("{provider}: {e:?}"));
        play(&mut ws, &call_messages(provider, 10), None).await;
        // The bot got the call in ?body=, as the base image reads it.
        let handshake = app.bot.handshakes.lock().unwrap().last().unwrap().clone();
        let uri = url::Url::parse(&format!("ws://bot{}", handshake.uri)).unwrap();
        let body = uri.query_pairs().find(|(k, _)| k == "body").unwrap().1.into_owned();
        let body: Value = serde_json::from_slice(&STANDARD.decode(body).unwrap()).unwrap();
        let (caller, callee, id) = match provider {
            "exotel" => ("09876543210", "08047491899", "exotel-call-1"),
            _ => (params[1].1, params[2].1, params[0].1),
        };
        assert_eq!(body["provider"], provider);
        assert_eq!(
            (body["caller"].as_str(), body["callee"].as_str()),
            (Some(caller), Some(callee))
        );
        assert_eq!(body["callId"], id);
        assert_eq!(body["lang"], "en", "the operator's custom parameters");
    }
}

#[tokio::test]
async fn unsigned_tampered_replayed_and_stale_webhooks_mint_nothing() {
    let (app, _redis) = telephony_app().await;
    let reason = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        body["reason"].as_str().unwrap().to_owned()
    };
    for provider in ["twilio", "telnyx", "plivo", "exotel"] {
        let call_id = format!("{provider}-call");
        let params = [
            ("CallSid", call_id.as_str()),
            ("CallUUID", call_id.as_str()),
            ("From", "+1"),
            ("To", "+2"),
        ];
        let unsigned = webhook(&app, provider, &params, false).send().await.unwrap();
        let expected =
            if provider == "exotel" { "webhook_bad_signature" } else { "webhook_unsigned" };
        assert_eq!(reason(unsigned).await, expected, "{provider}");
        // Signed, then a parameter changed in flight.
        let signed = webhook(&app, provider, &params, true).build().unwrap();
        let tampered_body = form(&[
            ("CallSid", call_id.as_str()),
            ("CallUUID", call_id.as_str()),
            ("From", "+666"),
            ("To", "+2"),
        ]);
        let mut tampered = signed.try_clone().unwrap();
        *tampered.body_mut() = Some(tampered_body.into());
        if provider != "exotel" {
            assert_eq!(
                reason(app.http.execute(tampered).await.unwrap()).await,
                "webhook_bad_signature",
                "{provider}"
            );
        }
        // The same signed webhook twice: one session.
        assert_eq!(
            app.http.execute(signed.try_clone().unwrap()).await.unwrap().status(),
            200,
            "{provider}"
        );
        assert_eq!(
            reason(app.http.execute(signed).await.unwrap()).await,
            "webhook_replayed",
            "{provider}"
        );
    }
    // A Telnyx timestamp past the tolerance, correctly signed.
    let body = form(&[("CallSid", "old-call"), ("From", "+1"), ("To", "+2")]);
    let old = (now_secs() - 301).to_string();
    let stale = app
        .http
        .post(format!("http://{}/telephony/telnyx/{TOKEN_AGENT}.{ORG}", app.addr))
        .header("telnyx-timestamp", &old)
        .header("telnyx-signature-ed25519", telnyx_signature(&old, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(reason(stale).await, "webhook_stale");
    // A URL other than the one signed (the public URL is what the provider called).
    let params = [("CallSid", "url-call"), ("From", "+1"), ("To", "+2")];
    let wrong_url = format!("http://internal:8080/telephony/twilio/{TOKEN_AGENT}.{ORG}");
    let resp = app
        .http
        .post(format!("http://{}/telephony/twilio/{TOKEN_AGENT}.{ORG}", app.addr))
        .header("x-twilio-signature", twilio_signature(&wrong_url, &params))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&params))
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, "webhook_bad_signature");
    assert_eq!(app.bot.connections(), 0, "no bot was touched");
}

#[tokio::test]
async fn provider_direct_streams_route_by_their_opening_and_replay_it() {
    let (app, _redis) = telephony_app().await;
    let base = format!("ws://{}", app.addr);
    let mut direct_rtts = Vec::new();
    let mut broker_rtts = Vec::new();
    for provider in ["twilio", "telnyx", "plivo", "exotel"] {
        let url = match provider {
            "twilio" => format!("{base}/ws/twilio"),
            _ => format!("{base}/ws/{provider}?serviceHost={OPEN_AGENT}.{ORG}"),
        };
        let mut ws = connect(&url, None).await.unwrap_or_else(|e| panic!("{provider}: {e:?}"));
        let messages = call_messages(provider, 50);
        broker_rtts.extend(play(&mut ws, &messages, Some(Duration::from_millis(20))).await);
        let handshake = app.bot.handshakes.lock().unwrap().last().unwrap().clone();
        assert!(handshake.headers.contains_key("x-daily-session-id"), "{provider}");
    }
    // The same calls straight to the bot, for the delay the broker adds.
    let mut direct = connect(&app.bot.url(), None).await.unwrap();
    direct_rtts.extend(
        play(&mut direct, &call_messages("twilio", 200), Some(Duration::from_millis(20))).await,
    );
    let (p50, p99) = (percentile(broker_rtts.clone(), 0.5), percentile(broker_rtts, 0.99));
    let (d50, d99) = (percentile(direct_rtts.clone(), 0.5), percentile(direct_rtts, 0.99));
    println!(
        "paced call frames, round trip via broker p50 {p50:?} p99 {p99:?}; direct p50 {d50:?} p99 {d99:?}; \
         added p50 {:?} p99 {:?}",
        p50.saturating_sub(d50),
        p99.saturating_sub(d99)
    );
}

#[tokio::test]
async fn provider_direct_streams_refuse_with_a_clear_close() {
    let (app, _redis) = telephony_app().await;
    let base = format!("ws://{}", app.addr);
    let closed_with = |url: String, first: Vec<String>| async move {
        let mut ws = connect(&url, None).await.unwrap();
        for message in first {
            ws.send(Message::text(message)).await.unwrap();
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    };
    let start_naming = |host: &str| {
        json!({"event":"start","start":{"customParameters":{"_pipecatCloudServiceHost":host}}})
            .to_string()
    };
    let connected = json!({"event":"connected"}).to_string();
    let (code, reason) = closed_with(
        format!("{base}/ws/twilio"),
        vec![connected.clone(), start_naming("nobody.acme")],
    )
    .await;
    assert_eq!((code, reason.as_str()), (4404, "unknown service host"));
    let (code, reason) = closed_with(
        format!("{base}/ws/twilio"),
        vec![connected.clone(), start_naming(&format!("{TOKEN_AGENT}.{ORG}"))],
    )
    .await;
    assert_eq!(code, 4403);
    assert!(reason.contains("requires session tokens"), "{reason}");
    let (code, _) = closed_with(
        format!("{base}/ws/twilio"),
        vec![connected.clone(), json!({"event":"start","start":{}}).to_string()],
    )
    .await;
    assert_eq!(code, 4400, "no service host named");
    let (code, _) = closed_with(
        format!("{base}/ws/plivo?serviceHost={OPEN_AGENT}.{ORG}"),
        vec!["not json".into()],
    )
    .await;
    assert_eq!(code, 4400);
    let (code, reason) =
        closed_with(format!("{base}/ws/telnyx?serviceHost={OPEN_AGENT}.{ORG}"), vec![connected])
            .await;
    assert_eq!((code, reason.as_str()), (4408, "no start message in time"));
    assert_eq!(app.bot.connections(), 0, "no bot was touched");
}
