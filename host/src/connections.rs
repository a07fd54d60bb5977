//! How the API is served on its socket: one accept loop for plain HTTP and TLS alike,
//! and what one client may hold there: a slot among `--max-connections`, a limited time
//! to send its request head (`--header-timeout`) and its body (`--body-timeout`) and to
//! come back on a kept-alive connection (`--keep-alive-timeout`), and a read buffer of
//! [`READ_BUFFER`] bytes. Each request carries its peer's address (`ConnectInfo`) for
//! the login limits.
//!
//! Knows nothing of routes, users or storage: it hands requests to the router it is
//! given. The refusal a body timeout causes is rendered by the API, which finds a
//! [`BodyDeadline`] in the request.

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use http::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// The largest buffer a connection reads into. A request head must fit in it (a larger
/// one is answered 431); a client that stalls halfway through its head holds at most
/// this much. Conductor's requests have heads of a few hundred bytes.
pub const READ_BUFFER: usize = 16 << 10;

/// Descriptors kept free of connections, for the database, image files, plugins and the
/// jobs' outgoing connections: the connection cap is lowered to leave them.
const RESERVED_DESCRIPTORS: u64 = 512;

/// What a client may hold (`conductor serve --help` documents each flag).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's queue until one ends.
    pub max_connections: usize,
    /// From the moment a connection is ready for a request (its accept or, over TLS,
    /// the end of its handshake; or the previous answer) until the request's head is
    /// complete. A TLS handshake gets as long.
    pub header_timeout: Duration,
    /// How long an answered connection may wait for its next request.
    pub keep_alive_timeout: Duration,
    /// From the first read of a request's body until its end.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit, so that the
/// connection cap, not the default soft limit (often 1,024), decides how many clients
/// fit; answers the limit now in effect. Then lowers `limits.max_connections`, if needed,
/// so that connections cannot take the descriptors the rest of the server needs.
pub fn fit_descriptors(limits: &mut Limits) {
    let mut open_files = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut open_files) != 0 {
            return;
        }
        if open_files.rlim_cur < open_files.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: open_files.rlim_max,
                rlim_max: open_files.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                open_files.rlim_cur = open_files.rlim_max;
            }
        }
        open_files.rlim_cur
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    if limits.max_connections > room {
        tracing::warn!(
            open_files = soft,
            max_connections = room.max(1),
            "the open-file limit leaves room for fewer connections than --max-connections"
        );
        limits.max_connections = room.max(1);
    }
}

/// Serves `router` on `listener` until `stopping` turns true: over TLS when an acceptor
/// is given, else plain HTTP/1.1. After the stop no connection is accepted and the open
/// ones are asked to close once their request is answered; this returns when all have.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    stopping: watch::Receiver<bool>,
) {
    // One permit per connection; counted in u32 so that all of them can be waited for
    // at once below.
    let capacity = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(capacity as usize));
    let mut stop = stopping.clone();
    let stop = stopped(&mut stop);
    tokio::pin!(stop);
    loop {
        // A slot first: at the cap the server stops accepting, and new clients wait in
        // the kernel's queue, not in this process's memory or descriptors.
        let slot = tokio::select! {
            () = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    pause_after(&e).await;
                    continue;
                }
            },
        };
        let client = Client {
            router: router.clone(),
            peer,
            limits,
            stopping: stopping.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            client.serve(stream, tls).await;
            // Only now may another client take the slot.
            drop(slot);
        });
    }
    drop(listener);
    // Every connection gives its slot back when it ends: all of them back means all
    // connections are closed.
    let _ = slots.acquire_many(capacity).await;
}

/// After a failed accept: out of descriptors or memory, the next accept would fail the
/// same way at once, so the loop waits a moment instead of spinning; a connection the
/// client gave up on before it was accepted needs no pause.
async fn pause_after(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) {
        return;
    }
    tracing::warn!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Resolves once the stop signal has come.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// One accepted connection.
struct Client {
    router: Router,
    peer: SocketAddr,
    limits: Limits,
    stopping: watch::Receiver<bool>,
}

