//! Session records, the session API, the concurrency cap and what happens when a replica dies.

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};
use uuid::Uuid;

use crate::{on_both_stores, support::*};

/// Makes Redis refuse every write, scripts' included, for want of a replica that does not exist
/// (`min-replicas-to-write`); reads go on. Nothing of a refused script is written.
fn refuse_writes(admin: &mut redis::Connection, refuse: bool) {
    let replicas = if refuse { "1" } else { "0" };
    let set = redis::cmd("CONFIG").arg(&["SET", "min-replicas-to-write", replicas]).query(admin);
    set.unwrap_or_else(|e: redis::RedisError| panic!("CONFIG SET min-replicas-to-write: {e}"))
}

async fn record(app: &TestApp, agent: &str, sid: &str) -> Value {
    let (status, body) = app.session(Method::GET, agent, sid).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the record of `sid` has `status`, and returns it.
async fn record_with_status(app: &TestApp, agent: &str, sid: &str, status: &str) -> Value {
    eventually(Duration::from_secs(5), || async {
        let body = record(app, agent, sid).await;
        (body["status"] == status).then_some(body)
    })
    .await
}

async fn a_session_goes_pending_active_ended(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let pending = record(&app, TOKEN_AGENT, &sid).await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["service"], format!("{TOKEN_AGENT}.{ORG}"));
    assert!(
        pending["tokenExpiresAtMs"].as_u64().unwrap() > pending["createdAtMs"].as_u64().unwrap()
    );

    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    let active = record_with_status(&app, TOKEN_AGENT, &sid, "active").await;
    assert_eq!(active["region"], "local");
    assert!(active["replica"].as_str().unwrap().starts_with("local/"));

    ws.close(Some(CloseFrame { code: 1000.into(), reason: "bye".into() })).await.unwrap();
    let ended = record_with_status(&app, TOKEN_AGENT, &sid, "ended").await;
    assert_eq!(ended["endReason"], "client_closed");
    assert!(ended["durationMs"].is_u64());
}
on_both_stores!(a_session_goes_pending_active_ended_on, a_session_goes_pending_active_ended);

#[tokio::test]
async fn a_normal_close_by_the_bot_is_completed() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    ws.send(Message::text("close 1000 goodbye")).await.unwrap();
    assert!(matches!(next_data(&mut ws).await, Some(Message::Close(_))));
    let ended = record_with_status(&app, TOKEN_AGENT, &sid, "ended").await;
    assert_eq!(ended["endReason"], "completed");
}

#[tokio::test]
async fn an_unreachable_bot_is_recorded_and_the_session_ends_with_its_token() {
    let redis = RedisServer::start();
    let unused = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &unused);
    options.bot_url = format!("ws://127.0.0.1:{}/ws", free_port());
    options.settings.token.lifetime = Duration::from_secs(1);
    let app = TestApp::with(options, unused).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    assert!(matches!(connect(&ws_url, Some((&token, Via::Path))).await, Err((503, _, _))));
    let pending = record(&app, TOKEN_AGENT, &sid).await;
    assert_eq!(
        (pending["status"].as_str(), pending["lastError"].as_str()),
        (Some("pending"), Some("bot_unreachable"))
    );
    assert!(pending["replica"].is_null() && pending["connectedAtMs"].is_null(), "{pending}");
    let ended = record_with_status(&app, TOKEN_AGENT, &sid, "ended").await;
    assert_eq!(ended["endReason"], "bot_unreachable");
}

