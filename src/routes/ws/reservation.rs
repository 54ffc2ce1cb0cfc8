//! The right to start one session, taken before the bot is dialled: the token consumed exactly
//! once, a concurrency slot, and the session's place on this replica. A reservation either
//! becomes a live session ([`Reservation::activate`]) or is let go whole
//! ([`Reservation::abandon`]): there is one way to undo it, so no path forgets a part.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{
    agents::{Agent, WebsocketAuth},
    error::{ApiError, TokenRefusal},
    sessions::{EndReason, Registration, Status, Stop},
    state::AppState,
    store::{ConnectRequest, Connected, Listing, SessionRecord, Store, StoreError, unix_ms},
    token::{body_digest, redact},
};

pub struct Reservation {
    pub agent: Arc<Agent>,
    pub session_id: Uuid,
    /// Region that minted the token (this replica's for agents without tokens).
    pub minted_in: String,
    /// The body for the bot: the client's `?body=`, or the one minted with the token.
    pub body: Option<Vec<u8>>,
    /// The value this connect wrote to consume the token, to give it back by; `None` for agents
    /// without tokens and for connects let through unchecked (fail-open).
    consumed: Option<String>,
    /// Whether a concurrency slot is held (not when fail-open let the connect through without).
    slot: bool,
    registration: Registration,
    stop: oneshot::Receiver<Stop>,
}

/// A reservation made live: what the running session holds until it ends.
pub struct Activated {
    pub session: ActiveSession,
    /// The session's place on this replica; dropped when it ends.
    pub registration: Registration,
    /// Fires when the session must end: terminated, lease lost or drain deadline.
    pub stop: oneshot::Receiver<Stop>,
}

/// What a live session's record says of it.
pub struct ActiveSession {
    pub agent: Arc<Agent>,
    pub session_id: Uuid,
    pub connected_ms: u64,
    /// Region that minted the token (this replica's for agents without tokens).
    minted_in: String,
    /// Whether the session came with a consumed token (and so has a pending record).
    token: bool,
}

impl Reservation {
    /// Takes the right to start the session, in one store request: for a token agent the token's
    /// fence and record are checked, the token consumed and a slot taken under the agent's cap
    /// (at the cap, the script gives the token back itself); without tokens, a slot. Then the
    /// session is registered on this replica.
    pub async fn take(
        state: &AppState,
        agent: Arc<Agent>,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Self, ApiError> {
        // A replica at its own limit refuses before any token is spent: another can take it.
        if state.live.len() >= state.max_live_sessions {
            return Err(ApiError::ReplicaBusy);
        }
        let (session_id, minted_in, consumed, body, slot) = match token {
            None => {
                let sid = Uuid::new_v4();
                let slot = take_slot(state, &agent, sid).await?;
                (sid, state.region.clone(), None, body, slot)
            }
            Some(token) => {
                let taken = consume(state, &agent, token, body).await?;
                let slot = taken.holder.is_some();
                (taken.sid, taken.minted_in, taken.holder, taken.body, slot)
            }
        };
        tracing::Span::current().record("session_id", tracing::field::display(session_id));
        // Registered before the dial, so the lease is renewed from now on and a DELETE finds it.
        let (registration, stop) = state.live.register(session_id, &agent.service_host);
        Ok(Self { agent, session_id, minted_in, body, consumed, slot, registration, stop })
    }

    /// Makes the reservation a live session. Its record is marked active by
    /// [`ActiveSession::record_active`], which runs beside the relay: the store is not waited for
    /// between the bot's answer and the client's upgrade.
    pub fn activate(self) -> Activated {
        let Self { agent, session_id, minted_in, consumed, registration, stop, .. } = self;
        let connected_ms = unix_ms();
        let token = consumed.is_some();
        let session = ActiveSession { agent, session_id, connected_ms, minted_in, token };
        Activated { session, registration, stop }
    }

    /// Lets go of everything the reservation holds: its place on this replica, its slot and its
    /// token, given back so the client may connect again within the token's lifetime; the record
    /// notes `why` this attempt failed.
    pub async fn abandon(self, state: &AppState, why: EndReason) {
        drop(self.registration);
        let host = &self.agent.service_host;
        if self.slot {
            release_slot(state, &self.agent, self.session_id).await;
        }
        give_back(state, host, self.session_id, self.consumed.as_deref()).await;
        if self.consumed.is_some() {
            let note = SessionRecord::connect_failed(why);
            let from = [Some(Status::Pending)];
            if let Err(e) =
                state.store.update_session(host, self.session_id, &from, &note, None).await
            {
                tracing::debug!(session_id = %self.session_id, error = %e, "could not note the failed connect");
            }
        }
    }
}

impl ActiveSession {
    /// Marks the session's record active (creating it for an agent without tokens). A token
    /// session's record must still be pending: if DELETE ended it meanwhile, the record stays
    /// ended, and the termination reaches the session through the store's announcement (or,
    /// failing that, its next lease renewal), which closes it.
    pub async fn record_active(&self, state: &AppState) {
        let agent = &self.agent;
        let max_duration = agent.max_session_duration.min(state.max_session);
        let active = SessionRecord {
            status: Some(Status::Active),
            // Sessions of agents without tokens have no record before this.
            created_ms: (!self.token).then_some(self.connected_ms),
            service: Some(agent.service_host.clone()),
            replica: Some(state.replica_id.clone()),
            region: Some(state.region.clone()),
            minted_region: Some(self.minted_in.clone()),
            connected_ms: Some(self.connected_ms),
            ..SessionRecord::default()
        };
        // A token session's record is pending, or missing when fail-open let it in unchecked.
        let from: &[Option<Status>] =
            if self.token { &[None, Some(Status::Pending)] } else { &[None] };
        let ttl = state.active_record_ttl(max_duration);
        let (host, sid) = (&agent.service_host, self.session_id);
        let marked = state.store.update_session(host, sid, from, &active, Some(ttl));
        // Token sessions were listed when minted; the others begin here, in the same round trip.
        let listed = async {
            if agent.websocket_auth == WebsocketAuth::Token {
                return Ok(());
            }
            let retention = state.leases.retention;
            let listing = Listing { agent: host, created_ms: self.connected_ms, retention };
            state.store.index_session(sid, listing).await
        };
        let (marked, listed) = futures_util::future::join(marked, listed).await;
        if let Err(e) = listed {
            tracing::warn!(session_id = %sid, error = %e, "could not list the session");
        }
        match marked {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(session_id = %sid, "session was terminated while it connected")
            }
            // The session goes on; its record says pending until it ends.
            Err(e) => {
                tracing::warn!(session_id = %sid, error = %e, "could not mark the session active")
            }
        }
    }
}

