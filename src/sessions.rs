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
use tokio::sync::{Notify, broadcast, oneshot};
use uuid::Uuid;

pub use crate::store::{EndReason, Status};
use crate::{
    registry::LiveRegistry,
    store::{SessionRecord, SessionStore, StoreError, unix_ms},
};

/// Sweeps between two trims of an agent's session list.
const TRIM_EVERY_SWEEPS: u64 = 30;
/// Most lapsed leases one sweep claims per agent; the rest wait for the next sweep.
const SWEEP_BATCH: usize = 100;
/// Close code sent to both sides of a session ended through `DELETE …/sessions/{id}`.
pub const TERMINATED_CLOSE_CODE: u16 = 4000;

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
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
    pub end_reason: Option<EndReason>,
    pub duration_ms: Option<u64>,
    pub detail: Option<String>,
    /// What went wrong with the last connect attempt, while the token is still usable.
    pub last_error: Option<EndReason>,
}

impl SessionView {
    /// Shows a stored record; `None` for a record without its service or status (never written
    /// whole). A pending record whose token expired is shown as ended: nobody can connect to it
    /// any more. Its reason is the last connect error, or `expired`.
    pub fn new(session_id: Uuid, record: SessionRecord, now_ms: u64) -> Option<Self> {
        let mut view = Self {
            session_id,
            service: record.service?,
            status: record.status?,
            created_at_ms: record.created_ms,
            token_expires_at_ms: record.token_expires_ms,
            minted_region: record.minted_region,
            replica: record.replica,
            region: record.region,
            connected_at_ms: record.connected_ms,
            ended_at_ms: record.ended_ms,
            end_reason: record.end_reason,
            duration_ms: record.duration_ms,
            detail: record.detail,
            last_error: record.last_error,
        };
        if view.status == Status::Pending && view.token_expires_at_ms.is_some_and(|at| at <= now_ms)
        {
            view.status = Status::Ended;
            view.ended_at_ms = view.token_expires_at_ms;
            view.end_reason = Some(view.last_error.take().unwrap_or(EndReason::Expired));
        }
        Some(view)
    }
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
    /// Woken whenever the last held session ends, for a drain to await.
    emptied: Notify,
}

/// Holds a session's place in [`LiveSessions`]; dropping it (the session ended, or its task was
/// dropped) removes it, so leases are never renewed for a session that no longer runs.
pub struct Registration {
    sessions: Arc<LiveSessions>,
    sid: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut held = self.sessions.lock();
        held.remove(&self.sid);
        if held.is_empty() {
            self.sessions.emptied.notify_waiters();
        }
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

    /// Returns once this replica holds no session.
    pub async fn until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            // Registered before the check, so an end between the two is not missed.
            emptied.as_mut().enable();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
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
pub async fn renew_leases(
    store: Arc<dyn SessionStore>,
    sessions: Arc<LiveSessions>,
    timing: LeaseTiming,
) {
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

/// Claims lapsed leases of every agent and marks their sessions `replica_lost`, counting them
/// in `lost` by agent.
pub async fn sweep_lapsed(
    store: Arc<dyn SessionStore>,
    registry: Arc<LiveRegistry>,
    timing: LeaseTiming,
    lost: prometheus::IntCounterVec,
) {
    let mut tick = tokio::time::interval(timing.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for sweeps in 0u64.. {
        tick.tick().await;
        for agent in registry.load().agents.iter() {
            // The agent's session list forgets what its records no longer hold; now and then
            // is enough, since listing skips sessions whose record is gone.
            if sweeps % TRIM_EVERY_SWEEPS == 0 {
                let before = unix_ms().saturating_sub(timing.retention.as_millis() as u64);
                if let Err(e) = store.trim_sessions(&agent.service_host, before).await {
                    tracing::debug!(agent = %agent.service_host, error = %e, "could not trim the session list");
                }
            }
            let swept = sweep_agent(&*store, &agent.service_host, timing.retention).await;
            match swept {
                Ok(0) => {}
                Ok(n) => lost.with_label_values(&[&agent.service_host]).inc_by(n),
                Err(e) => {
                    tracing::warn!(agent = %agent.service_host, error = %e, "sweep failed")
                }
            }
        }
    }
}

/// Returns how many sessions it marked lost.
async fn sweep_agent(
    store: &dyn SessionStore,
    agent: &str,
    retention: Duration,
) -> Result<u64, StoreError> {
    let mut lost = 0;
    for sid in store.claim_lapsed_leases(agent, SWEEP_BATCH).await? {
        let connected = store.get_session(agent, sid).await?.and_then(|record| record.connected_ms);
        let ended = SessionRecord::ended(
            EndReason::ReplicaLost,
            "holding replica stopped renewing",
            connected,
            unix_ms(),
        );
        let from = [Some(Status::Active)];
        if store.update_session(agent, sid, &from, &ended, Some(retention)).await? {
            tracing::warn!(session_id = %sid, agent, "session lost with its replica");
            lost += 1;
        }
    }
    Ok(lost)
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

    #[test]
    fn a_pending_record_past_its_token_reads_as_ended() {
        let sid = Uuid::new_v4();
        let record = SessionRecord::pending("a.o", 0, 1000, "r");
        let live = SessionView::new(sid, record.clone(), 999).unwrap();
        assert_eq!(live.status, Status::Pending);
        let gone = SessionView::new(sid, record.clone(), 1000).unwrap();
        assert_eq!((gone.status, gone.end_reason), (Status::Ended, Some(EndReason::Expired)));
        let mut record = record;
        record.merge(&SessionRecord::connect_failed(EndReason::BotUnreachable));
        let unreachable = SessionView::new(sid, record, 2000).unwrap();
        assert_eq!(unreachable.end_reason, Some(EndReason::BotUnreachable));
    }

    #[tokio::test]
    async fn stopping_reaches_the_session_once_and_registration_ends_with_it() {
        let sessions = Arc::new(LiveSessions::default());
        let sid = Uuid::new_v4();
        let (registration, stopped) = sessions.register(sid, "a.o");
        assert!(sessions.stop(sid, Stop::Terminated));
        assert!(!sessions.stop(sid, Stop::Terminated));
        assert_eq!(stopped.await.unwrap(), Stop::Terminated);
        let drained = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.until_empty().await }
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "a held session keeps the drain waiting");
        drop(registration);
        drained.await.unwrap();
        assert!(sessions.is_empty());
    }
}