/// A bot that does not answer, while the store refuses writes for a moment: the undo of the
/// connect is tried again until the store takes it, so the token stays usable, as the 503 said.
#[tokio::test]
async fn a_failed_connect_s_undo_is_tried_again_until_the_token_is_given_back() {
    let redis = RedisServer::start();
    let unused = TestBot::start().await;
    // Accepts connections and never answers: the dial times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut options = AppOptions::new(Some(redis.url()), &unused);
    options.bot_url = format!("ws://{}/ws", silent.local_addr().unwrap());
    options.settings.limits.bot_connect_timeout = Duration::from_millis(800);
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let app = TestApp::with(options, unused).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let attempt = tokio::spawn({
        let (ws_url, token) = (ws_url.clone(), token.clone());
        async move { connect(&ws_url, Some((&token, Via::Path))).await.err().map(|e| e.0) }
    });
    // While the bot is dialled (the store has opened the session): no more writes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = redis.client();
    refuse_writes(&mut admin, true);
    assert_eq!(attempt.await.unwrap(), Some(503));
    refuse_writes(&mut admin, false);
    let pending = record_with_status(&app, TOKEN_AGENT, &sid, "pending").await;
    assert_eq!(pending["lastError"], "bot_unreachable", "{pending}");
    let again = connect(&ws_url, Some((&token, Via::Path))).await.err().map(|e| e.0);
    assert_eq!(again, Some(503), "the token was given back: the bot, not the token, refuses");
    held.abort();
}

async fn an_unreachable_bot_ends_a_session_without_a_token(store: Store) {
    let redis = match store {
        Store::Redis => Some(RedisServer::start()),
        Store::Memory => None,
    };
    let unused = TestBot::start().await;
    let mut options = AppOptions::new(redis.as_ref().map(RedisServer::url), &unused);
    options.bot_url = format!("ws://127.0.0.1:{}/ws", free_port());
    let app = TestApp::with(options, unused).await;
    let host = format!("{OPEN_AGENT}.{ORG}");
    assert!(matches!(connect(&app.ws_url(OPEN_AGENT, ORG), None).await, Err((503, _, _))));
    // The store opened the session before the dial; the failed dial ended it, and freed its slot.
    let listed = app.store.list_sessions(&host, 10).await.unwrap();
    let [(_, record)] = listed.as_slice() else { panic!("one session listed: {listed:?}") };
    assert_eq!(record.status, Some(session_broker::store::Status::Ended));
    assert_eq!(record.end_reason, Some(session_broker::store::EndReason::BotUnreachable));
    assert_eq!((record.replica.is_some(), record.connected_ms.is_some()), (true, true));
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), 0);
    let events = app.store.events(&host).await.unwrap();
    let texts: Vec<&str> = events.iter().map(|e| e.text.as_str()).collect();
    assert!(texts[0].ends_with("could not reach its bot"), "{texts:?}");
}
on_both_stores!(
    an_unreachable_bot_ends_a_session_without_a_token_on,
    an_unreachable_bot_ends_a_session_without_a_token
);