/// Takes a slot under the agent's cap for a session without a token. Failing open means no cap
/// either: the session runs without a lease. Returns whether a slot is held.
async fn take_slot(state: &AppState, agent: &Agent, sid: Uuid) -> Result<bool, ApiError> {
    let cap = state.cap_of(agent);
    match state.store.acquire_slot(&agent.service_host, sid, cap, state.leases.lease).await {
        Ok(true) => Ok(true),
        Ok(false) => {
            tracing::info!(session_id = %sid, agent = %agent.service_host, "connect refused: agent at capacity");
            Err(ApiError::AtCapacity)
        }
        Err(e) if state.fail_open => {
            tracing::warn!(session_id = %sid, error = %e, "UNCHECKED ACCEPT: concurrency cap not enforced");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Lets go of a session's concurrency slot. A slot that cannot be released lapses with its
/// lease, which is no longer renewed.
pub async fn release_slot(state: &AppState, agent: &Agent, sid: Uuid) {
    if let Err(e) = state.store.release_slot(&agent.service_host, sid).await {
        tracing::warn!(session_id = %sid, error = %e, "could not release the slot; it lapses with its lease");
    }
}

/// What a token connect took: the session, where it was minted, the value written to consume
/// the token (`None` when fail-open let the connect through unchecked, without a slot), and the
/// body for the bot.
struct Taken {
    sid: Uuid,
    minted_in: String,
    holder: Option<String>,
    body: Option<Vec<u8>>,
}

/// Verifies the token, checks that a `?body=` is the one minted with it, then in one store
/// request checks the token's fence, consumes it exactly once across all replicas, takes a slot,
/// and reads the minted body when the client sent none.
async fn consume(
    state: &AppState,
    agent: &Agent,
    token: &str,
    body: Option<Vec<u8>>,
) -> Result<Taken, ApiError> {
    let now = unix_ms();
    let refuse = |refusal: TokenRefusal| {
        if let Some(suppressed) = state.refusal_log.take() {
            let reason = refusal.reason();
            tracing::info!(agent = %agent.service_host, token = %redact(token), reason, suppressed, "connect refused");
        }
        ApiError::TokenRefused(refusal)
    };
    let claims = state
        .signing_keys
        .verify(token, &agent.service_host, now)
        .map_err(|e| refuse(TokenRefusal::Invalid(e)))?;
    // Before anything is spent: a client cannot change what a trusted back end minted.
    if let Some(body) = &body
        && claims.bd.as_deref() != Some(&*body_digest(body))
    {
        return Err(refuse(TokenRefusal::BodyMismatch));
    }
    let holder = format!("{}:{}", state.replica_id, Uuid::new_v4().simple());
    let request = ConnectRequest {
        agent: &agent.service_host,
        sid: claims.sid,
        fence: &claims.fe,
        holder: &holder,
        // The mark needs to outlive the token only: after expiry the token is refused anyway.
        // The skew margin covers a replica whose clock runs behind this one's.
        mark_ttl: Duration::from_millis(claims.exp - now) + state.clock_skew,
        cap: state.cap_of(agent),
        lease: state.leases.lease,
        want_body: claims.bd.is_some() && body.is_none(),
    };
    let consuming = Instant::now();
    let connected = state.store.connect_session(&request).await;
    let outcome = match &connected {
        Ok(Connected::Ok { .. }) => "consumed",
        Ok(Connected::Replayed | Connected::Terminated) => "already_used",
        Ok(Connected::Fenced) => "fenced",
        Ok(Connected::AtCapacity) => "at_capacity",
        Err(_) => "failed",
    };
    let histogram = state.metrics.token_consume_seconds.with_label_values(&[outcome]);
    histogram.observe(consuming.elapsed().as_secs_f64());
    let (sid, minted_in) = (claims.sid, claims.rg);
    match connected {
        Ok(Connected::Ok { body: minted }) => {
            let body = match (body, minted) {
                (Some(body), _) => Some(body),
                (None, Some(minted)) => Some(decode_minted(&minted)?),
                (None, None) if request.want_body => {
                    give_back(state, &agent.service_host, sid, Some(&holder)).await;
                    release_slot(state, agent, sid).await;
                    return Err(StoreError::Missing { what: "minted body" }.into());
                }
                (None, None) => None,
            };
            Ok(Taken { sid, minted_in, holder: Some(holder), body })
        }
        Ok(Connected::Replayed) => Err(refuse(TokenRefusal::Replayed)),
        Ok(Connected::Terminated) => Err(refuse(TokenRefusal::Terminated)),
        Ok(Connected::Fenced) => Err(refuse(TokenRefusal::StoreReset)),
        Ok(Connected::AtCapacity) => {
            tracing::info!(session_id = %sid, agent = %agent.service_host, "connect refused: agent at capacity");
            Err(ApiError::AtCapacity)
        }
        // A request that timed out may still be applied, late: give the token and the slot
        // back once Redis answers, so the client's retry finds the token unspent.
        Err(e @ StoreError::Timeout { .. }) if !state.fail_open => {
            let store = state.store.clone();
            let (host, ttl) = (agent.service_host.clone(), request.mark_ttl);
            tokio::spawn(async move { give_back_late(&*store, &host, sid, &holder, ttl).await });
            Err(e.into())
        }
        Err(e) if state.fail_open => {
            state.metrics.unchecked_accepts.inc();
            let count = state.metrics.unchecked_accepts.get();
            tracing::warn!(
                session_id = %sid, agent = %agent.service_host, error = %e,
                unchecked_accepts = count,
                "UNCHECKED ACCEPT: Redis unreachable and on_unavailable = open; the token's \
                 one-time use is not enforced for this connect"
            );
            Ok(Taken { sid, minted_in, holder: None, body })
        }
        Err(e) => Err(e.into()),
    }
}

/// The body minted with a token, as its record keeps it (standard base64, written by /start).
fn decode_minted(stored: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(stored)
        .map_err(|_| StoreError::Missing { what: "minted body" }.into())
}

/// How often a late give-back asks again.
const GIVE_BACK_RETRY: Duration = Duration::from_millis(200);

/// Gives back the token and slot of a connect whose store request timed out: the request may be
/// waiting, unanswered, on a connection the broker dropped, and run when Redis answers again.
/// Asks until Redis has answered twice, a retry apart (the late request runs no later than the
/// turn of Redis's event loop that answers the first), or until the token is past its life.
async fn give_back_late(store: &dyn Store, agent: &str, sid: Uuid, holder: &str, ttl: Duration) {
    let deadline = Instant::now() + ttl;
    let mut answers = 0;
    while answers < 2 && Instant::now() < deadline {
        match store.release_token(agent, sid, holder).await {
            // Ours: so was the slot, taken by the same request.
            Ok(true) => {
                if let Err(e) = store.release_slot(agent, sid).await {
                    tracing::warn!(session_id = %sid, error = %e, "could not release the slot; it lapses with its lease");
                }
                return;
            }
            Ok(false) => answers += 1,
            Err(_) => {}
        }
        tokio::time::sleep(GIVE_BACK_RETRY).await;
    }
}

/// Gives a consumed token back, so the client can connect again within its lifetime.
async fn give_back(state: &AppState, agent: &str, sid: Uuid, holder: Option<&str>) {
    let Some(holder) = holder else { return };
    // If this fails the token stays spent: the client must call /start again.
    if let Err(e) = state.store.release_token(agent, sid, holder).await {
        tracing::warn!(session_id = %sid, error = %e, "could not give the token back");
    }
}
