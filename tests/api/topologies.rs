//! The broker on Redis Sentinel and Redis Cluster, and its behaviour when Redis fails.

use std::time::Duration;

use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// An app on the given Sentinel group or cluster, sharing `prefix` with its siblings.
async fn app_on(
    bot: &TestBot,
    prefix: &str,
    tune: impl FnOnce(&mut session_broker::config::Settings),
) -> TestApp {
    let mut options = AppOptions::new(None, bot);
    options.key_prefix = prefix.into();
    tune(&mut options.settings);
    TestApp::with(options, bot.clone()).await
}

fn on_sentinels(group: &SentinelGroup) -> impl FnOnce(&mut session_broker::config::Settings) + '_ {
    move |s| {
        s.redis.sentinels = group.sentinel_urls();
        s.redis.master_name = Some(MASTER_NAME.into());
    }
}

async fn mint(app: &TestApp, count: usize) -> Vec<String> {
    let mut tokens = Vec::with_capacity(count);
    for _ in 0..count {
        tokens.push(app.start_session(TOKEN_AGENT).await.0);
    }
    tokens
}

#[tokio::test]
async fn the_broker_follows_a_sentinel_failover() {
    let mut group = SentinelGroup::start();
    let bot = TestBot::start().await;
    let app = app_on(&bot, "sentinel", on_sentinels(&group)).await;
    let (first, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&first, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("before the failover")).await;
    let unused = app.start_session(TOKEN_AGENT).await.0;

    group.kill_master();
    group.await_failover();
    // The broker finds the new master by itself; until then it answers 503, never a wrong 200.
    let (token, ws_url, _) = eventually(Duration::from_secs(20), || async {
        let resp = app.post_start(TOKEN_AGENT, Some(KEY), "{}").await;
        match resp.status().as_u16() {
            200 => {
                let body: serde_json::Value = resp.json().await.unwrap();
                Some((body["token"].as_str()?.to_owned(), body["wsUrl"].as_str()?.to_owned(), ()))
            }
            503 => None,
            other => panic!("unexpected status {other} during failover"),
        }
    })
    .await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("after the failover")).await;
    match connect(&ws_url, Some((&token, Via::Path))).await {
        Err((403, body, _)) => assert_eq!(body["reason"], "token_already_used"),
        other => panic!("replay after failover: {:?}", other.map(|_| "upgrade")),
    }
    // The promoted replica may have missed consumes made just before the failover, so tokens
    // minted before it are refused, used or not, without WAIT.
    assert_all_fenced(&[&app], TOKEN_AGENT, &[first, unused]).await;
}

#[tokio::test]
async fn racing_replicas_after_a_failover_with_durable_consumes() {
    let mut group = SentinelGroup::start();
    let bot = TestBot::start().await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(
            app_on(&bot, "durable", |s| {
                on_sentinels(&group)(s);
                s.redis.wait_replicas = 1;
                // Generous: on a loaded test machine the replica may answer late, and a late
                // answer is a (correct) refusal, not what this test is about.
                s.redis.wait_timeout = Duration::from_millis(1_500);
                s.redis.command_timeout = Duration::from_millis(3_000);
            })
            .await,
        );
    }
    let refs: Vec<&TestApp> = apps.iter().collect();
    // With its replica acknowledging, the master accepts durable consumes.
    let tokens = mint(&apps[0], 50).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &tokens).await, (50, 100));

    // Tokens minted before the failover, half of them used.
    let tokens = mint(&apps[1], 100).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &tokens[..50]).await, (50, 100));
    let old_master = group.kill_master();
    group.await_failover();
    // Once the broker reaches the new master, every token minted before the failover is
    // refused (fenced), used or not: the fence does not depend on WAIT.
    let ws_url = apps[2].ws_url(TOKEN_AGENT, ORG);
    eventually(Duration::from_secs(20), || async {
        match connect(&ws_url, Some((&tokens[99], Via::Path))).await {
            Err((403, body, _)) if body["reason"] == "token_predates_store_reset" => Some(()),
            Err((403, body, _)) => panic!("refused otherwise: {body}"),
            Ok(_) => panic!("a token minted before the failover was accepted"),
            Err(_) => None,
        }
    })
    .await;

    // The new master has no replica yet: durable consumes cannot be acknowledged, so connects
    // with new tokens are refused with 503 and the tokens stay unused.
    let fresh = mint(&apps[0], 50).await;
    match connect(&ws_url, Some((&fresh[0], Via::Path))).await {
        Err((503, _, retry)) => assert!(retry.is_some(), "503 carries Retry-After"),
        other => panic!("without a replica's acknowledgement: {:?}", other.map(|_| "upgrade")),
    }

    // The old master comes back as the new master's replica: every new token works exactly
    // once, durably, across the three replicas.
    group.rejoin_old_master(old_master);
    assert_all_fenced(&refs, TOKEN_AGENT, &tokens).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &fresh).await, (50, 100));
}