/// A connect refused because the store answered after the command timeout, whose open ran in
/// the store after all, is undone late by the same request as an unreachable bot's: nothing of
/// it stays live, the token session's token works again with nothing noted against it, and the
/// session without a token ends without a reason but says why.
async fn a_connect_the_store_answered_too_late_is_undone(store: Store) {
    use session_broker::store::{
        AbandonRequest, Connected, EventLog, Listing, MintRequest, Minted, OpenRequest,
        SessionRecord, Status, TokenUse, unix_ms,
    };
    let (app, _redis) = TestApp::spawn(store).await;
    let store = &app.store;
    let now = unix_ms();
    let minute = Duration::from_secs(60);
    let events = EventLog { cap: 10, retention: minute };
    let active = SessionRecord {
        status: Some(Status::Active),
        replica: Some("r1".into()),
        region: Some("local".into()),
        connected_ms: Some(now),
        ..SessionRecord::default()
    };
    let open = |agent, sid, token| OpenRequest {
        agent,
        sid,
        token,
        cap: 5,
        lease: minute,
        active: &active,
        record_ttl: minute,
        listing: Some(Listing { agent, created_ms: now, retention: minute }),
    };
    let late = |agent, sid, holder| AbandonRequest {
        agent,
        sid,
        holder,
        token: holder.is_some(),
        why: None,
        record_ttl: minute,
        event: None,
        events,
    };

    // A token session goes back to pending, as if the connect had never happened.
    let host = format!("{TOKEN_AGENT}.{ORG}");
    let sid = uuid::Uuid::new_v4();
    let pending = SessionRecord::pending(&host, now, now + 60_000, "local");
    let minted = store
        .mint_session(&MintRequest {
            agent: &host,
            sid,
            cap: 5,
            rates: &[],
            rate_window: minute,
            record: Some((
                &pending,
                minute,
                Listing { agent: &host, created_ms: now, retention: minute },
            )),
        })
        .await
        .unwrap();
    let Minted::Ok { fence } = minted else { panic!("not minted: {minted:?}") };
    let fence = fence.unwrap_or_default();
    let token =
        |holder| Some(TokenUse { fence: &fence, holder, mark_ttl: minute, want_body: false });
    let first = store.open_session(&open(&host, sid, token("first"))).await.unwrap();
    assert_eq!(first, Connected::Ok { body: None });
    assert!(store.abandon_session(&late(&host, sid, Some("first"))).await.unwrap(), "given back");
    let record = store.get_session(&host, sid).await.unwrap().unwrap();
    assert_eq!((record.status, record.last_error), (Some(Status::Pending), None));
    assert_eq!((record.replica, record.connected_ms), (None, None), "held nowhere");
    assert_eq!(store.live_sessions(&host).await.unwrap(), 0, "the slot is free");
    let again = store.open_session(&open(&host, sid, token("second"))).await.unwrap();
    assert_eq!(again, Connected::Ok { body: None }, "the token works again");

    // A session without a token ends, with no end reason and the reason in its detail.
    let host = format!("{OPEN_AGENT}.{ORG}");
    let sid = uuid::Uuid::new_v4();
    let opened = store.open_session(&open(&host, sid, None)).await.unwrap();
    assert_eq!(opened, Connected::Ok { body: None });
    assert!(!store.abandon_session(&late(&host, sid, None)).await.unwrap());
    let record = store.get_session(&host, sid).await.unwrap().unwrap();
    assert_eq!((record.status, record.end_reason), (Some(Status::Ended), None));
    let detail = record.detail.unwrap_or_default();
    assert!(detail.contains("the store answered too late"), "{detail}");
    assert_eq!(store.live_sessions(&host).await.unwrap(), 0, "the slot is free");
    let listed = store.list_sessions(&host, 10).await.unwrap();
    assert_eq!(listed.len(), 1, "still listed, as ended: {listed:?}");
    let texts: Vec<String> =
        store.events(&host).await.unwrap().into_iter().map(|e| e.text).collect();
    assert!(texts.is_empty(), "the late undo logs nothing of its own: {texts:?}");
}
on_both_stores!(
    a_connect_the_store_answered_too_late_is_undone_on,
    a_connect_the_store_answered_too_late_is_undone
);

#[tokio::test]
async fn the_session_api_is_scoped_to_the_key_and_agent() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (_, _, sid) = app.start_session(TOKEN_AGENT).await;
    let url =
        |agent: &str, sid: &str| format!("http://{}/v1/public/{agent}/sessions/{sid}", app.addr);

    let anonymous = app.http.get(url(TOKEN_AGENT, &sid)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let foreign = app.http.get(url(TOKEN_AGENT, &sid)).bearer_auth(OTHER_KEY).send().await.unwrap();
    assert_eq!(foreign.status(), 401);
    for (agent, id) in [
        (SECOND_AGENT, sid.as_str()),
        (TOKEN_AGENT, "not-a-uuid"),
        (TOKEN_AGENT, &uuid::Uuid::new_v4().to_string()),
    ] {
        let (status, body) = app.session(Method::GET, agent, id).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("404")), "{agent}/{id}");
        let (status, _) = app.session(Method::DELETE, agent, id).await;
        assert_eq!(status, 404);
    }
    let (status, _) = app.session(Method::GET, "no-such-agent", &sid).await;
    assert_eq!(status, 404);
}

async fn deleting_a_pending_session_spends_its_token(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let (status, body) = app.session(Method::DELETE, TOKEN_AGENT, &sid).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["status"].as_str(), body["endReason"].as_str()),
        (Some("ended"), Some("terminated"))
    );
    match connect(&ws_url, Some((&token, Via::Path))).await {
        Err((403, _, _)) => {}
        other => panic!(
            "a terminated session's token must be refused, got {:?}",
            other.map(|_| "upgrade")
        ),
    }
    assert_eq!(app.bot.connections(), 0);
    // Deleting again changes nothing in the record.
    let (status, again) = app.session(Method::DELETE, TOKEN_AGENT, &sid).await;
    assert_eq!((status, &again["endedAtMs"]), (200, &body["endedAtMs"]));
    assert_eq!(again["endReason"], "terminated");
}
on_both_stores!(
    deleting_a_pending_session_spends_its_token_on,
    deleting_a_pending_session_spends_its_token
);

