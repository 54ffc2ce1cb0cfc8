//! Several replicas sharing one Redis: a token minted by any is accepted once, by any.

use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn a_token_minted_by_one_replica_is_used_once_across_both() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let [a, b]: [TestApp; 2] = replicas(&redis.url(), &bot, 2).await.try_into().ok().unwrap();

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
    let apps = replicas(&redis.url(), &bot, 2).await;
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

/// The documented rotation, run replica by replica as a rolling restart would: add the new key
/// everywhere, switch signing to it, retire the old one once its tokens have expired. No token is
/// refused at any point of the switch.
#[tokio::test]
async fn signing_keys_rotate_across_replicas_without_refusing_a_token() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    const OLD: (&str, &str) = ("2026-10", "the-old-signing-key-0123456789abcdefgh");
    const NEW: (&str, &str) = ("2026-11", "the-new-signing-key-0123456789abcdefgh");
    let replica = |keys: &[(&str, &str)], signing: &str| {
        let mut o = AppOptions::new(Some(redis.url()), &bot);
        o.key_prefix = "rotation".into();
        o.settings.token.signing_key_id = signing.into();
        o.settings.token.keys =
            keys.iter().map(|(id, k)| (id.to_string(), secrecy::SecretString::from(*k))).collect();
        TestApp::with(o, bot.clone())
    };
    let accepted = async |app: &TestApp, token: &str| {
        let mut ws = connect(&app.ws_url(TOKEN_AGENT, ORG), Some((token, Via::Path)))
            .await
            .unwrap_or_else(|e| panic!("token refused during the rotation: {e:?}"));
        assert_echo(&mut ws, Message::text("rotating")).await;
    };

    // Before: both replicas sign and verify with the old key.
    let a = replica(&[OLD], OLD.0).await;
    let b = replica(&[OLD], OLD.0).await;
    let before = a.start_session(TOKEN_AGENT).await.0;

    // 1. Add the new key for verification, one replica at a time; signing stays on the old one.
    drop(b);
    let b = replica(&[OLD, NEW], OLD.0).await;
    let during_add = a.start_session(TOKEN_AGENT).await.0;
    drop(a);
    let a = replica(&[OLD, NEW], OLD.0).await;

    // 2. Switch signing to the new key, one replica at a time: while they differ, each accepts
    //    the other's tokens.
    drop(a);
    let a = replica(&[OLD, NEW], NEW.0).await;
    let signed_new = a.start_session(TOKEN_AGENT).await.0;
    let signed_old = b.start_session(TOKEN_AGENT).await.0;
    accepted(&b, &signed_new).await;
    accepted(&a, &signed_old).await;
    accepted(&b, &before).await;
    drop(b);
    let b = replica(&[OLD, NEW], NEW.0).await;
    accepted(&b, &during_add).await;

    // 3. Once every old-key token has expired (token.lifetime_secs), retire the old key.
    let last_before_retirement = a.start_session(TOKEN_AGENT).await.0; // signed with the new key
    drop((a, b));
    let a = replica(&[NEW], NEW.0).await;
    let b = replica(&[NEW], NEW.0).await;
    let after = a.start_session(TOKEN_AGENT).await.0;
    accepted(&b, &after).await;
    accepted(&a, &last_before_retirement).await; // minted before the retirement, by the new key
    // An old-key token that outlived the procedure is refused, as it would have expired.
    let stale = session_broker::token::SigningKeys::new(
        OLD.0,
        &std::collections::BTreeMap::from([(
            OLD.0.to_string(),
            secrecy::SecretString::from(OLD.1),
        )]),
    )
    .unwrap()
    .mint(
        &format!("{TOKEN_AGENT}.{ORG}"),
        uuid::Uuid::new_v4(),
        "local",
        session_broker::store::unix_ms() + 60_000,
        None,
        "",
    );
    match connect(&b.ws_url(TOKEN_AGENT, ORG), Some((&stale, Via::Path))).await {
        Err((403, body, _)) => assert_eq!(body["reason"], "token_bad_signature"),
        other => panic!("a retired key's token was accepted: {:?}", other.map(|_| "upgrade")),
    }
}
