//! Session lifecycle: the records every replica can read, the sessions this replica holds, and
//! the background work that keeps both true across replicas.
//!
//! A record is created `pending` by `/start` (it lives as long as the token, plus retention),
//! becomes `active` when a connect wins the token and reaches the bot, and `ended` once, with the
//! first reason that ends it. Every transition is one conditional write in the store, so a
//! session terminated through the API is never reopened and its reason never overwritten.
//!
//! A live session also holds a lease in its agent's live set, which the concurrency cap counts.
//! The holding replica renews its leases; a replica that dies stops renewing, its leases lapse
//! (freeing the slots at once) and the next sweep, on any replica, marks those sessions
//! `replica_lost`. A lease that disappears under a live session (DELETE, or a sweep after this
//! replica lost Redis for too long) makes its holder end the session.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{broadcast, oneshot};
use uuid::Uuid;

use crate::{
    registry::LiveRegistry,
    store::{Store, StoreError, unix_ms},
};

/// Most lapsed leases one sweep claims per agent; the rest wait for the next sweep.
const SWEEP_BATCH: usize = 100;
/// Close code sent to both sides of a session ended through `DELETE …/sessions/{id}`.
pub const TERMINATED_CLOSE_CODE: u16 = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
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

    fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "active" => Some(Self::Active),
            "ended" => Some(Self::Ended),
            _ => None,
        }
    }
}

/// Why a session ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        }
    }
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    pub session_id: Uuid,
    /// `agent.org`.
    pub service: String,
    pub status: Status,
    pub created_at_ms: Option<u64>,
    pub token_expires_at_ms: Option<u64>,
    pub minted_region: Option<String>,
    /// Replica and region holding the session, once active.
    pub replica: Option<String>,
    pub region: Option<String>,
    pub connected_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    pub end_reason: Option<String>,
    pub duration_ms: Option<u64>,
    pub detail: Option<String>,
    /// What went wrong with the last connect attempt, while the token is still usable.
    pub last_error: Option<String>,
}

impl SessionRecord {
    /// Reads a stored record. A pending record whose token expired is shown as ended: nobody
    /// can connect to it any more. Its reason is the last connect error, or `expired`.
    pub fn from_fields(
        session_id: Uuid,
        fields: &HashMap<String, String>,
        now_ms: u64,
    ) -> Option<Self> {
        let text = |name: &str| fields.get(name).cloned();
        let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
        let mut record = Self {
            session_id,
            service: text("service")?,
            status: Status::parse(fields.get("status")?)?,
            created_at_ms: number("created_ms"),
            token_expires_at_ms: number("token_expires_ms"),
            minted_region: text("minted_region"),
            replica: text("replica"),
            region: text("region"),
            connected_at_ms: number("connected_ms"),
            ended_at_ms: number("ended_ms"),
            end_reason: text("end_reason"),
            duration_ms: number("duration_ms"),
            detail: text("detail"),
            last_error: text("last_error"),
        };
        if record.status == Status::Pending
            && record.token_expires_at_ms.is_some_and(|at| at <= now_ms)
        {
            record.status = Status::Ended;
            record.ended_at_ms = record.token_expires_at_ms;
            record.end_reason = Some(record.last_error.take().unwrap_or_else(|| "expired".into()));
        }
        Some(record)
    }
}

/// Fields written when a session ends.
pub fn ended_fields(
    reason: EndReason,
    detail: &str,
    connected_ms: Option<u64>,
) -> Vec<(&'static str, String)> {
    let now = unix_ms();
    let mut fields = vec![
        ("status", Status::Ended.as_str().to_owned()),
        ("ended_ms", now.to_string()),
        ("end_reason", reason.as_str().to_owned()),
        ("detail", detail.to_owned()),
    ];
    if let Some(connected) = connected_ms {
        fields.push(("duration_ms", now.saturating_sub(connected).to_string()));
    }
    fields
}

/// Why this replica is asked to end a session it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Terminated,
    LeaseLost,
    /// The replica is shutting down and its drain deadline passed.
    Draining,
}

struct Held {
    agent: String,
    stop: Option<oneshot::Sender<Stop>>,
}

/// The sessions this replica holds, by id.
#[derive(Default)]
pub struct LiveSessions {
    held: Mutex<HashMap<Uuid, Held>>,
}