#[tokio::test]
async fn delete_on_one_replica_ends_a_session_held_by_another() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.key_prefix = "shared".into();
    let a = TestApp::with(options, bot.clone()).await;
    // B runs as a process of its own: its log tells when it has finished ending the session.
    let b = BrokerProcess::spawn(&redis.url(), "shared", &a, &[]).await;
    let (token, _, sid) = a.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&b.ws_url(TOKEN_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("held by B")).await;
    record_with_status(&a, TOKEN_AGENT, &sid, "active").await;

    let (status, body) = a.session(Method::DELETE, TOKEN_AGENT, &sid).await;
    assert_eq!((status, body["endReason"].as_str()), (200, Some("terminated")));
    match next_data(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected close 4000, got {other:?}"),
    }
    let closes =
        eventually(Duration::from_secs(2), || async { bot.closes().first().cloned() }).await;
    assert_eq!(closes.0, "4000");
    // The first reason stays: the relay's own end, which B has tried to record by the time it
    // logs the session's end, does not overwrite it.
    b.log_line(Duration::from_secs(5), &["session ended", &sid]).await;
    assert_eq!(record(&a, TOKEN_AGENT, &sid).await["endReason"], "terminated");
}

#[tokio::test]
async fn the_cap_holds_across_replicas_and_a_refused_token_stays_usable() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let [a, b]: [TestApp; 2] = replicas(&redis.url(), &bot, 2).await.try_into().ok().unwrap();

    // A token minted while there is room, used once the cap is reached.
    let (late_token, _, _) = a.start_session(CAPPED_AGENT).await;
    let mut held = Vec::new();
    for app in [&a, &b] {
        let (token, _, _) = app.start_session(CAPPED_AGENT).await;
        let mut ws =
            connect(&app.ws_url(CAPPED_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
        assert_echo(&mut ws, Message::text("slot")).await;
        held.push(ws);
    }
    for app in [&a, &b] {
        let resp = app.post_start(CAPPED_AGENT, Some(KEY), "{}").await;
        assert_eq!(resp.status(), 429);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["code"].as_str(), body["reason"].as_str()),
            (Some("429"), Some("agent_at_capacity"))
        );
        match connect(&app.ws_url(CAPPED_AGENT, ORG), Some((&late_token, Via::Query))).await {
            Err((429, body, _)) => assert_eq!(
                (body["code"].as_str(), body["reason"].as_str()),
                (Some("429"), Some("agent_at_capacity"))
            ),
            other => panic!("expected 429, got {:?}", other.map(|_| "upgrade")),
        }
    }
    assert_eq!(bot.connections(), 2, "refused connects never reach the bot");
    // Other agents are not capped by this one.
    assert_eq!(a.post_start(TOKEN_AGENT, Some(KEY), "{}").await.status(), 200);

    // One session ends: its slot is free and the refused token still works.
    let mut first = held.remove(0);
    first.close(None).await.unwrap();
    let mut ws = eventually(Duration::from_secs(5), || async {
        connect(&b.ws_url(CAPPED_AGENT, ORG), Some((&late_token, Via::Query))).await.ok()
    })
    .await;
    assert_echo(&mut ws, Message::text("freed")).await;
}

