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
    AbandonRequest, Connected, CredentialKind, CredentialRecord, DeployedAgent, EndRequest,
    Listing, MintRequest, Minted, OpenRequest, RegistryEntries, RegistryStore, SessionEvent,
    SessionRecord, SessionStore, Status, StoreError, TERMINATION_BACKLOG,
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
    /// This store's fence: its memory is this process's, so a token minted by an earlier
    /// process (whose consumes are gone) carries another and is refused.
    fence: String,
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
            fence: format!("mem{}", Uuid::new_v4().simple()),
            terminations: broadcast::channel(TERMINATION_BACKLOG).0,
        }
    }
}

/// Live (unlapsed) leases of `agent`.
fn live_count(inner: &Inner, agent: &str, now: Instant) -> u64 {
    inner.leases.get(agent).map_or(0, |l| l.values().filter(|&&at| at > now).count()) as u64
}

/// Adds session `sid` to its agent's list.
fn index(inner: &mut Inner, sid: Uuid, listing: Listing<'_>) {
    let index = inner.session_index.entry(listing.agent.to_owned()).or_default();
    index.push((listing.created_ms, sid));
}

/// Adds `event` to `agent`'s log, which keeps the newest `cap`.
fn push_event(inner: &mut Inner, agent: &str, event: &SessionEvent, cap: usize) {
    let events = inner.events.entry(agent.to_owned()).or_default();
    events.push_front(event.clone());
    events.truncate(cap);
}

impl MemoryStore {
    /// Counts a call against `bucket` in the current fixed window of length `window`; returns
    /// whether it stays within `limit`.
    fn count(&self, inner: &mut Inner, bucket: &str, limit: u64, window: Duration) -> bool {
        let window_ms = window.as_millis().max(1) as u64;
        let elapsed = self.started.elapsed().as_millis() as u64;
        // Windows are identified by the time they end, which also tells the sweep when to drop them.
        let window_end = (elapsed / window_ms + 1) * window_ms;
        let entry = inner.rates.entry(bucket.to_owned()).or_insert((window_end, 0));
        if entry.0 != window_end {
            *entry = (window_end, 0);
        }
        entry.1 += 1;
        entry.1 <= limit
    }

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
    async fn mint_session(&self, mint: &MintRequest<'_>) -> Result<Minted, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut within = true;
        for rate in mint.rates {
            within &= self.count(&mut inner, &rate.bucket, rate.limit, mint.rate_window);
        }
        if !within {
            return Ok(Minted::RateLimited);
        }
        if live_count(&inner, mint.agent, now) >= u64::from(mint.cap) {
            return Ok(Minted::AtCapacity);
        }
        let Some((record, ttl, listing)) = mint.record else {
            return Ok(Minted::Ok { fence: None });
        };
        let record = Record { record: record.clone(), expires: Some(now + ttl) };
        inner.sessions.insert(mint.sid, record);
        index(&mut inner, mint.sid, listing);
        Ok(Minted::Ok { fence: Some(self.fence.clone()) })
    }

    async fn open_session(&self, open: &OpenRequest<'_>) -> Result<Connected, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let sid = open.sid;
        let mut body = None;
        if let Some(token) = &open.token {
            // Tokens minted by another process (before a restart) carry another fence: their
            // consumes were lost with that process's memory.
            let record = inner.sessions.get(&sid).filter(|r| r.expires.is_none_or(|at| at > now));
            let Some(record) = record.filter(|_| token.fence == self.fence) else {
                return Ok(Connected::Fenced);
            };
            let status = record.record.status;
            body = record.record.body.clone().filter(|_| token.want_body);
            let held = inner.tokens.get(&sid).filter(|c| c.expires > now);
            match held.map(|c| c.holder.as_str()) {
                Some("terminated") => return Ok(Connected::Terminated),
                None if status == Some(Status::Ended) => return Ok(Connected::Terminated),
                Some(holder) if holder != token.holder => return Ok(Connected::Replayed),
                // Ended after this caller's first attempt consumed: the token stays spent.
                Some(_) if status == Some(Status::Ended) => return Ok(Connected::Terminated),
                _ => {}
            }
        }
        let slotted = inner.leases.get(open.agent).is_some_and(|l| l.contains_key(&sid));
        if !slotted && live_count(&inner, open.agent, now) >= u64::from(open.cap) {
            inner.tokens.remove(&sid);
            return Ok(Connected::AtCapacity);
        }
        if let Some(token) = &open.token {
            let consumed =
                Consumed { holder: token.holder.to_owned(), expires: now + token.mark_ttl };
            inner.tokens.insert(sid, consumed);
        }
        inner.leases.entry(open.agent.to_owned()).or_default().insert(sid, now + open.lease);
        let record = inner
            .sessions
            .entry(sid)
            .or_insert_with(|| Record { record: SessionRecord::default(), expires: None });
        record.record.merge(open.active);
        record.expires = Some(now + open.record_ttl);
        if let Some(listing) = open.listing {
            index(&mut inner, sid, listing);
        }
        Ok(Connected::Ok { body })
    }

