//! The right to start one session, taken before the bot is dialled: the token consumed exactly
//! once, a concurrency slot, and the session's place on this replica. A reservation either
//! becomes a live session ([`Reservation::activate`]) or is let go whole
//! ([`Reservation::abandon`]): there is one way to undo it, so no path forgets a part.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    agents::Agent,
    error::{ApiError, TokenRefusal},
    sessions::{EndReason, Registration, Status, Stop},
    state::AppState,
    store::{
        AbandonRequest, Connected, EventLog, Listing, OpenRequest, SessionEvent, SessionRecord,
        Store, StoreError, TokenUse, unix_ms,
    },
    token::{Claims, body_digest, redact},
};

pub struct Reservation {
    pub agent: Arc<Agent>,
    pub session_id: Uuid,
    /// Region that minted the token (this replica's for agents without tokens).
    pub minted_in: String,
    /// The body for the bot: the client's `?body=`, or the one minted with the token.
    pub body: Option<Vec<u8>>,
    /// When the session was opened: its record's `connected_ms`.
    pub connected_ms: u64,
    /// The token's consume, to give it back by; `None` for agents without tokens.
    token: Option<Consumed>,
    /// Whether the store holds the session open: its slot taken and its record active (not when
    /// fail-open let the connect through unchecked).
    opened: bool,
    registration: Registration,
    stop: oneshot::Receiver<Stop>,
}

/// What a token connect wrote to consume its token.
#[derive(Clone)]
struct Consumed {
    /// The value written in the mark; `None` when fail-open let the connect through unchecked.
    holder: Option<String>,
    /// How long the token could still be used at the connect: a record that goes back to
    /// pending lives that long.
    remaining: Duration,
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
}

impl Reservation {
    /// Takes the right to start the session, and starts it in the store, in one request: for a
    /// token agent the token's fence and record are checked and the token consumed; for every
    /// agent a slot is taken under its cap (at the cap, nothing stays written), the record marked
    /// active (created and listed for an agent without tokens) and the `connected` event logged.
    /// Then the session is registered on this replica. Nothing is left for the store to do
    /// between the bot's answer and the client's upgrade.
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
        let now = unix_ms();
        let claims = match token {
            None => None,
            Some(token) => Some(verify(state, &agent, token, body.as_deref(), now)?),
        };
        let (session_id, minted_in) = match &claims {
            Some(claims) => (claims.sid, claims.rg.clone()),
            None => (Uuid::new_v4(), state.region.clone()),
        };
        tracing::Span::current().record("session_id", tracing::field::display(session_id));
        let holder =
            claims.as_ref().map(|_| format!("{}:{}", state.replica_id, Uuid::new_v4().simple()));
        let token_use = claims.as_ref().zip(holder.as_deref()).map(|(claims, holder)| TokenUse {
            fence: &claims.fe,
            holder,
            // The mark needs to outlive the token only: after expiry the token is refused anyway.
            // The skew margin covers a replica whose clock runs behind this one's.
            mark_ttl: Duration::from_millis(claims.exp.saturating_sub(now)) + state.clock_skew,
            want_body: claims.bd.is_some() && body.is_none(),
        });
        let want_body = token_use.as_ref().is_some_and(|t| t.want_body);
        let consumed = token_use
            .as_ref()
            .map(|t| Consumed { holder: Some(t.holder.to_owned()), remaining: t.mark_ttl });
        let opened = open(state, &agent, session_id, &minted_in, token_use, now).await;
        let minted = settle(state, &agent, token, session_id, consumed.as_ref(), opened)?;
        // Registered before the dial, so the lease is renewed from now on and a DELETE finds it.
        let (registration, stop) = state.live.register(session_id, &agent.service_host);
        let opened = minted.is_some();
        let token = consumed.map(|c| Consumed { holder: c.holder.filter(|_| opened), ..c });
        let mut reservation = Self {
            agent,
            session_id,
            minted_in,
            body,
            connected_ms: now,
            token,
            opened,
            registration,
            stop,
        };
        if reservation.body.is_none() {
            match minted.flatten() {
                Some(minted) => match decode_minted(&minted) {
                    Ok(body) => reservation.body = Some(body),
                    Err(e) => {
                        reservation.abandon(state, None).await;
                        return Err(e);
                    }
                },
                None if want_body && opened => {
                    reservation.abandon(state, None).await;
                    return Err(StoreError::Missing { what: "minted body" }.into());
                }
                None => {}
            }
        }
        Ok(reservation)
    }

    /// Makes the reservation a live session, its bot having answered: the store already holds
    /// it as active; the `connected` event is logged in the background.
    pub fn activate(self, state: &AppState) -> Activated {
        let Self { agent, session_id, connected_ms, registration, stop, .. } = self;
        let text =
            format!("session {session_id} connected on {} ({})", state.replica_id, state.region);
        state.log_event(&agent.service_host, session_id, text);
        let session = ActiveSession { agent, session_id, connected_ms };
        Activated { session, registration, stop }
    }

    /// Lets go of everything the reservation holds, in one store request: its place on this
    /// replica, its slot, and its token, given back so the client may connect again within the
    /// token's lifetime. A token session's record goes back to pending and notes `why` this
    /// attempt failed; a session without a token ends with it.
    pub async fn abandon(self, state: &AppState, why: Option<EndReason>) {
        drop(self.registration);
        if !self.opened {
            return;
        }
        let sid = self.session_id;
        let text = match &self.token {
            Some(_) => format!("session {sid} could not reach its bot; the token stays usable"),
            None => format!("session {sid} could not reach its bot"),
        };
        let event = SessionEvent { at_ms: unix_ms(), session_id: sid, text };
        let (store, events, within) = (state.store.clone(), state.event_log(), state.leases.lease);
        let record_ttl = self.token.as_ref().map_or(state.leases.retention, |t| t.remaining);
        // The client's answer waits for the first try only; later ones go on in the background.
        let (first_tried, tried) = oneshot::channel();
        tokio::spawn(async move {
            let request = AbandonRequest {
                agent: &self.agent.service_host,
                sid,
                holder: self.token.as_ref().and_then(|t| t.holder.as_deref()),
                token: self.token.is_some(),
                why,
                record_ttl,
                event: why.is_some().then_some(&event),
                events,
            };
            let mut first_tried = Some(first_tried);
            // Tried again while the slot's lease, taken at the open, surely holds: a token
            // whose undo failed would stay spent, where the client was told it stays usable.
            let undone = super::retried(within / 2, || {
                let (attempt, first) = (store.abandon_session(&request), first_tried.take());
                async move {
                    let outcome = attempt.await;
                    if let Some(first) = first {
                        let _ = first.send(());
                    }
                    outcome
                }
            });
            if let Err(e) = undone.await {
                tracing::warn!(session_id = %sid, error = %e, "could not undo the connect; its slot lapses with its lease and its token stays spent");
            }
        }
        .in_current_span());
        let _ = tried.await;
    }
}

