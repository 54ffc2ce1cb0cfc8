//! The public listener's server: worker threads that each accept on the listener themselves and
//! serve their connections on their own single-threaded runtime.
//!
//! actix-server accepts on a thread of its own and hands each connection to a worker over a
//! channel: a thread switch and a wake-up for every connection, about a twentieth of the broker's
//! CPU per session (BENCHMARKS.md). Here the worker that is woken by a connection is the one that
//! serves it. A listener bound with `SO_REUSEPORT` ([`bind`], what the broker binds itself) gives
//! each worker a socket of its own, among which the kernel spreads connections, so that one
//! connection wakes one worker; a listener bound elsewhere without it is shared, and every idle
//! worker wakes for each connection (one of them accepts it). What actix-server also gave is kept: a limit on each worker's connections (past it
//! the worker stops accepting until one closes), a pause after an accept error (a process out of
//! descriptors would otherwise spin), and a graceful stop that stops accepting and waits for open
//! connections, up to [`SHUTDOWN_TIMEOUT`].

use std::{
    cell::Cell,
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use actix_service::{Service, ServiceFactory};
use tokio::{
    net::TcpStream,
    sync::{Notify, oneshot, watch},
};

/// How long a graceful stop waits for open connections before it closes them.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the kernel queues on each worker's socket before they are accepted (actix-web's
/// default; the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 2048;
/// How long a worker waits after a failed accept (out of descriptors, say) before it tries again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the workers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Stop { graceful: bool },
}

/// Stops the server, from anywhere.
#[derive(Clone)]
pub struct ServerHandle {
    commands: Arc<watch::Sender<Command>>,
    running: Arc<Running>,
}

/// Descriptors the process needs besides its connections' and bots': listeners, Redis
/// connections, epoll, the log.
pub const FD_MARGIN: u64 = 256;

/// Raises the soft open-file limit to the hard one, as HAProxy and Go's runtime do: the soft
/// limit a shell or a systemd unit gives by default, 1024, holds about 500 bridged sessions
/// (each holds the client's socket and the bot's). Returns the limit before and after.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    // An unlimited hard limit is not a value the soft one may take for open files.
    let wanted = if limit.rlim_max == libc::RLIM_INFINITY { 1 << 20 } else { limit.rlim_max };
    if limit.rlim_cur < wanted {
        limit.rlim_cur = wanted;
        // SAFETY: setrlimit reads one `rlimit`, which we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// Worker threads still running, and a signal each time one ends.
struct Running {
    workers: AtomicUsize,
    ended: Notify,
}

impl Running {
    async fn until_none(&self) {
        loop {
            let ended = self.ended.notified();
            if self.workers.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl ServerHandle {
    /// Stops accepting connections; with `graceful`, open connections get up to
    /// [`SHUTDOWN_TIMEOUT`] to finish, otherwise they are closed at once. Returns once every
    /// worker has stopped.
    pub fn stop(&self, graceful: bool) -> impl Future<Output = ()> + Send + 'static {
        // The first stop decides; a later one only waits.
        self.commands.send_if_modified(|command| match command {
            Command::Run => {
                *command = Command::Stop { graceful };
                true
            }
            Command::Stop { .. } => false,
        });
        let running = self.running.clone();
        async move { running.until_none().await }
    }
}

/// The running server: a future that resolves once every worker has stopped.
pub struct Server {
    handle: ServerHandle,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Server {
    /// Starts `workers` threads serving connections from `listener`, each with the service that
    /// `factory` makes on that thread (an application is not `Send`, so each thread builds its
    /// own). Each worker holds at most `max_connections` open connections. Returns once every
    /// worker's service is ready, or with the first that failed.
    pub async fn start<F, S>(
        listener: std::net::TcpListener,
        workers: usize,
        max_connections: usize,
        factory: F,
    ) -> io::Result<Self>
    where
        F: Fn() -> S + Send + Clone + 'static,
        S: ServiceFactory<TcpStream, Config = ()> + 'static,
        S::InitError: std::fmt::Debug,
    {
        listener.set_nonblocking(true)?;
        let shared = !socket2::SockRef::from(&listener).reuse_port()?;
        let local = listener.local_addr()?;
        let (commands, _) = watch::channel(Command::Run);
        let commands = Arc::new(commands);
        let running =
            Arc::new(Running { workers: AtomicUsize::new(workers), ended: Notify::new() });
        let mut readiness = Vec::with_capacity(workers);
        for id in 0..workers {
            let listener = match (id, shared) {
                (0, _) | (_, true) => listener.try_clone()?,
                (_, false) => bind(local)?,
            };
            let (factory, worker_running) = (factory.clone(), running.clone());
            let subscribed = commands.subscribe();
            let (ready, ready_rx) = oneshot::channel();
            readiness.push(ready_rx);
            let spawned =
                std::thread::Builder::new().name(format!("broker-worker-{id}")).spawn(move || {
                    let served = run_worker(listener, factory, subscribed, max_connections, ready);
                    if let Err(e) = served {
                        tracing::error!(worker = id, error = %e, "worker stopped");
                    }
                    worker_running.workers.fetch_sub(1, Ordering::AcqRel);
                    worker_running.ended.notify_waiters();
                });
            if let Err(e) = spawned {
                // The threads already started stop with the handle below.
                running.workers.fetch_sub(workers - id, Ordering::AcqRel);
                commands.send_replace(Command::Stop { graceful: false });
                return Err(e);
            }
        }
        let handle = ServerHandle { commands, running: running.clone() };
        for ready in readiness {
            let failed = match ready.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(io::Error::other("a worker ended while it started")),
            };
            if let Some(e) = failed {
                handle.stop(false).await;
                return Err(e);
            }
        }
        let stopped = Box::pin(async move { running.until_none().await });
        Ok(Self { handle, stopped })
    }

    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }
}

impl Future for Server {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.stopped.as_mut().poll(cx).map(Ok)
    }
}

/// A listening socket on `addr` with `SO_REUSEPORT`, so that [`Server::start`] can give each
/// worker a socket of its own on the same address. Only processes of the same user can bind the
/// address beside it.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// One worker thread: its runtime, its service, its accept loop.
fn run_worker<F, S>(
    listener: std::net::TcpListener,
    factory: F,
    commands: watch::Receiver<Command>,
    max_connections: usize,
    ready: oneshot::Sender<io::Result<()>>,
) -> io::Result<()>
where
    F: Fn() -> S,
    S: ServiceFactory<TcpStream, Config = ()> + 'static,
    S::InitError: std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let service = match factory().new_service(()).await {
            Ok(service) => service,
            Err(e) => {
                let e = io::Error::other(format!("the application did not start: {e:?}"));
                let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        let _ = ready.send(Ok(()));
        serve(listener, service, commands, max_connections).await;
        Ok(())
    })
}