    async fn end_session(&self, end: &EndRequest<'_>) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let record =
            inner.sessions.get_mut(&end.sid).filter(|r| r.expires.is_none_or(|at| at > now));
        let applied = match record {
            Some(r) if matches!(r.record.status, Some(Status::Pending | Status::Active)) => {
                r.record.merge(end.ended);
                r.expires = Some(now + end.retention);
                true
            }
            _ => false,
        };
        if let Some(leases) = inner.leases.get_mut(end.agent) {
            leases.remove(&end.sid);
        }
        push_event(&mut inner, end.agent, end.event, end.events.cap);
        Ok(applied)
    }

    async fn abandon_session(&self, abandon: &AbandonRequest<'_>) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let sid = abandon.sid;
        if let Some(leases) = inner.leases.get_mut(abandon.agent) {
            leases.remove(&sid);
        }
        let record = inner.sessions.get_mut(&sid).filter(|r| r.expires.is_none_or(|at| at > now));
        let mut ended = true;
        if let Some(r) = record {
            if r.record.status == Some(Status::Active) {
                let record = &mut r.record;
                if abandon.token {
                    record.status = Some(Status::Pending);
                    record.last_error = abandon.why.or(record.last_error);
                    (record.replica, record.region, record.connected_ms) = (None, None, None);
                } else {
                    record.status = Some(Status::Ended);
                    record.end_reason = abandon.why;
                    record.ended_ms = Some(super::unix_ms());
                    record.detail = Some(match abandon.why {
                        Some(_) => "the bot could not be reached".into(),
                        None => "the connect was refused: the store answered too late".into(),
                    });
                }
                r.expires = Some(now + abandon.record_ttl);
            }
            ended = r.record.status == Some(Status::Ended);
        }
        let ours = abandon.holder.is_some_and(|holder| {
            inner.tokens.get(&sid).is_some_and(|c| c.expires > now && c.holder == holder)
        });
        let given_back = ours && !ended;
        if given_back {
            inner.tokens.remove(&sid);
        }
        if let Some(event) = abandon.event {
            push_event(&mut inner, abandon.agent, event, abandon.events.cap);
        }
        Ok(given_back)
    }

