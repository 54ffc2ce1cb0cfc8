//! The right to start one session, taken before the bot is dialled: the token consumed exactly
//! once, a concurrency slot, and the session's place on this replica. A reservation either
//! becomes a live session ([`Reservation::activate`]) or is let go whole
//! ([`Reservation::abandon`]): there is one way to undo it, so no path forgets a part.

use std::{sync::Arc, time::Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{
    agents::{Agent, WebsocketAuth},
    error::{ApiError, TokenRefusal},
    sessions::{EndReason, Registration, Status, Stop},
    state::AppState,
    store::StoreError,
    store::{SessionRecord, unix_ms},
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
    pub agent: Arc<Agent>,
    pub session_id: Uuid,
    pub connected_ms: u64,
    /// The session's place on this replica; dropped when it ends.
    pub registration: Registration,
    /// Fires when the session must end: terminated, lease lost or drain deadline.
    pub stop: oneshot::Receiver<Stop>,
}

/// What becomes of the token when a reservation is let go.
pub enum TokenFate {
    /// Given back, so the client may connect again within the token's lifetime; the record notes
    /// why this attempt failed.
    GiveBack(EndReason),
    /// Stays spent: the session was ended meanwhile.
    Spent,
}

impl Reservation {
    /// Consumes the token (when the agent requires one), then takes a slot under the agent's
    /// cap and registers the session on this replica. The cap is taken after the token so that
    /// a replay never touches it; at the cap the token is given back.
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
        let (session_id, minted_in, consumed, minted_body) = match token {
            None => (Uuid::new_v4(), state.region.clone(), None, false),
            Some(token) => consume(state, &agent, token, body.as_deref()).await?,
        };
        tracing::Span::current().record("session_id", tracing::field::display(session_id));
        let body = match minted_body && body.is_none() {
            false => body,
            true => match read_minted_body(state, session_id).await {
                Ok(body) => Some(body),
                Err(e) => {
                    give_back(state, session_id, consumed.as_deref()).await;
                    return Err(e);
                }
            },
        };
        let cap = state.cap_of(&agent);
        let slot = match state
            .store
            .acquire_slot(&agent.service_host, session_id, cap, state.leases.lease)
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                give_back(state, session_id, consumed.as_deref()).await;
                tracing::info!(%session_id, agent = %agent.service_host, "connect refused: agent at capacity");
                return Err(ApiError::AtCapacity);
            }
            // Failing open means no cap either: the session runs without a lease.
            Err(e) if state.fail_open => {
                tracing::warn!(%session_id, error = %e, "UNCHECKED ACCEPT: concurrency cap not enforced");
                false
            }
            Err(e) => {
                give_back(state, session_id, consumed.as_deref()).await;
                return Err(e.into());
            }
        };
        // Registered before the dial, so the lease is renewed from now on and a DELETE finds it.
        let (registration, stop) = state.live.register(session_id, &agent.service_host);
        Ok(Self { agent, session_id, minted_in, body, consumed, slot, registration, stop })
    }

    /// Marks the session active on this replica. A token session must still be pending (or
    /// unrecorded, if Redis lost it in a failover): if DELETE ended it meanwhile, the
    /// reservation is let go and the connect refused.
    pub async fn activate(self, state: &AppState) -> Result<Activated, ApiError> {
        let agent = &self.agent;
        let max_duration = agent.max_session_duration.min(state.max_session);
        let connected_ms = unix_ms();
        let active = SessionRecord {
            status: Some(Status::Active),
            // Sessions of agents without tokens have no record before this.
            created_ms: (agent.websocket_auth == WebsocketAuth::None).then_some(connected_ms),
            service: Some(agent.service_host.clone()),
            replica: Some(state.replica_id.clone()),
            region: Some(state.region.clone()),
            minted_region: Some(self.minted_in.clone()),
            connected_ms: Some(connected_ms),
            ..SessionRecord::default()
        };
        let from: &[Option<Status>] =
            if self.consumed.is_some() { &[None, Some(Status::Pending)] } else { &[None] };
        let ttl = state.active_record_ttl(max_duration);
        match state.store.update_session(self.session_id, from, &active, Some(ttl)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(session_id = %self.session_id, "connect refused: session was terminated");
                self.abandon(state, TokenFate::Spent).await;
                return Err(ApiError::TokenRefused(TokenRefusal::Terminated));
            }
            // The session goes on; its record says pending until it ends.
            Err(e) => {
                tracing::warn!(session_id = %self.session_id, error = %e, "could not mark the session active")
            }
        }
        let Self { agent, session_id, registration, stop, .. } = self;
        Ok(Activated { agent, session_id, connected_ms, registration, stop })
    }

    /// Lets go of everything the reservation holds: its place on this replica, its slot, and
    /// (per `token`) the token.
    pub async fn abandon(self, state: &AppState, token: TokenFate) {
        drop(self.registration);
        if self.slot {
            release_slot(state, &self.agent, self.session_id).await;
        }
        if let TokenFate::GiveBack(why) = token {
            give_back(state, self.session_id, self.consumed.as_deref()).await;
            if self.consumed.is_some() {
                let note = SessionRecord::connect_failed(why);
                let from = [Some(Status::Pending)];
                if let Err(e) =
                    state.store.update_session(self.session_id, &from, &note, None).await
                {
                    tracing::debug!(session_id = %self.session_id, error = %e, "could not note the failed connect");
                }
            }
        }
    }
}