impl Client {
    async fn serve(self, stream: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.http(stream).await;
        };
        // A client that never finishes its handshake must not keep its slot: it gets
        // as long as for a request head. A stop waits for it, that long at most.
        let handshake = tokio::time::timeout(self.limits.header_timeout, acceptor.accept(stream));
        match handshake.await {
            Ok(Ok(stream)) => self.http(stream).await,
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, "TLS handshake failed: {e}"),
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    /// HTTP/1.1 on one connection, until the client leaves, a timeout ends it, or the
    /// server stops (then after the request in progress is answered).
    async fn http<S>(mut self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
        use hyper_util::server::conn::auto::Builder;
        use hyper_util::service::TowerToHyperService;
        let mut builder = Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_buf_size(READ_BUFFER);
        let activity = Arc::new(Activity::default());
        let service = TowerToHyperService::new(ConnectionService {
            router: self.router.clone(),
            peer: self.peer,
            body_timeout: self.limits.body_timeout,
            activity: activity.clone(),
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let peer = self.peer;
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = stopped(&mut self.stopping) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            () = activity.idle_for(self.limits.keep_alive_timeout) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, "connection ended: {e}");
        }
    }
}

/// The service of one connection: the router, with the peer's address and a deadline
/// on the body put into each request, and each answer counted until its body is sent.
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    body_timeout: Duration,
    activity: Arc<Activity>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Answered>, Infallible>> + Send>>;

impl<B> tower::Service<Request<B>> for ConnectionService
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Answered>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Answer {
        let busy = Busy::start(self.activity.clone());
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(ConnectInfo(self.peer));
        // A request without a body (most GETs) needs no clock.
        let body = if body.is_end_stream() {
            Body::new(body)
        } else {
            let deadline = BodyDeadline {
                after: self.body_timeout,
                passed: Arc::new(AtomicBool::new(false)),
            };
            parts.extensions.insert(deadline.clone());
            Body::new(Timed {
                body,
                deadline,
                clock: None,
            })
        };
        let answer = tower::Service::call(&mut self.router, Request::from_parts(parts, body));
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Answered { body, _busy: busy }))
        })
    }
}

/// Put into a request whose body has a deadline: whether the deadline passed while the
/// body was being read, so that the API answers 408 rather than a failed read.
#[derive(Debug, Clone)]
pub struct BodyDeadline {
    /// The time the client had.
    pub after: Duration,
    passed: Arc<AtomicBool>,
}

impl BodyDeadline {
    pub fn passed(&self) -> bool {
        self.passed.load(Ordering::Relaxed)
    }
}

/// The error a body whose deadline passed ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimedOut(Duration);

/// A request body that fails once it has been read for longer than its deadline. The
/// clock starts at the first read, so time the server spends before reading (checking
/// the password, say) is not the client's.
struct Timed<B> {
    body: B,
    deadline: BodyDeadline,
    clock: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> HttpBody for Timed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        // What has arrived is taken first: only a client that makes the server wait
        // runs into the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let after = this.deadline.after;
        let clock = this
            .clock
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        if clock.as_mut().poll(cx).is_ready() {
            this.deadline.passed.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimedOut(after).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body, which keeps its request counted as in progress until it is sent
/// (or the connection ends).
pub struct Answered {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Answered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Requests in progress on one connection, and since when it has had none: what tells
/// a kept-alive connection waiting for its next request from one that is answering.
#[derive(Default)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Default)]
struct ActivityState {
    in_progress: u32,
    /// Steps at every request's start and end, so a watcher can tell whether anything
    /// happened while it slept.
    changes: u64,
    /// When the last answer was sent; none before the first (a new connection is
    /// bounded by the header timeout alone).
    idle_since: Option<Instant>,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves once the connection has been answered and then waited `limit` without a
    /// new request. Checks once per `limit` at most, whatever the traffic.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let (idle_since, changes) = {
                let state = self.lock();
                let idle = (state.in_progress == 0)
                    .then_some(state.idle_since)
                    .flatten();
                (idle, state.changes)
            };
            // While a request is in progress there is nothing to time; look again later
            // (never sooner than 100 ms, so a tiny limit cannot make this spin).
            let wake = idle_since.map_or_else(
                || Instant::now() + limit.max(Duration::from_millis(100)),
                |since| since + limit,
            );
            tokio::time::sleep_until(wake).await;
            if idle_since.is_some() && self.lock().changes == changes {
                return;
            }
        }
    }
}

/// One request in progress, counted from its head to the end of its answer.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        {
            let mut state = activity.lock();
            state.in_progress += 1;
            state.changes += 1;
        }
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_progress = state.in_progress.saturating_sub(1);
        state.changes += 1;
        state.idle_since = Some(Instant::now());
    }
}