/// A session whose end the store refuses for a moment (here: writes refused for want of
/// replicas; as well a burst of ends that outlasts the command timeout, whose requests the
/// client then never sends) is recorded with its own end once the store takes it: not taken for
/// one lost with its replica when its lease lapses.
#[tokio::test]
async fn an_end_the_store_refused_for_a_moment_is_recorded_later() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.sessions.lease_ttl = Duration::from_secs(4);
    options.settings.sessions.sweep_interval = Duration::from_millis(100);
    let app = TestApp::with(options, bot.clone()).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;

    let mut admin = redis.client();
    refuse_writes(&mut admin, true);
    ws.close(None).await.unwrap();
    // The end's first tries are refused, and nothing of them is written.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let record = record(&app, TOKEN_AGENT, &sid).await;
    assert_eq!(record["status"], "active", "the end was refused: {record}");
    refuse_writes(&mut admin, false);
    let ended = record_with_status(&app, TOKEN_AGENT, &sid, "ended").await;
    assert_eq!(ended["endReason"], "client_closed", "{ended}");
    let host = format!("{TOKEN_AGENT}.{ORG}");
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), 0, "the slot is free");
}

/// An end whose answer was lost (Redis stopped: the request waits in its socket past the
/// command timeout, and the replica tries again on another connection) is written once: every
/// try of it reaches Redis, and one `ended` event is logged, not one per try.
#[tokio::test]
async fn an_end_whose_answer_was_lost_is_logged_once() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.redis.command_timeout = Duration::from_millis(300);
    let app = TestApp::with(options, bot.clone()).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;

    redis.pause();
    ws.close(None).await.unwrap();
    // The first try and the next ones (250 and 500 ms later) time out, unanswered.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.resume();
    let ended = record_with_status(&app, TOKEN_AGENT, &sid, "ended").await;
    assert_eq!(ended["endReason"], "client_closed", "{ended}");
    // The tries still on their way (a pause of up to 2 s between them) reach Redis too.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let host = format!("{TOKEN_AGENT}.{ORG}");
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), 0, "the slot is free");
    let events = app.store.events(&host).await.unwrap();
    let ends: Vec<&str> = events
        .iter()
        .filter(|e| e.session_id.to_string() == sid && e.text.contains(" ended: "))
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(ends.len(), 1, "one end, one event: {ends:?}");
}

/// Calls of each command Redis has served so far, by name (`INFO commandstats`).
fn commands_served(admin: &mut redis::Connection) -> std::collections::HashMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(admin).unwrap();
    let calls = |line: &str| {
        let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
        Some((name.to_owned(), stats.split(',').next()?.parse().ok()?))
    };
    info.lines().filter_map(calls).collect()
}

/// Calls of `command` Redis has served so far.
fn command_calls(admin: &mut redis::Connection, command: &str) -> u64 {
    commands_served(admin).get(command).copied().unwrap_or(0)
}

/// The ends of an agent's sessions that close together reach Redis in a few requests, not one
/// each, and every session is still ended with its own reason, its slot freed, and its connect
/// and its end logged once each, in order.
#[tokio::test]
async fn ends_that_come_together_are_written_together() {
    const SESSIONS: usize = 12;
    let (app, redis) = TestApp::spawn(Store::Redis).await;
    let mut admin = redis.as_ref().unwrap().client();
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
        let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
        assert_echo(&mut ws, Message::text("hi")).await;
        sessions.push((ws, sid));
    }
    let host = format!("{TOKEN_AGENT}.{ORG}");
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), SESSIONS as u64);

    let before = command_calls(&mut admin, "evalsha");
    let closes = sessions
        .iter_mut()
        .map(|(ws, _)| ws.close(Some(CloseFrame { code: 1000.into(), reason: "bye".into() })));
    for closed in futures_util::future::join_all(closes).await {
        closed.unwrap();
    }
    for (_, sid) in &sessions {
        let ended = record_with_status(&app, TOKEN_AGENT, sid, "ended").await;
        assert_eq!(ended["endReason"], "client_closed", "{ended}");
    }
    let requests = command_calls(&mut admin, "evalsha") - before;
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), 0, "every slot is free");
    // One request would do; a slow machine may spread the closes over a few windows.
    assert!(requests <= SESSIONS as u64 / 3, "{requests} requests for {SESSIONS} ends");
    // Newest first: each session's connect, logged once its bot answered, then its end.
    let events = app.store.events(&host).await.unwrap();
    for (_, sid) in &sessions {
        let of_session: Vec<&str> = events
            .iter()
            .filter(|e| e.session_id.to_string() == *sid)
            .map(|e| e.text.as_str())
            .collect();
        let [ended, connected] = of_session[..] else { panic!("{sid}: {of_session:?}") };
        assert!(ended.starts_with(&format!("session {sid} ended: client_closed")), "{ended}");
        assert!(connected.starts_with(&format!("session {sid} connected on")), "{connected}");
    }
}

