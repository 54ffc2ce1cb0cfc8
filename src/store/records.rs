//! What the store persists, as types. A session record is a flat hash in Redis (and a map in the
//! embedded store); [`SessionRecord::to_fields`] and [`SessionRecord::from_fields`] are the one
//! place that knows its field names. Registry entries are stored as the JSON of their types.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Where a session is in its life. Every transition is one conditional write (see
/// [`super::SessionStore::update_session`]), so a session is never reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Minted by `/start`; its token has not connected yet.
    Pending,
    /// Bridged to its bot on some replica.
    Active,
    Ended,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Ended => "ended",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "active" => Some(Self::Active),
            "ended" => Some(Self::Ended),
            _ => None,
        }
    }
}

/// Why a session ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The bot closed normally (1000): the conversation is over.
    Completed,
    /// The client closed or disconnected.
    ClientClosed,
    /// The bot closed with another code, broke the protocol or disconnected.
    BotClosed,
    /// The token expired while the bot could not be reached.
    BotUnreachable,
    /// `max_session_duration` was reached, or a side stopped answering heartbeats.
    Timeout,
    /// Ended through the session API.
    Terminated,
    /// The replica holding it stopped renewing its lease.
    ReplicaLost,
    /// A pending session whose token expired unused.
    Expired,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ClientClosed => "client_closed",
            Self::BotClosed => "bot_closed",
            Self::BotUnreachable => "bot_unreachable",
            Self::Timeout => "timeout",
            Self::Terminated => "terminated",
            Self::ReplicaLost => "replica_lost",
            Self::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Completed,
            Self::ClientClosed,
            Self::BotClosed,
            Self::BotUnreachable,
            Self::Timeout,
            Self::Terminated,
            Self::ReplicaLost,
            Self::Expired,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

/// A session's record, whole when read, partial when written: a write sets only the fields that
/// are `Some` and leaves the others as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRecord {
    pub status: Option<Status>,
    /// `agent.org`.
    pub service: Option<String>,
    pub created_ms: Option<u64>,
    pub token_expires_ms: Option<u64>,
    /// Region whose replica minted the token.
    pub minted_region: Option<String>,
    /// Replica and region holding the session, once active.
    pub replica: Option<String>,
    pub region: Option<String>,
    pub connected_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub end_reason: Option<EndReason>,
    pub duration_ms: Option<u64>,
    pub detail: Option<String>,
    /// Why the last connect attempt failed while the token is still usable.
    pub last_error: Option<EndReason>,
    /// The body minted with the token, standard base64 of the exact JSON bytes: what the bot
    /// receives when the client connects without `?body=`.
    pub body: Option<String>,
}

/// Hash field names, each written by [`SessionRecord::to_fields`] and read by
/// [`SessionRecord::from_fields`] only. `status` is also read by migration 002.
mod field {
    pub const STATUS: &str = "status";
    pub const SERVICE: &str = "service";
    pub const CREATED_MS: &str = "created_ms";
    pub const TOKEN_EXPIRES_MS: &str = "token_expires_ms";
    pub const MINTED_REGION: &str = "minted_region";
    pub const REPLICA: &str = "replica";
    pub const REGION: &str = "region";
    pub const CONNECTED_MS: &str = "connected_ms";
    pub const ENDED_MS: &str = "ended_ms";
    pub const END_REASON: &str = "end_reason";
    pub const DURATION_MS: &str = "duration_ms";
    pub const DETAIL: &str = "detail";
    pub const LAST_ERROR: &str = "last_error";
    pub const BODY: &str = "body";
}

impl SessionRecord {
    /// A session just minted by `/start`.
    pub fn pending(service: &str, created_ms: u64, token_expires_ms: u64, region: &str) -> Self {
        Self {
            status: Some(Status::Pending),
            service: Some(service.to_owned()),
            created_ms: Some(created_ms),
            token_expires_ms: Some(token_expires_ms),
            minted_region: Some(region.to_owned()),
            ..Self::default()
        }
    }

    /// The end of a session, at `now_ms`; `connected_ms` gives its duration when it was active.
    pub fn ended(reason: EndReason, detail: &str, connected_ms: Option<u64>, now_ms: u64) -> Self {
        Self {
            status: Some(Status::Ended),
            ended_ms: Some(now_ms),
            end_reason: Some(reason),
            detail: Some(detail.to_owned()),
            duration_ms: connected_ms.map(|at| now_ms.saturating_sub(at)),
            ..Self::default()
        }
    }

    /// A connect attempt that failed while the token stays usable.
    pub fn connect_failed(why: EndReason) -> Self {
        Self { last_error: Some(why), ..Self::default() }
    }