/// Holds a session's place in [`LiveSessions`]; dropping it (the session ended, or its task was
/// dropped) removes it, so leases are never renewed for a session that no longer runs.
pub struct Registration {
    sessions: Arc<LiveSessions>,
    sid: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.sid);
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        // Every update is one insert or remove; a poisoned map is still consistent.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        sid: Uuid,
        agent: &str,
    ) -> (Registration, oneshot::Receiver<Stop>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(sid, Held { agent: agent.to_owned(), stop: Some(tx) });
        (Registration { sessions: self.clone(), sid }, rx)
    }

    /// Asks the session to end, if this replica holds it. Returns whether it did.
    pub fn stop(&self, sid: Uuid, why: Stop) -> bool {
        let stop = self.lock().get_mut(&sid).and_then(|held| held.stop.take());
        stop.is_some_and(|tx| tx.send(why).is_ok())
    }

    /// Asks every held session to end.
    pub fn stop_all(&self, why: Stop) {
        for held in self.lock().values_mut() {
            if let Some(tx) = held.stop.take() {
                let _ = tx.send(why);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn by_agent(&self) -> HashMap<String, Vec<Uuid>> {
        let mut by_agent: HashMap<String, Vec<Uuid>> = HashMap::new();
        for (sid, held) in self.lock().iter() {
            by_agent.entry(held.agent.clone()).or_default().push(*sid);
        }
        by_agent
    }
}

/// Timing of leases and sweeps, from `[sessions]`.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease: Duration,
    pub sweep_interval: Duration,
    pub retention: Duration,
}

impl LeaseTiming {
    /// Leases are renewed three times per lease, so one late or failed renewal loses nothing.
    pub fn renew_interval(&self) -> Duration {
        self.lease / 3
    }
}

/// Renews the leases of the sessions this replica holds, and ends those whose lease is gone.
pub async fn renew_leases(store: Arc<dyn Store>, sessions: Arc<LiveSessions>, timing: LeaseTiming) {
    let mut tick = tokio::time::interval(timing.renew_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (agent, sids) in sessions.by_agent() {
            match store.renew_leases(&agent, &sids, timing.lease).await {
                Ok(gone) => {
                    for sid in gone {
                        tracing::info!(session_id = %sid, agent, "lease gone; ending session");
                        sessions.stop(sid, Stop::LeaseLost);
                    }
                }
                Err(e) => tracing::warn!(agent, error = %e, "could not renew leases"),
            }
        }
    }
}

/// Claims lapsed leases of every agent and marks their sessions `replica_lost`.
pub async fn sweep_lapsed(store: Arc<dyn Store>, registry: Arc<LiveRegistry>, timing: LeaseTiming) {
    let mut tick = tokio::time::interval(timing.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for agent in registry.load().agents.iter() {
            if let Err(e) = sweep_agent(&*store, &agent.service_host, timing.retention).await {
                tracing::warn!(agent = %agent.service_host, error = %e, "sweep failed");
            }
        }
    }
}

async fn sweep_agent(
    store: &dyn Store,
    agent: &str,
    retention: Duration,
) -> Result<(), StoreError> {
    for sid in store.claim_lapsed_leases(agent, SWEEP_BATCH).await? {
        let connected = store
            .get_session(sid)
            .await?
            .and_then(|f| f.get("connected_ms").and_then(|v| v.parse().ok()));
        let fields =
            ended_fields(EndReason::ReplicaLost, "holding replica stopped renewing", connected);
        if store.update_session(sid, &["active"], &fields, Some(retention)).await? {
            tracing::warn!(session_id = %sid, agent, "session lost with its replica");
        }
    }
    Ok(())
}

/// Ends the sessions this replica holds when any replica announces their termination.
pub async fn listen_for_terminations(
    mut announcements: broadcast::Receiver<Uuid>,
    sessions: Arc<LiveSessions>,
) {
    loop {
        match announcements.recv().await {
            Ok(sid) => {
                if sessions.stop(sid, Stop::Terminated) {
                    tracing::info!(session_id = %sid, "session terminated through the API");
                }
            }
            // Missed announcements are caught by lease renewal: DELETE also removes the lease.
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "termination announcements lagged");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_pending_record_past_its_token_reads_as_ended() {
        let sid = Uuid::new_v4();
        let f = fields(&[("service", "a.o"), ("status", "pending"), ("token_expires_ms", "1000")]);
        let live = SessionRecord::from_fields(sid, &f, 999).unwrap();
        assert_eq!(live.status, Status::Pending);
        let gone = SessionRecord::from_fields(sid, &f, 1000).unwrap();
        assert_eq!((gone.status, gone.end_reason.as_deref()), (Status::Ended, Some("expired")));
        let mut f = f;
        f.insert("last_error".into(), "bot_unreachable".into());
        let unreachable = SessionRecord::from_fields(sid, &f, 2000).unwrap();
        assert_eq!(unreachable.end_reason.as_deref(), Some("bot_unreachable"));
    }

    #[tokio::test]
    async fn stopping_reaches_the_session_once_and_registration_ends_with_it() {
        let sessions = Arc::new(LiveSessions::default());
        let sid = Uuid::new_v4();
        let (registration, stopped) = sessions.register(sid, "a.o");
        assert!(sessions.stop(sid, Stop::Terminated));
        assert!(!sessions.stop(sid, Stop::Terminated));
        assert_eq!(stopped.await.unwrap(), Stop::Terminated);
        drop(registration);
        assert!(sessions.is_empty());
    }
}