/// Accepts connections and serves each in a task of its own until told to stop; then, if the
/// stop is graceful, waits for the open connections to end.
async fn serve<S>(
    listener: tokio::net::TcpListener,
    service: S,
    mut commands: watch::Receiver<Command>,
    max_connections: usize,
) where
    S: Service<TcpStream> + 'static,
{
    let service = Rc::new(service);
    let open = Rc::new(Cell::new(0usize));
    let closed = Rc::new(Notify::new());
    loop {
        tokio::select! {
            biased;
            () = stopping(&mut commands) => break,
            () = until_below(&open, &closed, max_connections) => {}
        }
        let accepted = tokio::select! {
            biased;
            () = stopping(&mut commands) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                open.set(open.get() + 1);
                let (service, open, closed) = (service.clone(), open.clone(), closed.clone());
                tokio::task::spawn_local(async move {
                    // The connection's own errors are the HTTP layer's to answer and log.
                    let _ = service.call(stream).await;
                    open.set(open.get() - 1);
                    closed.notify_waiters();
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    drop(listener);
    let graceful = *commands.borrow() == Command::Stop { graceful: true };
    if graceful {
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, until_below(&open, &closed, 1)).await;
    }
}

/// Returns once the server is told to stop. A dropped handle stops it as a non-graceful stop
/// would.
async fn stopping(commands: &mut watch::Receiver<Command>) {
    let _ = commands.wait_for(|c| *c != Command::Run).await;
}

/// Returns once fewer than `limit` connections are open.
async fn until_below(open: &Cell<usize>, closed: &Notify, limit: usize) {
    loop {
        let one_closed = closed.notified();
        if open.get() < limit {
            return;
        }
        one_closed.await;
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, time::Duration};

    use actix_service::fn_service;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server whose connections each read one byte, then answer it and close.
    async fn byte_server(max_connections: usize) -> (Server, std::net::SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        byte_server_on(listener, 1, max_connections).await
    }

    async fn byte_server_on(
        listener: std::net::TcpListener,
        workers: usize,
        max_connections: usize,
    ) -> (Server, std::net::SocketAddr) {
        let addr = listener.local_addr().unwrap();
        let factory = || {
            fn_service(|mut stream: TcpStream| async move {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                stream.write_all(&byte).await?;
                io::Result::Ok(())
            })
        };
        let server = Server::start(listener, workers, max_connections, factory).await.unwrap();
        (server, addr)
    }

    async fn answered(stream: &mut tokio::net::TcpStream, byte: u8) -> bool {
        stream.write_all(&[byte]).await.unwrap();
        let mut answer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut answer));
        matches!(read.await, Ok(Ok(_))) && answer[0] == byte
    }

    #[tokio::test]
    async fn workers_on_sockets_of_their_own_serve_every_connection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (server, addr) = byte_server_on(listener, 3, 100).await;
        for byte in 0..30 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert!(answered(&mut stream, byte).await, "connection {byte} not served");
        }
        server.handle().stop(true).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "every socket closed");
    }

    #[tokio::test]
    async fn past_its_limit_a_worker_serves_the_next_connection_only_when_one_closes() {
        let (server, addr) = byte_server(1).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The first is being served (its service waits for its byte); the second waits its turn.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(!answered(&mut second, 2).await, "served past the limit");
        assert!(answered(&mut first, 1).await);
        let mut answer = [0u8; 1];
        let late = tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut answer));
        assert!(matches!(late.await, Ok(Ok(_))) && answer[0] == 2, "served once the first closed");
        server.handle().stop(false).await;
    }

    #[tokio::test]
    async fn a_graceful_stop_lets_open_connections_finish_and_accepts_no_more() {
        let (server, addr) = byte_server(10).await;
        let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stopped = Rc::new(RefCell::new(false));
        let stopping = {
            let (handle, stopped) = (server.handle(), stopped.clone());
            async move {
                handle.stop(true).await;
                *stopped.borrow_mut() = true;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.spawn_local(stopping);
        local
            .run_until(async {
                // The listener closes once the worker hears of the stop.
                let mut refused = false;
                for _ in 0..50 {
                    if tokio::net::TcpStream::connect(addr).await.is_err() {
                        refused = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert!(refused, "still accepting after the stop began");
                assert!(!*stopped.borrow(), "stopped with a connection open");
                assert!(answered(&mut open, 7).await, "the open connection was served to its end");
            })
            .await;
        local.await;
        assert!(*stopped.borrow());
        server.await.unwrap();
    }
}
