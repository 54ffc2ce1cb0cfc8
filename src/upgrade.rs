//! WebSocket upgrades: the client's socket taken over from the HTTP server once the 101 is
//! written.
//!
//! actix-http hands a request that asks for a WebSocket (`Upgrade: websocket`) to an upgrade
//! service, with the connection itself. [`service`] passes the request through the same
//! application as any other, so routing, middleware and every refusal work as for plain
//! requests. A handler that accepts the upgrade answers with [`switch`]: the 101 and the work to
//! do on the socket. The 101 is written, and that work then runs on the socket directly, in the
//! connection's own task; any other answer is written whole and the connection closed.

use std::{future::Future, pin::Pin, rc::Rc};

use actix_codec::Framed;
use actix_http::{
    ConnectionType, Request, Response,
    body::{BodySize, BoxBody, MessageBody},
    h1::{Codec, Message},
};
use actix_service::{Service, ServiceFactory, fn_factory, fn_service};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, dev::AppConfig};
use futures_util::SinkExt;

/// The client's socket once upgraded.
pub type ClientSocket = tokio::net::TcpStream;

type Takeover = Box<dyn FnOnce(ClientSocket, Vec<u8>) -> Pin<Box<dyn Future<Output = ()>>>>;

/// The work to run on an upgraded socket, carried in the 101's extensions.
struct Switch(Takeover);

/// Answers a WebSocket handshake with `handshake` (a 101 built by
/// `actix_http::ws::handshake`), then runs `then` on the client's socket, with the bytes the
/// client sent after its request (the start of its first frames, if any).
pub fn switch<F, Fut>(mut handshake: actix_http::ResponseBuilder, then: F) -> HttpResponse
where
    F: FnOnce(ClientSocket, Vec<u8>) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let mut response = HttpResponse::from(handshake.finish().map_into_boxed_body());
    let takeover: Takeover = Box::new(move |socket, early| Box::pin(then(socket, early)));
    response.extensions_mut().insert(Switch(takeover));
    response
}

/// Marks a request the upgrade service passed on: only those can be upgraded.
struct Upgradable;

/// The 101 answering `req`'s WebSocket handshake, if it is one and arrived through the upgrade
/// service (a request with a body, say, never does: actix-http reads it as a plain request).
pub fn handshake(req: &HttpRequest) -> Option<actix_http::ResponseBuilder> {
    if !req.extensions().contains::<Upgradable>() {
        return None;
    }
    actix_http::ws::handshake(req.head()).ok()
}

/// The upgrade service of one worker: requests go through `app`, an instance of the same
/// application that serves the other requests.
pub fn service<A, B>(
    app: A,
) -> impl ServiceFactory<
    (Request, Framed<ClientSocket, Codec>),
    Config = (),
    Response = (),
    Error = actix_web::Error,
    InitError = (),
>
where
    A: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let app = Rc::new(app);
    fn_factory(move || {
        let app = app.clone();
        async move {
            let app = Rc::new(app.new_service(AppConfig::default()).await?);
            Ok(fn_service(move |(req, framed)| upgrade(app.clone(), req, framed)))
        }
    })
}

async fn upgrade<S, B>(
    app: Rc<S>,
    req: Request,
    mut framed: Framed<ClientSocket, Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = actix_web::dev::ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    req.extensions_mut().insert(Upgradable);
    let mut response: Response<BoxBody> = match app.call(req).await {
        Ok(response) => response.map_into_boxed_body().into(),
        Err(e) => e.error_response().into(),
    };
    let switch = response.extensions_mut().remove::<Switch>();
    let (mut head, body) = response.into_parts();
    match switch {
        Some(Switch(then)) if head.status() == actix_web::http::StatusCode::SWITCHING_PROTOCOLS => {
            drop(body);
            let written = framed.send(Message::Item((head, BodySize::None))).await;
            // Bytes the client sent after its request are its first frames. The HTTP buffers
            // themselves are let go here, with the rest of the HTTP state, not when the session
            // ends.
            let (socket, early) = {
                let parts = framed.into_parts();
                (parts.io, parts.read_buf.to_vec())
            };
            if written.is_err() {
                tracing::debug!("client gone before the 101 was written");
            }
            // The work runs even if the 101 could not be written: it owns a reserved session,
            // which it ends as the client's disconnect.
            then(socket, early).await;
            Ok(())
        }
        _ => {
            // Any other answer is written whole, and the connection closed after it.
            let body = actix_web::body::to_bytes(body).await.unwrap_or_default();
            head.head_mut().set_connection_type(ConnectionType::Close);
            let size = BodySize::Sized(body.len() as u64);
            // Head and body in one write: a client may read only what came with the head.
            framed.feed(Message::Item((head, size))).await?;
            if !body.is_empty() {
                framed.feed(Message::Chunk(Some(body))).await?;
            }
            framed.feed(Message::Chunk(None)).await?;
            framed.flush().await?;
            Ok(())
        }
    }
}