    async fn consume_token(
        &self,
        _agent: &str,
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

    async fn release_token(
        &self,
        _agent: &str,
        sid: Uuid,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let ended =
            inner.sessions.get(&sid).is_some_and(|r| r.record.status == Some(Status::Ended));
        if !ended && inner.tokens.get(&sid).is_some_and(|c| c.holder == holder) {
            inner.tokens.remove(&sid);
            return Ok(true);
        }
        Ok(false)
    }

    async fn check(&self) -> Result<(), StoreError> {
        drop(self.lock());
        Ok(())
    }

    async fn update_session(
        &self,
        _agent: &str,
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

    async fn get_session(
        &self,
        _agent: &str,
        sid: Uuid,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let record = inner.sessions.get(&sid).filter(|r| r.expires.is_none_or(|at| at > now));
        Ok(record.map(|r| r.record.clone()))
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
        Ok(live_count(&self.lock(), agent, Instant::now()))
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
        push_event(&mut self.lock(), agent, event, cap);
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
    use crate::store::{EndReason, EventLog, RateCount, TokenUse};

    #[tokio::test(start_paused = true)]
    async fn a_token_is_consumed_once_until_it_expires() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token("a.o", sid, "a", Duration::from_millis(50)).await.unwrap());
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!(!store.consume_token("a.o", sid, "b", Duration::from_millis(50)).await.unwrap());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(store.consume_token("a.o", sid, "c", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn only_the_holder_releases() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token("a.o", sid, "a", Duration::from_secs(5)).await.unwrap());
        assert!(!store.release_token("a.o", sid, "b").await.unwrap());
        assert!(!store.consume_token("a.o", sid, "b", Duration::from_secs(5)).await.unwrap());
        assert!(store.release_token("a.o", sid, "a").await.unwrap());
        assert!(store.consume_token("a.o", sid, "b", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn session_updates_are_conditional_on_status() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        let set = |status| SessionRecord { status: Some(status), ..SessionRecord::default() };
        let (pending, active) = (Some(Status::Pending), Some(Status::Active));
        assert!(
            store.update_session("a.o", sid, &[None], &set(Status::Pending), None).await.unwrap()
        );
        assert!(
            !store.update_session("a.o", sid, &[None], &set(Status::Pending), None).await.unwrap()
        );
        assert!(
            store.update_session("a.o", sid, &[pending], &set(Status::Ended), None).await.unwrap()
        );
        assert!(
            !store
                .update_session("a.o", sid, &[pending, active], &set(Status::Active), None)
                .await
                .unwrap()
        );
        let record = store.get_session("a.o", sid).await.unwrap().unwrap();
        assert_eq!(record.status, Some(Status::Ended));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_respect_the_cap_and_lapse() {
        let store = MemoryStore::default();
        let opening = Opening::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let short = Duration::from_millis(30);
        let open = |sid, lease| opening.open(&store, "x", sid, None, lease);
        assert!(matches!(open(a, short).await.unwrap(), Connected::Ok { .. }));
        assert_eq!(open(b, short).await.unwrap(), Connected::AtCapacity);
        assert!(store.get_session("x", b).await.unwrap().is_none(), "nothing written at the cap");
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(store.live_sessions("x").await.unwrap(), 0);
        assert!(matches!(open(b, Duration::from_secs(5)).await.unwrap(), Connected::Ok { .. }));
        assert_eq!(store.claim_lapsed_leases("x", 10).await.unwrap(), vec![a]);
        assert!(store.claim_lapsed_leases("x", 10).await.unwrap().is_empty());
        assert_eq!(store.renew_leases("x", &[a, b], short).await.unwrap(), vec![a]);
    }

    /// What a connect writes besides its token (the active record), and an event to log.
    struct Opening {
        active: SessionRecord,
        event: SessionEvent,
    }

    impl Opening {
        fn new() -> Self {
            let active = SessionRecord {
                status: Some(Status::Active),
                service: Some("a.o".into()),
                replica: Some("r1".into()),
                connected_ms: Some(1),
                ..SessionRecord::default()
            };
            let event =
                SessionEvent { at_ms: 1, session_id: Uuid::nil(), text: "connected".into() };
            Self { active, event }
        }

        /// Opens `sid` of `agent` under a cap of 1, listed when it has no token.
        async fn open(
            &self,
            store: &MemoryStore,
            agent: &str,
            sid: Uuid,
            token: Option<TokenUse<'_>>,
            lease: Duration,
        ) -> Result<Connected, StoreError> {
            let listing = Listing { agent, created_ms: 1, retention: Duration::from_secs(60) };
            let request = OpenRequest {
                agent,
                sid,
                listing: token.is_none().then_some(listing),
                token,
                cap: 1,
                lease,
                active: &self.active,
                record_ttl: Duration::from_secs(60),
            };
            store.open_session(&request).await
        }
    }

    /// A `/start` that counts against `rates` and writes a pending record of `sid`.
    fn mint<'a>(sid: Uuid, rates: &'a [RateCount], record: &'a SessionRecord) -> MintRequest<'a> {
        let listing = Listing { agent: "a.o", created_ms: 0, retention: Duration::from_secs(60) };
        MintRequest {
            agent: "a.o",
            sid,
            cap: 1,
            rates,
            rate_window: Duration::from_secs(3600),
            record: Some((record, Duration::from_secs(60), listing)),
        }
    }

    fn token<'a>(fence: &'a str, holder: &'a str) -> Option<TokenUse<'a>> {
        Some(TokenUse { fence, holder, mark_ttl: Duration::from_secs(60), want_body: true })
    }

    #[tokio::test(start_paused = true)]
    async fn mints_count_against_each_rate_per_window() {
        let store = MemoryStore::default();
        let record = SessionRecord { status: Some(Status::Pending), ..SessionRecord::default() };
        let rates = [RateCount { bucket: "k".into(), limit: 3 }];
        for _ in 0..3 {
            let minted = store.mint_session(&mint(Uuid::new_v4(), &rates, &record)).await;
            assert!(matches!(minted.unwrap(), Minted::Ok { fence: Some(_) }));
        }
        let sid = Uuid::new_v4();
        let limited = store.mint_session(&mint(sid, &rates, &record)).await.unwrap();
        assert_eq!(limited, Minted::RateLimited);
        assert!(store.get_session("a.o", sid).await.unwrap().is_none(), "nothing written");
        let other = [RateCount { bucket: "other".into(), limit: 3 }];
        let minted = store.mint_session(&mint(Uuid::new_v4(), &other, &record)).await.unwrap();
        assert!(matches!(minted, Minted::Ok { .. }));
        tokio::time::advance(Duration::from_secs(3600)).await;
        let minted = store.mint_session(&mint(Uuid::new_v4(), &rates, &record)).await.unwrap();
        assert!(matches!(minted, Minted::Ok { .. }), "a new window starts afresh");
    }

    #[tokio::test]
    async fn a_connect_is_fenced_consumed_once_and_capped() {
        let store = MemoryStore::default();
        let record = SessionRecord {
            status: Some(Status::Pending),
            body: Some("e30=".into()),
            ..SessionRecord::default()
        };
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let Minted::Ok { fence: Some(fence) } =
            store.mint_session(&mint(a, &[], &record)).await.unwrap()
        else {
            panic!("minted")
        };
        store.mint_session(&mint(b, &[], &record)).await.unwrap();
        let opening = Opening::new();
        let connect = |sid, fence, holder| {
            opening.open(&store, "a.o", sid, token(fence, holder), Duration::from_secs(60))
        };
        // Another process's fence: its consumes are not here to be checked.
        assert_eq!(connect(a, "mem-other", "h1").await.unwrap(), Connected::Fenced);
        let first = connect(a, &fence, "h1").await.unwrap();
        assert_eq!(first, Connected::Ok { body: Some("e30=".into()) });
        let active = store.get_session("a.o", a).await.unwrap().unwrap();
        assert_eq!((active.status, active.replica.as_deref()), (Some(Status::Active), Some("r1")));
        assert_eq!(connect(a, &fence, "h2").await.unwrap(), Connected::Replayed);
        // At the cap of 1 the consume is undone: the token is still good once a slot frees.
        assert_eq!(connect(b, &fence, "h3").await.unwrap(), Connected::AtCapacity);
        let pending = store.get_session("a.o", b).await.unwrap().unwrap();
        assert_eq!(pending.status, Some(Status::Pending), "a refused connect writes nothing");
        store.release_slot("a.o", a).await.unwrap();
        assert!(matches!(connect(b, &fence, "h4").await.unwrap(), Connected::Ok { .. }));
        // A session never minted (or lost) is fenced too.
        let unknown = connect(Uuid::new_v4(), &fence, "h5").await.unwrap();
        assert_eq!(unknown, Connected::Fenced);
    }

    #[tokio::test]
    async fn an_abandoned_connect_gives_its_token_back_and_its_record_goes_back_to_pending() {
        let store = MemoryStore::default();
        let record = SessionRecord { status: Some(Status::Pending), ..SessionRecord::default() };
        let sid = Uuid::new_v4();
        let Minted::Ok { fence: Some(fence) } =
            store.mint_session(&mint(sid, &[], &record)).await.unwrap()
        else {
            panic!("minted")
        };
        let opening = Opening::new();
        let open = |holder| {
            opening.open(&store, "a.o", sid, token(&fence, holder), Duration::from_secs(60))
        };
        assert!(matches!(open("h1").await.unwrap(), Connected::Ok { .. }));
        let abandon = |holder, token| AbandonRequest {
            agent: "a.o",
            sid,
            holder,
            token,
            why: Some(EndReason::BotUnreachable),
            record_ttl: Duration::from_secs(60),
            event: Some(&opening.event),
            events: EventLog { cap: 10, retention: Duration::from_secs(60) },
        };
        assert!(store.abandon_session(&abandon(Some("h1"), true)).await.unwrap());
        let pending = store.get_session("a.o", sid).await.unwrap().unwrap();
        assert_eq!(pending.status, Some(Status::Pending));
        assert_eq!(pending.last_error, Some(EndReason::BotUnreachable));
        assert_eq!((pending.replica, pending.connected_ms), (None, None), "not held anywhere");
        assert_eq!(store.live_sessions("a.o").await.unwrap(), 0, "the slot is free");
        assert!(matches!(open("h2").await.unwrap(), Connected::Ok { .. }), "the token works again");

        // Without a token, the session ends with the failure.
        let open_sid = Uuid::new_v4();
        opening.open(&store, "b.o", open_sid, None, Duration::from_secs(60)).await.unwrap();
        let abandon = AbandonRequest { agent: "b.o", sid: open_sid, ..abandon(None, false) };
        assert!(!store.abandon_session(&abandon).await.unwrap());
        let ended = store.get_session("b.o", open_sid).await.unwrap().unwrap();
        assert_eq!(ended.status, Some(Status::Ended));
        assert_eq!(ended.end_reason, Some(EndReason::BotUnreachable));
        assert_eq!(store.events("b.o").await.unwrap().len(), 1, "the failure: it never connected");

        // A connect refused because the store answered late, whose open ran after all: ended,
        // with no reason, and no event of its own.
        let late_sid = Uuid::new_v4();
        opening.open(&store, "b.o", late_sid, None, Duration::from_secs(60)).await.unwrap();
        let late = AbandonRequest { sid: late_sid, why: None, event: None, ..abandon };
        assert!(!store.abandon_session(&late).await.unwrap());
        let ended = store.get_session("b.o", late_sid).await.unwrap().unwrap();
        assert_eq!((ended.status, ended.end_reason), (Some(Status::Ended), None));
        assert_eq!(store.live_sessions("b.o").await.unwrap(), 0);
        assert_eq!(store.events("b.o").await.unwrap().len(), 1, "no event of its own");
    }

    #[tokio::test]
    async fn an_end_keeps_a_termination_and_frees_the_slot_either_way() {
        let store = MemoryStore::default();
        let opening = Opening::new();
        let sid = Uuid::new_v4();
        opening.open(&store, "b.o", sid, None, Duration::from_secs(60)).await.unwrap();
        let terminated = SessionRecord::ended(EndReason::Terminated, "api", Some(1), 2);
        let live = [Some(Status::Pending), Some(Status::Active)];
        assert!(store.update_session("b.o", sid, &live, &terminated, None).await.unwrap());
        let closed = SessionRecord::ended(EndReason::ClientClosed, "bye", Some(1), 3);
        let end = EndRequest {
            agent: "b.o",
            sid,
            ended: &closed,
            retention: Duration::from_secs(60),
            event: &opening.event,
            events: EventLog { cap: 10, retention: Duration::from_secs(60) },
        };
        assert!(!store.end_session(&end).await.unwrap(), "the first end reason stays");
        let record = store.get_session("b.o", sid).await.unwrap().unwrap();
        assert_eq!(record.end_reason, Some(EndReason::Terminated));
        assert_eq!(store.live_sessions("b.o").await.unwrap(), 0);
    }
}