/// Opens the session in the store: see [`Store::open_session`]. Times the token's consume.
async fn open(
    state: &AppState,
    agent: &Agent,
    sid: Uuid,
    minted_in: &str,
    token: Option<TokenUse<'_>>,
    now: u64,
) -> Result<Connected, StoreError> {
    let host = &agent.service_host;
    let max_duration = agent.max_session_duration.min(state.max_session);
    let active = SessionRecord {
        status: Some(Status::Active),
        // Sessions of agents without tokens have no record before this.
        created_ms: token.is_none().then_some(now),
        service: Some(host.clone()),
        replica: Some(state.replica_id.clone()),
        region: Some(state.region.clone()),
        minted_region: Some(minted_in.to_owned()),
        connected_ms: Some(now),
        ..SessionRecord::default()
    };
    let retention = state.leases.retention;
    let timed = token.is_some();
    let request = OpenRequest {
        agent: host,
        sid,
        listing: token.is_none().then_some(Listing { agent: host, created_ms: now, retention }),
        token,
        cap: state.cap_of(agent),
        lease: state.leases.lease,
        active: &active,
        record_ttl: state.active_record_ttl(max_duration),
    };
    let opening = Instant::now();
    let opened = state.store.open_session(&request).await;
    if timed {
        let outcome = match &opened {
            Ok(Connected::Ok { .. }) => "consumed",
            Ok(Connected::Replayed | Connected::Terminated) => "already_used",
            Ok(Connected::Fenced) => "fenced",
            Ok(Connected::AtCapacity) => "at_capacity",
            Err(_) => "failed",
        };
        let histogram = state.metrics.token_consume_seconds.with_label_values(&[outcome]);
        histogram.observe(opening.elapsed().as_secs_f64());
    }
    opened
}

