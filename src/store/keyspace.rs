//! Every Redis key and channel the broker uses, built in this one place.
//!
//! All keys start with the configured prefix (`redis.key_prefix`), so deployments and tests can
//! share a Redis. The part in braces is the Redis Cluster hash tag: every key that one script or
//! `MULTI` touches carries the same tag and so lives in the same slot.

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
}

impl Keyspace {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// `{prefix}:agent:{<agent.org>}:token:<sid>`: the consume mark of a session's token,
    /// holding the id of the connect that consumed it; lives as long as the token could still
    /// verify. Under the agent's hash tag, with everything else a connect touches, so that one
    /// script does the whole connect on any topology (see `migrations-lua/015`).
    pub fn token(&self, service_host: &str, sid: Uuid) -> String {
        format!("{}:agent:{{{service_host}}}:token:{sid}", self.prefix)
    }

    /// `{prefix}:agent:{<agent.org>}:session:<sid>`: the session's record, a hash (see
    /// `store::records`).
    pub fn session(&self, service_host: &str, sid: Uuid) -> String {
        format!("{}:agent:{{{service_host}}}:session:{sid}", self.prefix)
    }

    /// `{prefix}:agent:{<agent.org>}:fence`: the agent's fence against lost store data: which
    /// Redis server incarnation made it, and when (see `migrations-lua/007`). Tokens carry it.
    pub fn fence(&self, service_host: &str) -> String {
        format!("{}:agent:{{{service_host}}}:fence", self.prefix)
    }

    /// `{prefix}:agent:{<agent.org>}:live`: the agent's live sessions, a sorted set of session
    /// ids scored by lease expiry (Unix ms). Its size under the cap is the concurrency cap.
    pub fn live(&self, service_host: &str) -> String {
        format!("{}:agent:{{{service_host}}}:live", self.prefix)
    }

    /// `{prefix}:agent:{<agent.org>}:sessions`: the agent's sessions, a sorted set of session
    /// ids scored by creation time (Unix ms), for listing; trimmed to the retention period.
    pub fn sessions_of(&self, service_host: &str) -> String {
        format!("{}:agent:{{{service_host}}}:sessions", self.prefix)
    }

    /// `{prefix}:agent:{<agent.org>}:events`: the agent's session events, newest first, a list
    /// of JSON `SessionEvent`s capped in length.
    pub fn events_of(&self, service_host: &str) -> String {
        format!("{}:agent:{{{service_host}}}:events", self.prefix)
    }

    /// `{prefix}:once:{<what>}`: a one-time claim (a webhook's call id or nonce), expiring.
    pub fn once(&self, what: &str) -> String {
        format!("{}:once:{{{what}}}", self.prefix)
    }

    /// `{prefix}:rate:{<bucket>}:<window>`: calls counted against `bucket` in fixed window
    /// number `window`; expires two windows later.
    pub fn rate(&self, bucket: &str, window: u64) -> String {
        format!("{}:rate:{{{bucket}}}:{window}", self.prefix)
    }

    /// `{prefix}:health`: written by readiness checks to prove the store takes writes.
    pub fn health(&self) -> String {
        format!("{}:health", self.prefix)
    }

    /// `{prefix}:schema`: hash of `version` and `compatible_from`, the schema of the data.
    pub fn schema(&self) -> String {
        format!("{}:schema", self.prefix)
    }

    /// `{prefix}:{registry}:<part>`: the shared registry, `agents` and `keys` hashes and its
    /// `version` counter. One tag, so a change and its version bump are one `MULTI`.
    pub fn registry(&self, part: RegistryPart) -> String {
        format!("{}:{{registry}}:{}", self.prefix, part.as_str())
    }

    /// `{prefix}:terminate`: pub/sub channel announcing session ids to end, on any replica.
    pub fn terminations(&self) -> String {
        format!("{}:terminate", self.prefix)
    }
}

/// The parts of the shared registry.
#[derive(Debug, Clone, Copy)]
pub enum RegistryPart {
    /// Hash of `agent.org` to the JSON of its `DeployedAgent`.
    Agents,
    /// Hash of key id to the JSON of its `CredentialRecord`: public API keys.
    Keys,
    /// Hash of token id to the JSON of its `CredentialRecord`: private tokens.
    Tokens,
    /// Counter bumped by every change; replicas poll it.
    Version,
}

impl RegistryPart {
    fn as_str(self) -> &'static str {
        match self {
            Self::Agents => "agents",
            Self::Keys => "keys",
            Self::Tokens => "tokens",
            Self::Version => "version",
        }
    }
}