#[tokio::test]
async fn the_broker_runs_on_a_cluster() {
    let cluster = Cluster::start();
    let bot = TestBot::start().await;
    let on_cluster =
        |s: &mut session_broker::config::Settings| s.redis.cluster_nodes = cluster.urls();
    let apps = [
        app_on(&bot, "cluster", on_cluster).await,
        app_on(&bot, "cluster", on_cluster).await,
        app_on(&bot, "cluster", on_cluster).await,
    ];

    // The whole lifecycle: every key a script or a MULTI touches shares a hash tag, or the
    // cluster would answer CROSSSLOT.
    let (token, _, sid) = apps[0].start_session(CAPPED_AGENT).await;
    let mut ws =
        connect(&apps[1].ws_url(CAPPED_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("on a cluster")).await;
    let active = eventually(Duration::from_secs(5), || async {
        let (_, body) = apps[2].session(Method::GET, CAPPED_AGENT, &sid).await;
        (body["status"] == "active").then_some(body)
    })
    .await;
    assert_eq!(active["service"], format!("{CAPPED_AGENT}.{ORG}"));
    // DELETE on one replica reaches the holder through cluster pub/sub.
    let (status, _) = apps[2].session(Method::DELETE, CAPPED_AGENT, &sid).await;
    assert_eq!(status, 200);
    match next_data(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected close 4000, got {other:?}"),
    }

    let refs: Vec<&TestApp> = apps.iter().collect();
    let tokens = mint(&apps[0], 200).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &tokens).await, (200, 400));
}

#[tokio::test]
async fn redis_stopped_mid_run_gives_503s_then_recovers() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let apps = replicas(&redis.url(), &bot, 3).await;
    let refs: Vec<&TestApp> = apps.iter().collect();
    let before = mint(&apps[0], 60).await;
    let (early, late) = before.split_at(30);
    assert_eq!(race(&refs, TOKEN_AGENT, early).await, (30, 60));

    let port = redis.stop();
    let attempts = late.iter().flat_map(|token| {
        refs.iter().map(move |app| {
            let (url, token) = (app.ws_url(TOKEN_AGENT, ORG), token.clone());
            tokio::spawn(async move { connect(&url, Some((&token, Via::Header))).await.map(drop) })
        })
    });
    let mut refused = 0;
    for attempt in futures_util::future::join_all(attempts.collect::<Vec<_>>()).await {
        match attempt.unwrap() {
            Err((503, _, retry_after)) => {
                assert!(retry_after.is_some());
                refused += 1;
            }
            other => panic!("with Redis down: {other:?}"),
        }
    }
    assert_eq!(refused, 90, "every connect refused, none accepted unchecked");
    assert_eq!(bot.connections(), 30);

    // Redis is back, empty (a restart without persistence), and the marks of the early tokens'
    // consumes are gone with its data. Nothing tells those from the late, unused ones: every
    // token minted before the loss is refused, and the client calls /start again.
    let _redis = RedisServer::start_on(port);
    eventually(Duration::from_secs(10), || async {
        (apps[0].post_start(TOKEN_AGENT, Some(KEY), "{}").await.status() == 200).then_some(())
    })
    .await;
    assert_all_fenced(&refs, TOKEN_AGENT, &before).await;
    assert_eq!(bot.connections(), 30, "no replay reached the bot");
    let after = mint(&apps[1], 30).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &after).await, (30, 60));
}

#[tokio::test]
async fn fail_open_accepts_unchecked_and_says_so() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.redis.on_unavailable = session_broker::config::FailMode::Open;
    let app = TestApp::with(options, bot.clone()).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    redis.stop();
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.expect("accepted unchecked");
    assert_echo(&mut ws, Message::text("unchecked")).await;
    // Forged and expired tokens are still refused: only the one-time check is skipped.
    let forged = format!("{}x", token);
    assert!(matches!(connect(&ws_url, Some((&forged, Via::Path))).await, Err((403, _, _))));
}

