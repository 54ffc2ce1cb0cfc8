//! Replicas in several regions sharing one Redis: where `/start` sends clients, which bot a
//! connect reaches, and one-time use across all of them.

use std::collections::BTreeMap;

use serde_json::Value;
use session_broker::config::RegionSettings;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const WEST: &str = "us-west";
const EAST: &str = "eu-central";
/// Served in both regions, each with its own bot.
const GLOBAL_AGENT: &str = "global";
/// Served in its primary region only.
const WEST_AGENT: &str = "west-only";

struct Regions {
    west: Vec<TestApp>,
    east: TestApp,
    west_bot: TestBot,
    east_bot: TestBot,
    _redis: RedisServer,
}

/// Two replicas in us-west, one in eu-central; their listeners bound first so that every replica
/// knows every region's public URL.
async fn regions() -> Regions {
    let redis = RedisServer::start();
    let (west_bot, east_bot) = (TestBot::start().await, TestBot::start().await);
    let listeners: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
    let public = BTreeMap::from([
        (WEST.to_owned(), RegionSettings { public_ws_url: format!("ws://127.0.0.1:{}", ports[0]) }),
        (EAST.to_owned(), RegionSettings { public_ws_url: format!("ws://127.0.0.1:{}", ports[2]) }),
    ]);
    let agents = vec![
        (
            GLOBAL_AGENT.to_owned(),
            format!(
                "agent_name = \"{GLOBAL_AGENT}\"\nwebsocket_auth = \"token\"\nregion = \"{WEST}\"\n\
                 [broker]\norg = \"{ORG}\"\nbot_url = \"{}\"\n[broker.bot_urls]\n{EAST} = \"{}\"\n",
                west_bot.url(),
                east_bot.url()
            ),
        ),
        (
            WEST_AGENT.to_owned(),
            format!(
                "agent_name = \"{WEST_AGENT}\"\nwebsocket_auth = \"token\"\nregion = \"{WEST}\"\n\
                 [broker]\norg = \"{ORG}\"\nbot_url = \"{}\"\n",
                west_bot.url()
            ),
        ),
    ];
    let mut apps = Vec::new();
    for (listener, region) in listeners.into_iter().zip([WEST, WEST, EAST]) {
        let mut options = AppOptions::new(Some(redis.url()), &west_bot);
        options.key_prefix = "regions".into();
        options.listener = Some(listener);
        options.settings.region = region.into();
        options.settings.regions = public.clone();
        options.extra_agents = agents.clone();
        apps.push(TestApp::with(options, west_bot.clone()).await);
    }
    let east = apps.pop().unwrap();
    Regions { west: apps, east, west_bot, east_bot, _redis: redis }
}

async fn ws_url_from(app: &TestApp, agent: &str) -> String {
    let resp = app.post_start(agent, Some(KEY), "{}").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["wsUrl"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn start_answers_the_serving_region_or_the_primary() {
    let r = regions().await;
    let (west, east) = (&r.west[0], &r.east);
    assert_eq!(ws_url_from(east, GLOBAL_AGENT).await, east.ws_url(GLOBAL_AGENT, ORG));
    assert_eq!(ws_url_from(&r.west[1], GLOBAL_AGENT).await, west.ws_url(GLOBAL_AGENT, ORG));
    // Not served in eu-central: the client is sent to the primary region.
    assert_eq!(ws_url_from(east, WEST_AGENT).await, west.ws_url(WEST_AGENT, ORG));
}

#[tokio::test]
async fn a_token_minted_in_one_region_is_used_once_in_another_and_reaches_its_bot() {
    let r = regions().await;
    let (token, _, sid) = r.west[0].start_session(GLOBAL_AGENT).await;
    let mut ws =
        connect(&r.east.ws_url(GLOBAL_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("west token, east bot")).await;
    assert_eq!((r.east_bot.connections(), r.west_bot.connections()), (1, 0));
    let handshake = r.east_bot.handshakes.lock().unwrap()[0].clone();
    assert_eq!(handshake.headers["x-pipecat-region"], WEST, "the minting region");
    assert_eq!(handshake.headers["x-pipecat-session-id"], sid);
    for app in [&r.west[0], &r.west[1], &r.east] {
        match connect(&app.ws_url(GLOBAL_AGENT, ORG), Some((&token, Via::Query))).await {
            Err((403, body, _)) => assert_eq!(body["reason"], "token_already_used"),
            other => panic!("replay accepted: {:?}", other.map(|_| "upgrade")),
        }
    }
    // A west-only agent's session connected through eu-central still reaches the west bot.
    let (token, _, _) = r.east.start_session(WEST_AGENT).await;
    let mut ws = connect(&r.east.ws_url(WEST_AGENT, ORG), Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("cross-region dial")).await;
    assert_eq!(r.west_bot.connections(), 1);
}

#[tokio::test]
async fn two_hundred_tokens_raced_across_three_replicas_in_two_regions() {
    let r = regions().await;
    let mut tokens = Vec::new();
    for i in 0..200 {
        let minter = [&r.west[0], &r.west[1], &r.east][i % 3];
        tokens.push(minter.start_session(GLOBAL_AGENT).await.0);
    }
    let apps = [&r.west[0], &r.west[1], &r.east];
    assert_eq!(race(&apps, GLOBAL_AGENT, &tokens).await, (200, 400));
    assert_eq!(r.west_bot.connections() + r.east_bot.connections(), 200);
}
