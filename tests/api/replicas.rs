//! Several replicas sharing one Redis: a token minted by any is accepted once, by any.

use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test]
async fn a_token_minted_by_one_replica_is_used_once_across_both() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let options = |bot: &TestBot| {
        let mut o = AppOptions::new(Some(redis.url()), bot);
        o.key_prefix = "shared".into();
        o
    };
    let a = TestApp::with(options(&bot), bot.clone()).await;
    let b = TestApp::with(options(&bot), bot.clone()).await;

    let (token, _, _) = a.start_session(TOKEN_AGENT).await;
    let on_b = b.ws_url(TOKEN_AGENT, ORG);
    let on_a = a.ws_url(TOKEN_AGENT, ORG);
    let mut ws = connect(&on_b, Some((&token, Via::Path))).await.expect("B accepts A's token");
    assert_echo(&mut ws, Message::text("minted on A, used on B")).await;
    for url in [&on_a, &on_b] {
        match connect(url, Some((&token, Via::Query))).await {
            Err((403, body, _)) => assert_eq!(body["reason"], "token_already_used"),
            other => panic!("replay on {url} was not refused: {:?}", other.map(|_| "upgrade")),
        }
    }
    assert_eq!(bot.connections(), 1);
}

#[tokio::test]
async fn replicas_race_for_one_token_and_exactly_one_wins() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let mut o = AppOptions::new(Some(redis.url()), &bot);
        o.key_prefix = "shared".into();
        apps.push(TestApp::with(o, bot.clone()).await);
    }
    for round in 0..20 {
        let (token, _, _) = apps[round % 2].start_session(TOKEN_AGENT).await;
        let attempts = apps.iter().flat_map(|app| {
            let url = app.ws_url(TOKEN_AGENT, ORG);
            let token = token.clone();
            (0..3).map(move |_| {
                let (url, token) = (url.clone(), token.clone());
                tokio::spawn(
                    async move { connect(&url, Some((&token, Via::Header))).await.is_ok() },
                )
            })
        });
        let wins = futures_util::future::join_all(attempts.collect::<Vec<_>>())
            .await
            .into_iter()
            .filter(|won| *won.as_ref().unwrap())
            .count();
        assert_eq!(wins, 1, "round {round}");
    }
    assert_eq!(bot.connections(), 20);
}

#[tokio::test]
async fn replicas_without_the_signing_key_refuse_its_tokens() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let a = TestApp::with(AppOptions::new(Some(redis.url()), &bot), bot.clone()).await;
    let mut other = AppOptions::new(Some(redis.url()), &bot);
    other.settings.token.keys = std::collections::BTreeMap::from([(
        "k1".into(),
        secrecy::SecretString::from("another-deployments-key-0123456789abcdef"),
    )]);
    let b = TestApp::with(other, bot.clone()).await;
    let (token, _, _) = a.start_session(TOKEN_AGENT).await;
    match connect(&b.ws_url(TOKEN_AGENT, ORG), Some((&token, Via::Path))).await {
        Err((403, body, _)) => assert_eq!(body["reason"], "token_bad_signature"),
        other => panic!("expected 403, got {:?}", other.map(|_| "upgrade")),
    }
}
