//! The embedded store: one process, no set-up. Gives the same one-time-use guarantee as Redis
//! within the process, with the same expiry, so `cargo run` behaves like production.
//!
//! Every expiry, lease and rate window runs on `tokio::time`, so tests can pause and advance
//! time instead of sleeping.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use tokio::{sync::broadcast, time::Instant};
use uuid::Uuid;

use super::{
    CredentialKind, CredentialRecord, DeployedAgent, Listing, RegistryEntries, RegistryStore,
    SessionEvent, SessionRecord, SessionStore, Status, StoreError, TERMINATION_BACKLOG,
};

/// How often expired entries are swept out. Between sweeps they are only ignored, so memory
/// stays bounded by what was written during one token lifetime plus this interval.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Consumed {
    holder: String,
    expires: Instant,
}

#[derive(Debug)]
struct Record {
    record: SessionRecord,
    expires: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    tokens: HashMap<Uuid, Consumed>,
    /// bucket -> (window number, calls counted in it)
    rates: HashMap<String, (u64, u64)>,
    sessions: HashMap<Uuid, Record>,
    /// agent -> session id -> lease expiry
    leases: HashMap<String, HashMap<Uuid, Instant>>,
    /// The shared registry: agents by `agent.org` as (org, TOML), keys by id, and the version.
    registry_agents: HashMap<String, (String, DeployedAgent)>,
    registry_keys: HashMap<String, CredentialRecord>,
    registry_tokens: HashMap<String, CredentialRecord>,
    /// One-time claims, by what they claim, with their expiry.
    claims: HashMap<String, Instant>,
    /// agent -> (created ms, session id), oldest first
    session_index: HashMap<String, Vec<(u64, Uuid)>>,
    /// agent -> events, newest first
    events: HashMap<String, std::collections::VecDeque<SessionEvent>>,
    registry_version: u64,
    next_sweep: Instant,
}

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    started: Instant,
    terminations: broadcast::Sender<Uuid>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                tokens: HashMap::new(),
                rates: HashMap::new(),
                sessions: HashMap::new(),
                leases: HashMap::new(),
                registry_agents: HashMap::new(),
                registry_keys: HashMap::new(),
                registry_tokens: HashMap::new(),
                claims: HashMap::new(),
                session_index: HashMap::new(),
                events: HashMap::new(),
                registry_version: 0,
                next_sweep: now + SWEEP_INTERVAL,
            }),
            started: now,
            terminations: broadcast::channel(TERMINATION_BACKLOG).0,
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent (every update is a
        // single insert or remove), so a poisoned lock is still safe to use.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= inner.next_sweep {
            inner.tokens.retain(|_, c| c.expires > now);
            let window_floor = now.duration_since(self.started).as_millis() as u64;
            inner.rates.retain(|_, (window_end, _)| *window_end > window_floor);
            inner.sessions.retain(|_, r| r.expires.is_none_or(|at| at > now));
            inner.next_sweep = now + SWEEP_INTERVAL;
        }
        inner
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn consume_token(
        &self,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.tokens.get(&sid).is_some_and(|c| c.expires > now) {
            return Ok(false);
        }
        inner.tokens.insert(sid, Consumed { holder: holder.to_owned(), expires: now + ttl });
        Ok(true)
    }

    async fn release_token(&self, sid: Uuid, holder: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let ended =
            inner.sessions.get(&sid).is_some_and(|r| r.record.status == Some(Status::Ended));
        if !ended && inner.tokens.get(&sid).is_some_and(|c| c.holder == holder) {
            inner.tokens.remove(&sid);
            return Ok(true);
        }
        Ok(false)
    }

    async fn rate_limit(
        &self,
        bucket: &str,
        limit: u64,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let window_ms = window.as_millis().max(1) as u64;
        let elapsed = self.started.elapsed().as_millis() as u64;
        // Windows are identified by the time they end, which also tells the sweep when to drop them.
        let window_end = (elapsed / window_ms + 1) * window_ms;
        let mut inner = self.lock();
        let entry = inner.rates.entry(bucket.to_owned()).or_insert((window_end, 0));
        if entry.0 != window_end {
            *entry = (window_end, 0);
        }
        entry.1 += 1;
        Ok(entry.1 <= limit)
    }

    async fn check(&self) -> Result<(), StoreError> {
        drop(self.lock());
        Ok(())
    }

    async fn create_session(
        &self,
        sid: Uuid,
        record: &SessionRecord,
        ttl: Duration,
        listed: Option<Listing<'_>>,
    ) -> Result<(), StoreError> {
        let record = Record { record: record.clone(), expires: Some(Instant::now() + ttl) };
        self.lock().sessions.insert(sid, record);
        match listed {
            Some(listing) => self.index_session(sid, listing).await,
            None => Ok(()),
        }
    }

    async fn update_session(
        &self,
        sid: Uuid,
        from: &[Option<Status>],
        update: &SessionRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let live = inner.sessions.get(&sid).filter(|r| r.expires.is_none_or(|at| at > now));
        let current = live.and_then(|r| r.record.status);
        if !from.contains(&current) {
            return Ok(false);
        }
        if live.is_none() {
            inner.sessions.insert(sid, Record { record: SessionRecord::default(), expires: None });
        }
        let record = inner.sessions.get_mut(&sid).expect("inserted above");
        record.record.merge(update);
        if let Some(ttl) = ttl {
            record.expires = Some(now + ttl);
        }
        Ok(true)
    }

    async fn get_session(&self, sid: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let record = inner.sessions.get(&sid).filter(|r| r.expires.is_none_or(|at| at > now));
        Ok(record.map(|r| r.record.clone()))
    }

    async fn acquire_slot(
        &self,
        agent: &str,
        sid: Uuid,
        cap: u32,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let leases = inner.leases.entry(agent.to_owned()).or_default();
        let live = leases.values().filter(|&&expiry| expiry > now).count() as u64;
        if live >= u64::from(cap) {
            return Ok(false);
        }
        leases.insert(sid, now + lease);
        Ok(true)
    }

    async fn release_slot(&self, agent: &str, sid: Uuid) -> Result<(), StoreError> {
        if let Some(leases) = self.lock().leases.get_mut(agent) {
            leases.remove(&sid);
        }
        Ok(())
    }

    async fn renew_leases(
        &self,
        agent: &str,
        sids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let expiry = Instant::now() + lease;
        let mut inner = self.lock();
        let leases = inner.leases.entry(agent.to_owned()).or_default();
        let mut gone = Vec::new();
        for sid in sids {
            match leases.get_mut(sid) {
                Some(at) => *at = expiry,
                None => gone.push(*sid),
            }
        }
        Ok(gone)
    }

    async fn claim_lapsed_leases(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(leases) = inner.leases.get_mut(agent) else { return Ok(Vec::new()) };
        let lapsed: Vec<Uuid> =
            leases.iter().filter(|(_, at)| **at <= now).map(|(sid, _)| *sid).take(limit).collect();
        for sid in &lapsed {
            leases.remove(sid);
        }
        Ok(lapsed)
    }

    async fn live_sessions(&self, agent: &str) -> Result<u64, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let live =
            inner.leases.get(agent).map_or(0, |l| l.values().filter(|&&at| at > now).count());
        Ok(live as u64)
    }

    async fn index_session(&self, sid: Uuid, listing: Listing<'_>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let index = inner.session_index.entry(listing.agent.to_owned()).or_default();
        index.push((listing.created_ms, sid));
        Ok(())
    }

    async fn trim_sessions(&self, agent: &str, before_ms: u64) -> Result<(), StoreError> {
        if let Some(index) = self.lock().session_index.get_mut(agent) {
            index.retain(|(at, _)| *at >= before_ms);
        }
        Ok(())
    }

    async fn list_sessions(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let Some(index) = inner.session_index.get(agent) else { return Ok(Vec::new()) };
        Ok(index
            .iter()
            .rev()
            .take(limit)
            .filter_map(|(_, sid)| {
                let record =
                    inner.sessions.get(sid).filter(|r| r.expires.is_none_or(|at| at > now))?;
                Some((*sid, record.record.clone()))
            })
            .collect())
    }

    async fn log_event(
        &self,
        agent: &str,
        event: &SessionEvent,
        cap: usize,
        _retention: Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let events = inner.events.entry(agent.to_owned()).or_default();
        events.push_front(event.clone());
        events.truncate(cap);
        Ok(())
    }

    async fn events(&self, agent: &str) -> Result<Vec<SessionEvent>, StoreError> {
        let inner = self.lock();
        Ok(inner.events.get(agent).map(|e| e.iter().cloned().collect()).unwrap_or_default())
    }

    async fn claim_once(&self, what: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.claims.retain(|_, expires| *expires > now);
        if inner.claims.contains_key(what) {
            return Ok(false);
        }
        inner.claims.insert(what.to_owned(), now + ttl);
        Ok(true)
    }

    async fn publish_termination(&self, sid: Uuid) -> Result<(), StoreError> {
        // No receiver (no live session anywhere) is not an error.
        let _ = self.terminations.send(sid);
        Ok(())
    }

    fn terminations(&self) -> broadcast::Receiver<Uuid> {
        self.terminations.subscribe()
    }
}