/// The connects a replica handles at the same moment reach Redis as one request
/// (`015_open_sessions.lua`), and each is decided in turn within it: the cap holds, and of two
/// consumes of one token the first wins.
#[tokio::test]
async fn opens_of_the_same_moment_go_in_one_request_each_decided_in_turn() {
    use session_broker::store::{
        Connected, Listing, MintRequest, Minted, OpenRequest, SessionRecord, SessionStore, Status,
        TokenUse,
    };
    let redis = RedisServer::start();
    let store = redis.store().await;
    let mut admin = redis.client();
    let (agent, minute) = ("a.o", Duration::from_secs(60));
    let active = SessionRecord { status: Some(Status::Active), ..SessionRecord::default() };
    fn open<'a>(
        agent: &'a str,
        sid: Uuid,
        token: Option<TokenUse<'a>>,
        active: &'a SessionRecord,
    ) -> OpenRequest<'a> {
        let minute = Duration::from_secs(60);
        OpenRequest {
            agent,
            sid,
            listing: token.is_none().then_some(Listing { agent, created_ms: 0, retention: minute }),
            token,
            cap: 2,
            lease: minute,
            active,
            record_ttl: minute,
        }
    }

    // Six sessions without a token, at a cap of two.
    let sids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let (requests, counts) =
        (command_calls(&mut admin, "evalsha"), command_calls(&mut admin, "zcount"));
    let opens: Vec<_> = sids.iter().map(|sid| open(agent, *sid, None, &active)).collect();
    let opened = futures_util::future::join_all(opens.iter().map(|o| store.open_session(o))).await;
    let opened: Vec<Connected> = opened.into_iter().map(Result::unwrap).collect();
    let ok = Connected::Ok { body: None };
    let full = Connected::AtCapacity;
    assert_eq!(opened, [ok.clone(), ok.clone(), full.clone(), full.clone(), full.clone(), full]);
    assert_eq!(command_calls(&mut admin, "evalsha") - requests, 1, "one request for six");
    assert_eq!(command_calls(&mut admin, "zcount") - counts, 1, "the slots counted once");
    assert_eq!(store.live_sessions(agent).await.unwrap(), 2);
    let listed = store.list_sessions(agent, 100).await.unwrap();
    assert_eq!(listed.len(), 2, "the refused are not listed: {listed:?}");

    // One token, two connects at once: the first consumes it, the second is a replay.
    let (agent, sid) = ("t.o", Uuid::new_v4());
    let pending = SessionRecord::pending(agent, 0, u64::MAX / 2, "r");
    let listing = Listing { agent, created_ms: 0, retention: minute };
    let mint = MintRequest {
        agent,
        sid,
        cap: 0,
        rates: &[],
        rate_window: minute,
        record: Some((&pending, minute, listing)),
    };
    let Minted::Ok { fence: Some(fence) } = store.mint_session(&mint).await.unwrap() else {
        panic!("not minted")
    };
    let token = |holder| TokenUse { fence: &fence, holder, mark_ttl: minute, want_body: false };
    let first = open(agent, sid, Some(token("first")), &active);
    let second = open(agent, sid, Some(token("second")), &active);
    let requests = command_calls(&mut admin, "evalsha");
    let (first, second) =
        futures_util::future::join(store.open_session(&first), store.open_session(&second)).await;
    assert_eq!(command_calls(&mut admin, "evalsha") - requests, 1);
    assert_eq!(first.unwrap(), Connected::Ok { body: None });
    assert_eq!(second.unwrap(), Connected::Replayed);
}