/// Lets go of a session's concurrency slot. A slot that cannot be released lapses with its
/// lease, which is no longer renewed.
pub async fn release_slot(state: &AppState, agent: &Agent, sid: Uuid) {
    if let Err(e) = state.store.release_slot(&agent.service_host, sid).await {
        tracing::warn!(session_id = %sid, error = %e, "could not release the slot; it lapses with its lease");
    }
}

/// Verifies the token, checks that a `?body=` is the one minted with it, and consumes it,
/// exactly once across all replicas. Returns the session id, the minting region, the value
/// written to consume it (`None` when fail-open let the connect through unchecked), and whether
/// a body was minted with the token.
async fn consume(
    state: &AppState,
    agent: &Agent,
    token: &str,
    body: Option<&[u8]>,
) -> Result<(Uuid, String, Option<String>, bool), ApiError> {
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
    if let Some(body) = body
        && claims.bd.as_deref() != Some(&*body_digest(body))
    {
        return Err(refuse(TokenRefusal::BodyMismatch));
    }
    let minted_body = claims.bd.is_some();
    let holder = format!("{}:{}", state.replica_id, Uuid::new_v4().simple());
    // The mark needs to outlive the token only: after expiry the token is refused anyway. The
    // skew margin covers a replica whose clock runs behind this one's.
    let remaining = std::time::Duration::from_millis(claims.exp - now) + state.clock_skew;
    let consuming = Instant::now();
    let consumed = state.store.consume_token(claims.sid, &holder, remaining).await;
    let outcome = match consumed {
        Ok(true) => "consumed",
        Ok(false) => "already_used",
        Err(_) => "failed",
    };
    let histogram = state.metrics.token_consume_seconds.with_label_values(&[outcome]);
    histogram.observe(consuming.elapsed().as_secs_f64());
    match consumed {
        Ok(true) => Ok((claims.sid, claims.rg, Some(holder), minted_body)),
        Ok(false) => {
            if let Some(suppressed) = state.refusal_log.take() {
                tracing::info!(session_id = %claims.sid, agent = %agent.service_host, suppressed, "connect refused: token already used");
            }
            Err(ApiError::TokenRefused(TokenRefusal::Replayed))
        }
        // A consume that timed out may still have been applied: give it back once Redis
        // answers, so the client's retry finds the token unspent.
        Err(e @ crate::store::StoreError::Timeout { .. }) if !state.fail_open => {
            let (store, sid) = (state.store.clone(), claims.sid);
            tokio::spawn(async move { store.release_token(sid, &holder).await });
            Err(e.into())
        }
        Err(e) if state.fail_open => {
            state.metrics.unchecked_accepts.inc();
            let count = state.metrics.unchecked_accepts.get();
            tracing::warn!(
                session_id = %claims.sid, agent = %agent.service_host, error = %e,
                unchecked_accepts = count,
                "UNCHECKED ACCEPT: Redis unreachable and on_unavailable = open; the token's \
                 one-time use is not enforced for this connect"
            );
            Ok((claims.sid, claims.rg, None, minted_body))
        }
        Err(e) => Err(e.into()),
    }
}

/// The body minted with the token of `sid`, from its record.
async fn read_minted_body(state: &AppState, sid: Uuid) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let record = state.store.get_session(sid).await?;
    let body = record.and_then(|r| r.body).ok_or(StoreError::Missing { what: "minted body" })?;
    // Written by /start as standard base64.
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| StoreError::Missing { what: "minted body" }.into())
}

/// Gives a consumed token back, so the client can connect again within its lifetime.
async fn give_back(state: &AppState, sid: Uuid, holder: Option<&str>) {
    let Some(holder) = holder else { return };
    // If this fails the token stays spent: the client must call /start again.
    if let Err(e) = state.store.release_token(sid, holder).await {
        tracing::warn!(session_id = %sid, error = %e, "could not give the token back");
    }
}