    /// The fields that are set, as (name, value) pairs.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = Vec::with_capacity(8);
        let mut text = |name, value: Option<&str>| {
            if let Some(value) = value {
                fields.push((name, value.to_owned()));
            }
        };
        text(field::STATUS, self.status.map(Status::as_str));
        text(field::SERVICE, self.service.as_deref());
        text(field::MINTED_REGION, self.minted_region.as_deref());
        text(field::REPLICA, self.replica.as_deref());
        text(field::REGION, self.region.as_deref());
        text(field::END_REASON, self.end_reason.map(EndReason::as_str));
        text(field::DETAIL, self.detail.as_deref());
        text(field::LAST_ERROR, self.last_error.map(EndReason::as_str));
        text(field::BODY, self.body.as_deref());
        for (name, value) in [
            (field::CREATED_MS, self.created_ms),
            (field::TOKEN_EXPIRES_MS, self.token_expires_ms),
            (field::CONNECTED_MS, self.connected_ms),
            (field::ENDED_MS, self.ended_ms),
            (field::DURATION_MS, self.duration_ms),
        ] {
            if let Some(value) = value {
                fields.push((name, value.to_string()));
            }
        }
        fields
    }

    /// Reads stored fields; a field that is missing or does not parse reads as unset.
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        let text = |name: &str| fields.get(name).cloned();
        let number = |name: &str| fields.get(name).and_then(|v| v.parse().ok());
        let reason = |name: &str| fields.get(name).and_then(|v| EndReason::parse(v));
        Self {
            status: fields.get(field::STATUS).and_then(|s| Status::parse(s)),
            service: text(field::SERVICE),
            created_ms: number(field::CREATED_MS),
            token_expires_ms: number(field::TOKEN_EXPIRES_MS),
            minted_region: text(field::MINTED_REGION),
            replica: text(field::REPLICA),
            region: text(field::REGION),
            connected_ms: number(field::CONNECTED_MS),
            ended_ms: number(field::ENDED_MS),
            end_reason: reason(field::END_REASON),
            duration_ms: number(field::DURATION_MS),
            detail: text(field::DETAIL),
            last_error: reason(field::LAST_ERROR),
            body: text(field::BODY),
        }
    }

    /// Applies a partial record on top of this one.
    pub fn merge(&mut self, update: &Self) {
        let pairs = update.to_fields();
        let mut fields: HashMap<String, String> =
            self.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        fields.extend(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)));
        *self = Self::from_fields(&fields);
    }
}

/// A public API key or a private token as the shared registry keeps it: its hash, never the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// Short public id, to name the credential in lists and revocations.
    pub id: String,
    pub org: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
    /// A name its creator gave it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An agent as the shared registry keeps it: its `pcc-deploy.toml` exactly as deployed (keys
/// the broker does not use included, to be shown back), and the bot URLs its deploy gave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedAgent {
    /// The deploy file, as deployed by `session-broker deploy` or rebuilt from the CLI's payload.
    pub toml: String,
    /// The `pipecat cloud deploy` payload as sent, fields the broker does not use included, to
    /// be shown back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Changes with every deploy; the CLI waits until the reconciled id equals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default)]
    pub updated_ms: u64,
    /// The bot of every region that has none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_url: Option<String>,
    /// Bots by region.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bot_urls: BTreeMap<String, String>,
}

/// One event of a session's life, as `agent logs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub at_ms: u64,
    pub session_id: uuid::Uuid,
    /// What happened, in words: `session … started`, `… connected`, `… ended: completed`.
    pub text: String,
}

/// Which kind of credential a registry change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A public API key (`pk_…`), for `/start` and the public session API.
    ApiKey,
    /// A private token, for the private API (the `pipecat cloud` CLI).
    PrivateToken,
}

impl DeployedAgent {
    /// Reads a stored entry: JSON of this type, or, as releases before it stored, the bare TOML.
    pub fn from_stored(text: &str) -> Self {
        match serde_json::from_str(text) {
            Ok(agent) => agent,
            Err(_) => Self { toml: text.to_owned(), ..Self::default() },
        }
    }

    pub fn to_stored(&self) -> String {
        // A struct of strings serializes.
        serde_json::to_string(self).expect("deployed agent serializes")
    }
}

/// Everything the shared registry holds, at one version.
#[derive(Debug, Default)]
pub struct RegistryEntries {
    pub version: u64,
    /// (org, agent) per deployed agent.
    pub agents: Vec<(String, DeployedAgent)>,
    /// Public API keys.
    pub keys: Vec<CredentialRecord>,
    /// Private tokens, for the private API.
    pub tokens: Vec<CredentialRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_fields() {
        let mut record = SessionRecord::pending("a.o", 1, 2, "us-west");
        record.merge(&SessionRecord::ended(EndReason::Timeout, "why", Some(5), 9));
        record.merge(&SessionRecord::connect_failed(EndReason::BotUnreachable));
        let fields = record.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(SessionRecord::from_fields(&fields), record);
        assert_eq!(record.status, Some(Status::Ended));
        assert_eq!(record.duration_ms, Some(4));
        assert_eq!(record.service.as_deref(), Some("a.o"));
    }

    #[test]
    fn end_reasons_parse_back() {
        for reason in [EndReason::Completed, EndReason::ReplicaLost, EndReason::Expired] {
            assert_eq!(EndReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(EndReason::parse("nope"), None);
    }
}