/// The `/start` calls a replica handles at the same moment reach Redis as one request
/// (`016_mint_sessions.lua`), each counted against the rate limit in turn, with one fence check
/// for all.
#[tokio::test]
async fn mints_of_the_same_moment_go_in_one_request_each_counted_in_turn() {
    use session_broker::store::{
        Listing, MintRequest, Minted, RateCount, SessionRecord, SessionStore,
    };
    let redis = RedisServer::start();
    let store = redis.store().await;
    let mut admin = redis.client();
    let (agent, minute) = ("a.o", Duration::from_secs(60));
    let pending = SessionRecord::pending(agent, 0, u64::MAX / 2, "r");
    let rates = [RateCount { bucket: "address".into(), limit: 4 }];
    let sids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
    let mints: Vec<_> = sids
        .iter()
        .map(|sid| MintRequest {
            agent,
            sid: *sid,
            cap: 5,
            rates: &rates,
            rate_window: minute,
            record: Some((&pending, minute, Listing { agent, created_ms: 0, retention: minute })),
        })
        .collect();
    let before = commands_served(&mut admin);
    let minted = futures_util::future::join_all(mints.iter().map(|m| store.mint_session(m))).await;
    let after = commands_served(&mut admin);
    let served = |command: &str| after[command] - before.get(command).copied().unwrap_or(0);
    // INFO: the script's fence check, and the first INFO commandstats above.
    assert_eq!([served("evalsha"), served("info") - 1], [1, 1], "one request, one fence check");
    let minted: Vec<Minted> = minted.into_iter().map(Result::unwrap).collect();
    let fences: Vec<&Option<String>> = minted
        .iter()
        .filter_map(|m| match m {
            Minted::Ok { fence } => Some(fence),
            _ => None,
        })
        .collect();
    assert_eq!(fences.len(), 4, "{minted:?}");
    assert!(fences.iter().all(|f| f.is_some() && *f == fences[0]), "one fence: {minted:?}");
    assert_eq!(minted[4..], [Minted::RateLimited, Minted::RateLimited, Minted::RateLimited]);
    let listed = store.list_sessions(agent, 100).await.unwrap();
    assert_eq!(listed.len(), 4, "the refused left no record: {listed:?}");
}

