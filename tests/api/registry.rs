//! The shared registry: agents deployed and keys created or revoked through the CLI reach every
//! replica without a restart.

use std::time::Duration;

use secrecy::SecretString;
use session_broker::{
    admin,
    agents::BotDefaults,
    config::RedisSettings,
    store::{CredentialKind, redis::RedisStore},
};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The key prefix the replicas share (see `support::replicas`).
const PREFIX: &str = "shared";
/// Default refresh (1 s) plus margin: a change must reach every replica in this.
const WITHIN: Duration = Duration::from_secs(3);

fn store(redis: &RedisServer) -> RedisStore {
    let settings = RedisSettings {
        url: Some(SecretString::from(redis.url())),
        key_prefix: PREFIX.into(),
        ..RedisSettings::default()
    };
    RedisStore::new(&settings).unwrap()
}

async fn status_of_start(app: &TestApp, agent: &str, key: &str) -> u16 {
    app.post_start(agent, Some(key), "{}").await.status().as_u16()
}

#[tokio::test]
async fn keys_created_and_revoked_reach_every_replica() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let apps = replicas(&redis.url(), &bot, 2).await;
    let store = store(&redis);

    let (key, record) =
        admin::create_credential(&store, CredentialKind::ApiKey, ORG, None).await.unwrap();
    assert!(key.starts_with("pk_") && !record.hash.contains(&key));
    for app in &apps {
        eventually(WITHIN, || async {
            (status_of_start(app, TOKEN_AGENT, &key).await == 200).then_some(())
        })
        .await;
    }
    let listed = admin::list_credentials(&store, CredentialKind::ApiKey, ORG).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, record.id);

    admin::revoke_credential(&store, CredentialKind::ApiKey, ORG, &record.id)
        .await
        .unwrap()
        .unwrap();
    for app in &apps {
        eventually(WITHIN, || async {
            (status_of_start(app, TOKEN_AGENT, &key).await == 401).then_some(())
        })
        .await;
    }
    assert!(
        admin::list_credentials(&store, CredentialKind::ApiKey, ORG).await.unwrap()[0]
            .revoked_ms
            .is_some()
    );
    // Keys from the settings are untouched.
    assert_eq!(status_of_start(&apps[0], TOKEN_AGENT, KEY).await, 200);
}

#[tokio::test]
async fn a_deployed_agent_reaches_every_replica_and_a_redeploy_updates_it() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let apps = replicas(&redis.url(), &bot, 2).await;
    let store = store(&redis);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pcc-deploy.toml");
    let deploy = |auth: &str| {
        format!(
            "agent_name = \"deployed\"\nwebsocket_auth = \"{auth}\"\nimage = \"x/y:2\"\n[broker]\nbot_url = \"{}\"\n",
            bot.url()
        )
    };
    assert_eq!(status_of_start(&apps[0], "deployed", KEY).await, 404);

    std::fs::write(&file, deploy("none")).unwrap();
    let (service, _) =
        admin::deploy(&store, ORG, &file, &[], &BotDefaults::default()).await.unwrap();
    assert_eq!(service, format!("deployed.{ORG}"));
    for app in &apps {
        eventually(WITHIN, || async {
            (status_of_start(app, "deployed", KEY).await == 200).then_some(())
        })
        .await;
    }
    let mut ws = connect(&apps[1].ws_url("deployed", ORG), None).await.unwrap();
    assert_echo(&mut ws, Message::text("deployed without a restart")).await;

    // Redeployed with token auth: connects without a token are refused everywhere.
    std::fs::write(&file, deploy("token")).unwrap();
    admin::deploy(&store, ORG, &file, &[], &BotDefaults::default()).await.unwrap();
    for app in &apps {
        eventually(WITHIN, || async {
            matches!(connect(&app.ws_url("deployed", ORG), None).await, Err((403, _, _)))
                .then_some(())
        })
        .await;
    }

    // A file that names another org, or is invalid, is refused and changes nothing.
    std::fs::write(&file, deploy("token").replace("[broker]\n", "[broker]\norg = \"other\"\n"))
        .unwrap();
    assert!(
        admin::deploy(&store, ORG, &file, &[], &BotDefaults::default())
            .await
            .unwrap_err()
            .to_string()
            .contains("org")
    );
    std::fs::write(&file, "agent_name = \"Bad Name\"\n").unwrap();
    assert!(admin::deploy(&store, ORG, &file, &[], &BotDefaults::default()).await.is_err());
}

