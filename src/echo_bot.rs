//! A bot that echoes every text and binary message back. It serves the built-in demo agent and
//! stands in for a Pipecat bot in local set-ups (`session-broker echo-bot`).

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

/// Largest message the echo bot accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Accepts connections on `listener` until the task is dropped, echoing on each.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_MESSAGE_BYTES))
                .max_frame_size(Some(MAX_MESSAGE_BYTES));
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    // tungstenite answers pings and close frames by itself.
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
    }
}