/// Connects that all wait on a Redis that stands still are let in within the cap when it
/// answers: of six connects to an agent capped at two, two are let in and four refused with the
/// agent's 429, their tokens still unused.
#[tokio::test]
async fn connects_waiting_together_on_redis_are_let_in_within_the_cap() {
    const CONNECTS: usize = 6;
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    // Redis stands still for a second below: long enough for every connect to be waiting.
    options.settings.redis.command_timeout = Duration::from_secs(5);
    let app = TestApp::with(options, bot.clone()).await;
    let mut tokens = Vec::new();
    for _ in 0..CONNECTS {
        tokens.push(app.start_session(CAPPED_AGENT).await);
    }

    redis.pause();
    let connects = tokens.iter().map(|(token, ws_url, _)| {
        let (token, ws_url) = (token.clone(), ws_url.clone());
        tokio::spawn(async move { connect(&ws_url, Some((&token, Via::Path))).await })
    });
    let connects: Vec<_> = connects.collect();
    // Every connect's request waits in Redis's socket.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    redis.resume();
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for (connected, session) in
        futures_util::future::join_all(connects).await.into_iter().zip(&tokens)
    {
        match connected.unwrap() {
            Ok(ws) => admitted.push(ws),
            Err((status, body, _)) => {
                assert_eq!(status, 429, "{body}");
                assert_eq!(body["reason"], "agent_at_capacity", "{body}");
                refused.push(session.clone());
            }
        }
    }
    assert_eq!(admitted.len(), CAP as usize, "the cap holds");
    assert_eq!(refused.len(), CONNECTS - CAP as usize);
    for ws in &mut admitted {
        assert_echo(ws, Message::text("let in")).await;
    }
    let host = format!("{CAPPED_AGENT}.{ORG}");
    assert_eq!(app.store.live_sessions(&host).await.unwrap(), CAP as u64);

    // A slot freed, a refused token is let in: refusing it wrote nothing of it.
    let mut first = admitted.remove(0);
    first.close(None).await.unwrap();
    let (token, ws_url, sid) = &refused[0];
    let mut ws = loop {
        match connect(ws_url, Some((token, Via::Path))).await {
            Ok(ws) => break ws,
            Err((429, ..)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(other) => panic!("the refused token is still usable: {other:?}"),
        }
    };
    assert_echo(&mut ws, Message::text("after a slot was freed")).await;
    assert_eq!(record(&app, CAPPED_AGENT, sid).await["status"], "active");
}

/// `/start` calls that all wait on a Redis that stands still are counted against the rate
/// limit one by one when it answers: of seven calls from one address allowed four, four get a
/// token that connects and three the limit's 429.
#[tokio::test]
async fn starts_waiting_together_on_redis_are_minted_within_the_rate() {
    const CALLS: usize = 7;
    const RATE: usize = 4;
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.redis.command_timeout = Duration::from_secs(5);
    options.settings.limits.start_rate_per_address = RATE as u64;
    let app = TestApp::with(options, bot.clone()).await;
    redis.pause();
    let calls = futures_util::future::join_all(
        (0..CALLS).map(|_| app.post_start(TOKEN_AGENT, Some(KEY), "{}")),
    );
    let resume = async {
        // Every call's request waits in Redis's socket.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        redis.resume();
    };
    let (answers, ()) = futures_util::future::join(calls, resume).await;
    let mut tokens = Vec::new();
    for answer in answers {
        let status = answer.status();
        let body: Value = answer.json().await.unwrap();
        match status.as_u16() {
            200 => tokens.push(body),
            429 => assert_eq!(body["code"], "429", "{body}"),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(tokens.len(), RATE, "the rate holds");
    for minted in &tokens {
        let (token, ws_url) =
            (minted["token"].as_str().unwrap(), minted["wsUrl"].as_str().unwrap());
        let mut ws = connect(ws_url, Some((token, Via::Path))).await.unwrap();
        assert_echo(&mut ws, Message::text("minted together")).await;
    }
}

#[tokio::test]
async fn a_killed_replica_loses_its_sessions_and_frees_their_slots() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.key_prefix = "shared".into();
    options.settings.sessions.lease_ttl = Duration::from_millis(300);
    options.settings.sessions.sweep_interval = Duration::from_millis(100);
    let survivor = TestApp::with(options, bot.clone()).await;
    let lease =
        [("BROKER__SESSIONS__LEASE_TTL_MS", "300"), ("BROKER__SESSIONS__SWEEP_INTERVAL_MS", "100")];
    let doomed = BrokerProcess::spawn(&redis.url(), "shared", &survivor, &lease).await;

    let mut sessions = Vec::new();
    for _ in 0..CAP {
        let (token, _, sid) = survivor.start_session(CAPPED_AGENT).await;
        let mut ws =
            connect(&doomed.ws_url(CAPPED_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
        assert_echo(&mut ws, Message::text("on the doomed replica")).await;
        sessions.push((sid, ws));
    }
    assert_eq!(survivor.post_start(CAPPED_AGENT, Some(KEY), "{}").await.status(), 429);

    doomed.kill();
    for (sid, _) in &sessions {
        let lost = record_with_status(&survivor, CAPPED_AGENT, sid, "ended").await;
        assert_eq!(lost["endReason"], "replica_lost", "{lost}");
    }
    let (token, ws_url, _) = survivor.start_session(CAPPED_AGENT).await;
    let mut ws =
        connect(&ws_url, Some((&token, Via::Path))).await.expect("the slots are free again");
    assert_echo(&mut ws, Message::text("after the loss")).await;
}

#[tokio::test]
async fn a_live_replica_keeps_its_sessions_past_many_leases() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.sessions.lease_ttl = Duration::from_millis(600);
    options.settings.sessions.sweep_interval = Duration::from_millis(50);
    let app = TestApp::with(options, bot).await;
    let (token, ws_url, sid) = app.start_session(CAPPED_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    // Time passing is what this tests: 2.5 s is four lease lifetimes, each of which would have
    // lapsed and been swept had the replica not renewed it.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_echo(&mut ws, Message::text("still here")).await;
    }
    assert_eq!(record(&app, CAPPED_AGENT, &sid).await["status"], "active");
}
