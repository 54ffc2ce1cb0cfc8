//! The far-store figure: a broker whose Redis is behind a link that adds a fixed round-trip
//! time, as for a replica in another region than its Redis primary. A TCP proxy in the
//! generator's process delays every byte by half the RTT in each direction, in order.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
};

/// Largest read forwarded at once.
const CHUNK_BYTES: usize = 16 * 1024;

/// Listens on a free loopback port and forwards each connection to `upstream`, delaying each
/// direction by `one_way`, until the process ends. The proxy runs on a thread of its own (on the
/// generator's core): the harness blocks its own thread while a broker starts, and a broker
/// whose store does not answer then starts with its store unprepared.
pub fn delay_proxy(upstream: SocketAddr, one_way: Duration) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let listener = TcpListener::from_std(listener).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::task::spawn_local(forward(client_read, server_write, one_way));
                tokio::task::spawn_local(forward(server_read, client_write, one_way));
            }
        });
    });
    addr
}

/// Copies `from` to `to`, each chunk written `delay` after it was read: the link's latency,
/// without limiting its bandwidth.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::task::spawn_local(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.send((Instant::now() + delay, buf)).is_err() {
                    break;
                }
            }
        }
    }
}
