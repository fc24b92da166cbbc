//! Accepting HTTP connections with bounds, for the server and the operator alike: at most
//! `max_connections` open at once, each HTTP/1.1 connection closed when its client is slow
//! to send a request's headers or sits idle between requests, and every connection closed
//! shortly after shutdown. A silent or slow client costs one slot for a bounded time,
//! never a file descriptor for good. HTTP/1.1 only: what the OpenAI clients, kubelet probes
//! and Prometheus speak, and the protocol whose timeouts hyper bounds. `serve` serves an
//! axum-like service through hyper; `serve_connections` hands each connection to a server
//! of one's own (the gateway's), under the same cap and shutdown.
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// After shutdown, how long connections get to close on their own before they are dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of file descriptors): no hot loop, room to recover.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// From when a connection waits for a request until that request's headers are in:
    /// bounds half-sent headers, silent connections and idle keep-alive alike.
    pub header_timeout: Duration,
}

/// A service `serve` can serve: one answering hyper's requests, cloned for each connection
/// (an axum `Router`, say).
pub trait App<B>:
    tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> App<B> for S where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// The body of an `App`'s answers.
pub trait Body:
    http_body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

impl<B> Body for B where
    B: http_body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Says when the server shuts down: a connection then finishes the request it is
/// answering, if any, and closes.
#[derive(Clone)]
pub struct Closing(tokio::sync::watch::Receiver<bool>);

impl Closing {
    pub fn is_closing(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the server shuts down.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|closing| *closing).await;
    }
}

/// Serves `app` (an axum `Router`, or any service like one) until `shutdown` resolves (by
/// then requests in flight have drained), then closes the connections that are left.
pub async fn serve<S, B>(
    listener: TcpListener,
    app: S,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: App<B>,
    B: Body,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    serve_connections(listener, limits, shutdown, move |stream, mut closing| {
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        async move {
            tokio::pin!(connection);
            let closed = tokio::select! {
                closed = connection.as_mut() => closed,
                () = closing.wait() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = closed {
                tracing::debug!(%error, "connection closed");
            }
        }
    })
    .await;
}

/// Accepts connections on `listener` within `limits.max_connections` and runs `connection`
/// on each, its own task, until `shutdown` resolves; then tells them they are closing and
/// waits a moment for them to close. `connection` bounds its own waits, the header timeout
/// among them.
pub async fn serve_connections<F, C>(
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    mut connection: F,
) where
    F: FnMut(TcpStream, Closing) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max));
    let (close, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    // tokio's timer driver is woken (a syscall, and an idle worker roused) whenever a timer
    // is set sooner than the deadline it sleeps towards, or while it has none: between
    // requests it often has none, so every request's header timeout would wake it. A
    // standing tick, sooner than any header timeout, spares that.
    let mut tick = tokio::time::interval((limits.header_timeout / 2).max(Duration::from_millis(1)));
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => continue,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, permit)) = accepted else {
            continue;
        };
        let connection = connection(stream, Closing(closing.clone()));
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
    drop(listener);
    close.send_replace(true);
    // Every slot back: every connection closed.
    if tokio::time::timeout(CLOSE_WITHIN, slots.acquire_many(max as u32))
        .await
        .is_err()
    {
        tracing::warn!("closing connections still open after shutdown");
    }
}

/// The next connection, once a slot is free; `None` after a failed accept.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = slots.clone().acquire_owned().await.expect("never closed");
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, permit))
        }
        Err(error) => {
            tracing::warn!(%error, "accept failed");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            None
        }
    }
}
