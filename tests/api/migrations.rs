//! The versioned Lua in `migrations-lua/`: recorded in Redis, refused when Redis holds a newer
//! incompatible version, and still working after Redis forgets its scripts.

use std::{collections::HashMap, time::Duration};

use redis::Commands;
use session_broker::store::redis::{COMPATIBLE_FROM, SCHEMA_VERSION};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn options(redis: &RedisServer, bot: &TestBot) -> AppOptions {
    let mut options = AppOptions::new(Some(redis.url()), bot);
    options.key_prefix = "schema".into();
    options
}

#[tokio::test]
async fn the_broker_records_its_schema_version() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let _app = TestApp::with(options(&redis, &bot), bot.clone()).await;
    let stored: HashMap<String, u32> = redis.client().hgetall("schema:schema").unwrap();
    assert_eq!(stored["version"], SCHEMA_VERSION);
    assert_eq!(stored["compatible_from"], COMPATIBLE_FROM);
}

#[tokio::test]
async fn a_newer_incompatible_schema_stops_the_broker_with_a_clear_message() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let newer = SCHEMA_VERSION + 3;
    let _: () = redis
        .client()
        .hset_multiple("schema:schema", &[("version", newer), ("compatible_from", newer - 1)])
        .unwrap();
    let error = match TestApp::try_with(options(&redis, &bot), bot.clone()).await {
        Ok(_) => panic!("the broker started on data it cannot read"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains(&format!("schema version {newer}")), "{error}");
    assert!(error.contains("Upgrade this broker"), "{error}");

    // Newer but declared compatible with this version: the broker runs, and leaves the marker.
    let _: () = redis.client().hset("schema:schema", "compatible_from", SCHEMA_VERSION).unwrap();
    let app = TestApp::with(options(&redis, &bot), bot.clone()).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    assert!(connect(&ws_url, Some((&token, Via::Path))).await.is_ok());
    let version: u32 = redis.client().hget("schema:schema", "version").unwrap();
    assert_eq!(version, newer);
}

#[tokio::test]
async fn scripts_survive_redis_forgetting_them() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = TestApp::with(options(&redis, &bot), bot.clone()).await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut redis.client()).unwrap();
    // Every script runs again: slot, record transitions, release, lease renewal.
    let (token, ws_url, sid) = app.start_session(CAPPED_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("after SCRIPT FLUSH")).await;
    // Marked active beside the relay, not before the upgrade.
    eventually(Duration::from_secs(5), || async {
        let (_, record) = app.session(reqwest::Method::GET, CAPPED_AGENT, &sid).await;
        (record["status"] == "active").then_some(())
    })
    .await;
}