#[tokio::test]
async fn the_cli_manages_keys_and_deploys() {
    let redis = RedisServer::start();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-broker"))
            .args(args)
            .args(["--redis-url", &redis.url()])
            .env_clear()
            .env("BROKER__REDIS__KEY_PREFIX", PREFIX)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let key = cli(&["keys", "create", "--org", ORG]).trim().to_owned();
    assert!(key.starts_with("pk_"));
    let listed = cli(&["keys", "list", "--org", ORG]);
    assert!(listed.contains("active") && !listed.contains(&key), "{listed}");
    let id = listed.split('\t').next().unwrap().to_owned();
    assert!(cli(&["keys", "revoke", &id, "--org", ORG]).contains("revoked"));
    assert!(cli(&["keys", "list", "--org", ORG]).contains("revoked at"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pcc-deploy.toml");
    std::fs::write(
        &file,
        "agent_name = \"cli-agent\"\n[broker]\nbot_url = \"ws://127.0.0.1:9/\"\n",
    )
    .unwrap();
    let out = cli(&["deploy", file.to_str().unwrap(), "--org", ORG]);
    assert!(out.contains(&format!("deployed cli-agent.{ORG}")), "{out}");
}

/// Pipecat Cloud's deploy file as it is, with nothing of the broker's own: the bot URL comes
/// from `deploy --bot-url`, or from the replicas' `[bots]` template.
#[tokio::test]
async fn a_pipecat_cloud_deploy_file_deploys_unchanged() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let apps = replicas(&redis.url(), &bot, 2).await;
    let store = store(&redis);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pcc-deploy.toml");
    std::fs::write(
        &file,
        "agent_name = \"as-is\"\nimage = \"reg/as-is:1\"\nsecret_set = \"s\"\nregion = \"local\"\n\
         agent_profile = \"agent-1x\"\n\n[scaling]\nmin_agents = 0\nmax_agents = 3\n",
    )
    .unwrap();
    // Without a template or a --bot-url there is nowhere to send its sessions: refused.
    let nowhere = admin::deploy(&store, ORG, &file, &[], &BotDefaults::default()).await;
    assert!(nowhere.unwrap_err().to_string().contains("no bot URL"));
    // With --bot-url.
    let url = vec![bot.url()];
    admin::deploy(&store, ORG, &file, &url, &BotDefaults::default()).await.unwrap();
    for app in &apps {
        let mut ws =
            eventually(WITHIN, || async { connect(&app.ws_url("as-is", ORG), None).await.ok() })
                .await;
        assert_echo(&mut ws, Message::text("no [broker] section")).await;
    }
    // Through the binary, relying on the template the replicas have (`[bots] url_template`).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-broker"))
        .args(["deploy", file.to_str().unwrap(), "--org", ORG, "--redis-url", &redis.url()])
        .env_clear()
        .env("BROKER__REDIS__KEY_PREFIX", PREFIX)
        .env("BROKER__BOTS__URL_TEMPLATE", bot.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("as-is.{ORG}")));
}

/// A deploy payload through the private API (what `pipecat cloud deploy` sends) whose fields
/// hold another type than the CLI's is refused whole, with the field named; it is not deployed
/// with that field's default.
#[tokio::test]
async fn a_deploy_payload_of_the_wrong_types_is_refused_whole() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let token = app.private_token(ORG).await;
    let services = format!("http://{}/v1/organizations/{ORG}/services", app.addr);
    let deploy = |payload: serde_json::Value| {
        app.http.post(&services).bearer_auth(token.clone()).json(&payload).send()
    };
    for (payload, field) in [
        (serde_json::json!({"maxSessionDuration": "600"}), "maxSessionDuration"),
        (serde_json::json!({"maxSessionDuration": 600.5}), "maxSessionDuration"),
        (serde_json::json!({"autoScaling": {"maxAgents": "3"}}), "autoScaling.maxAgents"),
        (serde_json::json!({"autoScaling": 3}), "autoScaling"),
        (serde_json::json!({"websocketAuth": true}), "websocketAuth"),
        (serde_json::json!({"image": ["reg/x:1"]}), "image"),
    ] {
        let mut payload = payload;
        payload["serviceName"] = "typed".into();
        let resp = deploy(payload.clone()).await.unwrap();
        assert_eq!(resp.status(), 400, "{payload}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "400");
        assert!(body["error"].as_str().unwrap().contains(&format!("`{field}`")), "{body}");
    }
    let status = app.http.get(format!("{services}/typed")).bearer_auth(token.clone());
    assert_eq!(status.send().await.unwrap().status(), 404, "nothing was deployed");
    // The same payload with the CLI's types deploys, and nulls read as absent.
    let fine = serde_json::json!({"serviceName": "typed", "image": "reg/x:1",
        "maxSessionDuration": 600, "autoScaling": {"minAgents": 0, "maxAgents": 3},
        "agentProfile": null});
    assert_eq!(deploy(fine).await.unwrap().status(), 200);
    let status = app.http.get(format!("{services}/typed")).bearer_auth(token).send();
    let body: serde_json::Value = status.await.unwrap().json().await.unwrap();
    assert_eq!(body["body"]["deployment"]["manifest"]["spec"]["maxSessionDurationSeconds"], 600);
    assert_eq!(body["body"]["autoScaling"]["maxReplicas"], 3);
}