/// What the store's answer to an open means for the connect: `Some` with the minted body (if
/// asked for and there is one) when the session is open, `None` when fail-open let the connect
/// through unchecked, or the refusal.
fn settle(
    state: &AppState,
    agent: &Arc<Agent>,
    token: Option<&str>,
    sid: Uuid,
    consumed: Option<&Consumed>,
    opened: Result<Connected, StoreError>,
) -> Result<Option<Option<String>>, ApiError> {
    let refuse = |refusal| refused(state, agent, token.unwrap_or_default(), refusal);
    match opened {
        Ok(Connected::Ok { body }) => Ok(Some(body)),
        Ok(Connected::Replayed) => Err(refuse(TokenRefusal::Replayed)),
        Ok(Connected::Terminated) => Err(refuse(TokenRefusal::Terminated)),
        Ok(Connected::Fenced) => Err(refuse(TokenRefusal::StoreReset)),
        Ok(Connected::AtCapacity) => {
            tracing::info!(session_id = %sid, agent = %agent.service_host, "connect refused: agent at capacity");
            Err(ApiError::AtCapacity)
        }
        // A request that timed out may still be applied, late: undo it once Redis answers, so
        // that the client's retry finds the token unspent and the slot free.
        Err(e @ StoreError::Timeout { .. }) if !state.fail_open => {
            let (store, agent, events) = (state.store.clone(), agent.clone(), state.event_log());
            let token = consumed.cloned();
            let retention = state.leases.retention;
            tokio::spawn(async move {
                undo_late(&*store, &agent.service_host, sid, token, retention, events).await
            });
            Err(e.into())
        }
        Err(e) if state.fail_open => {
            state.metrics.unchecked_accepts.inc();
            let count = state.metrics.unchecked_accepts.get();
            tracing::warn!(
                session_id = %sid, agent = %agent.service_host, error = %e,
                unchecked_accepts = count,
                "UNCHECKED ACCEPT: Redis unreachable and on_unavailable = open; the token's \
                 one-time use and the concurrency cap are not enforced for this connect"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Verifies a connect's token for `agent`, and that a `?body=` is the one minted with it.
fn verify(
    state: &AppState,
    agent: &Agent,
    token: &str,
    body: Option<&[u8]>,
    now: u64,
) -> Result<Claims, ApiError> {
    let claims = state
        .signing_keys
        .verify(token, &agent.service_host, now)
        .map_err(|e| refused(state, agent, token, TokenRefusal::Invalid(e)))?;
    // Before anything is spent: a client cannot change what a trusted back end minted.
    if let Some(body) = body
        && claims.bd.as_deref() != Some(&*body_digest(body))
    {
        return Err(refused(state, agent, token, TokenRefusal::BodyMismatch));
    }
    Ok(claims)
}

/// A refused token, logged within the refusal log's budget.
fn refused(state: &AppState, agent: &Agent, token: &str, refusal: TokenRefusal) -> ApiError {
    if let Some(suppressed) = state.refusal_log.take() {
        let reason = refusal.reason();
        tracing::info!(agent = %agent.service_host, token = %redact(token), reason, suppressed, "connect refused");
    }
    ApiError::TokenRefused(refusal)
}

/// The body minted with a token, as its record keeps it (standard base64, written by /start).
fn decode_minted(stored: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(stored)
        .map_err(|_| StoreError::Missing { what: "minted body" }.into())
}

/// How often a late undo asks again.
const UNDO_RETRY: Duration = Duration::from_millis(200);

/// Undoes a connect whose store request timed out: the request may be waiting, unanswered, on a
/// connection the broker dropped, and run when Redis answers again. Asks until Redis has answered
/// twice, a retry apart (the late request runs no later than the turn of Redis's event loop that
/// answers the first), or until the token is past its life. An undo that finds nothing of the
/// connect changes nothing, so asking again is safe.
async fn undo_late(
    store: &dyn Store,
    agent: &str,
    sid: Uuid,
    token: Option<Consumed>,
    retention: Duration,
    events: EventLog,
) {
    let remaining = token.as_ref().map_or(retention, |t| t.remaining);
    let deadline = Instant::now() + remaining;
    let request = AbandonRequest {
        agent,
        sid,
        holder: token.as_ref().and_then(|t| t.holder.as_deref()),
        token: token.is_some(),
        why: None,
        record_ttl: remaining,
        event: None,
        events,
    };
    let mut answers = 0;
    while answers < 2 && Instant::now() < deadline {
        match store.abandon_session(&request).await {
            // The token was ours: so was the rest, undone with it.
            Ok(true) => return,
            Ok(false) => answers += 1,
            Err(_) => {}
        }
        tokio::time::sleep(UNDO_RETRY).await;
    }
}