/// The node of a Redis Cluster that holds `key`: every other node answers MOVED.
fn node_holding(cluster: &Cluster, key: &str) -> String {
    cluster
        .urls()
        .into_iter()
        .find(|url| {
            let mut conn = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
            redis::cmd("EXISTS").arg(key).query::<i64>(&mut conn).is_ok()
        })
        .expect("one node holds every key")
}

#[tokio::test]
async fn a_flushed_store_refuses_every_token_minted_before() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let apps = replicas(&redis.url(), &bot, 2).await;
    let refs: Vec<&TestApp> = apps.iter().collect();
    let before = mint(&apps[0], 20).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &before[..10]).await, (10, 10));
    // The same server (same run id) loses every key: an operator's FLUSHALL, say.
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.client()).unwrap();
    assert_all_fenced(&refs, TOKEN_AGENT, &before).await;
    assert_eq!(bot.connections(), 10, "no replay reached the bot");
    let after = mint(&apps[1], 10).await;
    assert_eq!(race(&refs, TOKEN_AGENT, &after).await, (10, 10));
}

#[tokio::test]
async fn a_cluster_node_that_loses_its_data_fences_only_the_tokens_it_held() {
    let cluster = Cluster::start();
    let bot = TestBot::start().await;
    let on_cluster =
        |s: &mut session_broker::config::Settings| s.redis.cluster_nodes = cluster.urls();
    let app = app_on(&bot, "loss", on_cluster).await;
    let tokens = mint(&app, 10).await;
    let holder = node_holding(&cluster, &format!("loss:agent:{{{TOKEN_AGENT}.{ORG}}}:fence"));
    let flush = |url: &str| {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
    };

    // Another node loses its data: these tokens, their records and marks are not on it.
    let other = cluster.urls().into_iter().find(|url| *url != holder).unwrap();
    flush(&other);
    assert_eq!(race(&[&app], TOKEN_AGENT, &tokens[..5]).await, (5, 0));

    // The node holding them loses its data (restarted without persistence, say): every token
    // minted before is refused, used or not; new ones work.
    flush(&holder);
    assert_all_fenced(&[&app], TOKEN_AGENT, &tokens).await;
    assert_eq!(bot.connections(), 5, "no replay reached the bot");
    let fresh = mint(&app, 5).await;
    assert_eq!(race(&[&app], TOKEN_AGENT, &fresh).await, (5, 0));
}

#[tokio::test]
async fn live_sessions_outlive_redis_losing_its_data() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = |redis: &RedisServer| {
        let mut options = AppOptions::new(Some(redis.url()), &bot);
        options.key_prefix = "loss".into();
        // Renewed every 200 ms: the renewals after the loss are what this tests.
        options.settings.sessions.lease_ttl = Duration::from_millis(600);
        TestApp::with(options, bot.clone())
    };
    // Two replicas: the first to renew after the loss makes the fence anew, and the other must
    // still tell that the data was lost.
    let apps = [app(&redis).await, app(&redis).await];
    let (token, ws_url, _) = apps[0].start_session(TOKEN_AGENT).await;
    let mut sessions = vec![connect(&ws_url, Some((&token, Via::Path))).await.unwrap()];
    for app in &apps {
        for agent in [OPEN_AGENT, OPEN_AGENT] {
            sessions.push(connect(&app.ws_url(agent, ORG), None).await.unwrap());
        }
    }

    let port = redis.stop();
    let restarted = RedisServer::start_on(port);
    // Time passing is what this tests: renewals find every lease gone with the data; the
    // sessions are not ended for it, and their slots are taken again.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for ws in &mut sessions {
            assert_echo(ws, Message::text("still relayed")).await;
        }
    }
    let live = |agent: &str| {
        redis::cmd("ZCARD")
            .arg(format!("loss:agent:{{{agent}.{ORG}}}:live"))
            .query::<u64>(&mut restarted.client())
            .unwrap()
    };
    assert_eq!((live(TOKEN_AGENT), live(OPEN_AGENT)), (1, 4), "every slot is counted again");
    // The replayed token is still refused: the loss fenced it.
    assert_all_fenced(&[&apps[1]], TOKEN_AGENT, &[token]).await;
}