#[async_trait]
impl RegistryStore for MemoryStore {
    async fn registry_version(&self) -> Result<u64, StoreError> {
        Ok(self.lock().registry_version)
    }

    async fn registry_load(&self) -> Result<RegistryEntries, StoreError> {
        let inner = self.lock();
        Ok(RegistryEntries {
            version: inner.registry_version,
            agents: inner.registry_agents.values().cloned().collect(),
            keys: inner.registry_keys.values().cloned().collect(),
            tokens: inner.registry_tokens.values().cloned().collect(),
        })
    }

    async fn registry_put_agent(
        &self,
        org: &str,
        name: &str,
        agent: &DeployedAgent,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.registry_agents.insert(format!("{name}.{org}"), (org.to_owned(), agent.clone()));
        inner.registry_version += 1;
        Ok(inner.registry_version)
    }

    async fn registry_delete_agent(&self, org: &str, name: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let removed = inner.registry_agents.remove(&format!("{name}.{org}")).is_some();
        inner.registry_version += 1;
        Ok(removed)
    }

    async fn registry_put_credential(
        &self,
        kind: CredentialKind,
        record: &CredentialRecord,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let records = match kind {
            CredentialKind::ApiKey => &mut inner.registry_keys,
            CredentialKind::PrivateToken => &mut inner.registry_tokens,
        };
        records.insert(record.id.clone(), record.clone());
        inner.registry_version += 1;
        Ok(inner.registry_version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_consumed_once_until_it_expires() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token(sid, "a", Duration::from_millis(50)).await.unwrap());
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!(!store.consume_token(sid, "b", Duration::from_millis(50)).await.unwrap());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(store.consume_token(sid, "c", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn only_the_holder_releases() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token(sid, "a", Duration::from_secs(5)).await.unwrap());
        assert!(!store.release_token(sid, "b").await.unwrap());
        assert!(!store.consume_token(sid, "b", Duration::from_secs(5)).await.unwrap());
        assert!(store.release_token(sid, "a").await.unwrap());
        assert!(store.consume_token(sid, "b", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn session_updates_are_conditional_on_status() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        let set = |status| SessionRecord { status: Some(status), ..SessionRecord::default() };
        let (pending, active) = (Some(Status::Pending), Some(Status::Active));
        assert!(store.update_session(sid, &[None], &set(Status::Pending), None).await.unwrap());
        assert!(!store.update_session(sid, &[None], &set(Status::Pending), None).await.unwrap());
        assert!(store.update_session(sid, &[pending], &set(Status::Ended), None).await.unwrap());
        assert!(
            !store
                .update_session(sid, &[pending, active], &set(Status::Active), None)
                .await
                .unwrap()
        );
        let record = store.get_session(sid).await.unwrap().unwrap();
        assert_eq!(record.status, Some(Status::Ended));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_respect_the_cap_and_lapse() {
        let store = MemoryStore::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let short = Duration::from_millis(30);
        assert!(store.acquire_slot("x", a, 1, short).await.unwrap());
        assert!(!store.acquire_slot("x", b, 1, short).await.unwrap());
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(store.live_sessions("x").await.unwrap(), 0);
        assert!(store.acquire_slot("x", b, 1, Duration::from_secs(5)).await.unwrap());
        assert_eq!(store.claim_lapsed_leases("x", 10).await.unwrap(), vec![a]);
        assert!(store.claim_lapsed_leases("x", 10).await.unwrap().is_empty());
        assert_eq!(store.renew_leases("x", &[a, b], short).await.unwrap(), vec![a]);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_counts_per_bucket_and_window() {
        let store = MemoryStore::default();
        let window = Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(store.rate_limit("k", 3, window).await.unwrap());
        }
        assert!(!store.rate_limit("k", 3, window).await.unwrap());
        assert!(store.rate_limit("other", 3, window).await.unwrap());
        tokio::time::advance(window).await;
        assert!(store.rate_limit("k", 3, window).await.unwrap(), "a new window starts afresh");
    }
}
