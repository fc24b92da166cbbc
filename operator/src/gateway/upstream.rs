//! The gateway's connections to pods. A connection carrying a request belongs to the client
//! connection that sent it: its I/O is polled by that client connection's task (`Driver`,
//! polled beside it by `kandle_listen::serve_each`), so a request and its answer never pass
//! to another task, as they would through a shared client's dispatch channel and connection
//! tasks, each pass a wake-up, often on another thread (nginx's shape: one event loop from
//! client to pod and back). Between requests a connection waits in a pool shared by every
//! client connection of its serving thread (`Idle`, bounded per pod, as nginx's keepalive
//! pool per worker), so a pod sees about as many connections as requests in flight, however
//! many clients there are.
use axum::body::Bytes;
use axum::http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::net::TcpStream;

/// Idle connections kept per pod.
const IDLE_PER_POD: usize = 64;
/// How often the idle connections are looked at for pods having closed them (kandle-server
/// closes a connection idle for its header timeout, 15 s by default).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    /// The pod could not be reached: nothing was sent, another pod may take the request.
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout(_))
    }
}

/// An HTTP/1.1 connection to a pod: the handle requests go through, and its I/O.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    io: Pin<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

impl Link {
    /// Whether the pod has closed it, seen without waiting (nothing polls an idle link).
    fn closed(&mut self) -> bool {
        let mut look = Context::from_waker(Waker::noop());
        self.sender.is_closed() || self.io.as_mut().poll(&mut look).is_ready()
    }
}

/// Idle connections to pods, shared by every client connection of a serving thread (each
/// connection's I/O belongs to the thread that opened it).
#[derive(Default)]
pub struct Idle(Mutex<HashMap<SocketAddr, Vec<Link>>>);

impl Idle {
    /// An idle connection to `addr` still open, the most recently used first.
    fn take(&self, addr: SocketAddr) -> Option<Link> {
        loop {
            let mut link = lock(&self.0).get_mut(&addr)?.pop()?;
            if !link.closed() {
                return Some(link);
            }
        }
    }

    fn put(&self, addr: SocketAddr, link: Link) {
        let mut pods = lock(&self.0);
        let idle = pods.entry(addr).or_default();
        if idle.len() < IDLE_PER_POD {
            idle.push(link);
        }
    }

    /// Closes the connections to pods that are gone.
    pub(super) fn retain(&self, alive: impl Fn(&SocketAddr) -> bool) {
        lock(&self.0).retain(|addr, _| alive(addr));
    }

    /// Lets go of the idle connections that pods have closed: nothing polls an idle
    /// connection, so each would otherwise hold a socket, half closed, until taken.
    pub(super) fn sweep(&self) {
        for links in lock(&self.0).values_mut() {
            links.retain_mut(|link| !link.closed());
        }
    }
}

/// The connections one client connection's requests are using.
#[derive(Default)]
struct Busy {
    links: Vec<(SocketAddr, Link)>,
    /// The client connection's task, to wake when a link is added.
    driver: Option<Waker>,
}

/// One client connection's way to the pods; cloned into each of its requests.
#[derive(Clone)]
pub(super) struct Upstreams {
    busy: Arc<Mutex<Busy>>,
    idle: Arc<Idle>,
    connect_timeout: Duration,
}

/// Polls the I/O of the connections a client connection is using; never finishes, so it is
/// polled beside the client connection until that ends.
pub struct Driver(Upstreams);

impl Upstreams {
    pub(super) fn new(idle: Arc<Idle>, connect_timeout: Duration) -> (Self, Driver) {
        let upstreams = Self {
            busy: Arc::default(),
            idle,
            connect_timeout,
        };
        (upstreams.clone(), Driver(upstreams))
    }

    /// Sends the request `request` makes (origin-form URI, `Host` set) to the pod at
    /// `addr`, on an idle connection when there is one, else on a new one. An idle
    /// connection the pod closed as the request went (pods close idle ones) fails without
    /// an answer; the request then goes once more, on a new connection.
    pub(super) async fn send(
        &self,
        addr: SocketAddr,
        request: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.release();
        if let Some(mut link) = self.idle.take(addr) {
            let answer = link.sender.try_send_request(request());
            self.adopt(addr, link);
            match answer.await {
                Ok(answer) => return Ok(answer),
                Err(mut failed) => {
                    let unsent = failed.take_message().is_some();
                    if !unsent && !failed.error().is_incomplete_message() {
                        return Err(failed.into_error().into());
                    }
                    tracing::debug!(pod = %addr, error = %failed.error(), "idle connection closed; sending on a new one");
                }
            }
        }
        let mut link = self.connect(addr).await?;
        let answer = link.sender.send_request(request());
        self.adopt(addr, link);
        Ok(answer.await?)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Link, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, io) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Link {
            sender,
            io: Box::pin(io),
        })
    }

    /// Puts `link` under this client connection's task.
    fn adopt(&self, addr: SocketAddr, link: Link) {
        let mut busy = lock(&self.busy);
        busy.links.push((addr, link));
        if let Some(driver) = &busy.driver {
            driver.wake_by_ref();
        }
    }

    /// Hands the connections whose answer has been read to the shared pool.
    fn release(&self) {
        // Busy's lock, then the pool's: nothing takes them the other way round.
        let mut busy = lock(&self.busy);
        for (addr, link) in busy
            .links
            .extract_if(.., |(_, link)| link.sender.is_ready())
        {
            self.idle.put(addr, link);
        }
    }
}

/// Releases its client connection's finished connections when dropped: with the answer's
/// body, once it has ended.
pub(super) struct Release(Upstreams);

impl Upstreams {
    pub(super) fn release_when_dropped(&self) -> Release {
        Release(self.clone())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Each lock is held for a few steps that cannot panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Future for Driver {
    type Output = Infallible;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Infallible> {
        let mut busy = lock(&self.0.busy);
        if !busy
            .driver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            busy.driver = Some(cx.waker().clone());
        }
        // A finished connection (closed by either side, or failed) is done with: its
        // request has seen the error already.
        busy.links
            .retain_mut(|(_, link)| match link.io.as_mut().poll(cx) {
                Poll::Ready(done) => {
                    if let Err(error) = done {
                        tracing::debug!(%error, "connection to a pod closed");
                    }
                    false
                }
                Poll::Pending => true,
            });
        Poll::Pending
    }
}

/// The client connection has closed: what it used and finished with stays open for others.
impl Drop for Driver {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the test pod treats a connection once it has answered on it.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepAlive,
        /// Closes it at once, as pods close idle ones.
        Close,
        /// Closes it without answering when the next request comes: the pod's idle
        /// timeout and that request crossed.
        CloseOnNext,
        /// Closes it a moment after answering, once the gateway has put it back as idle.
        CloseIdle,
    }

    /// A pod on loopback answering `GET`s with `ok`, counting the connections it accepts.
    async fn pod(then: Then) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut head, mut answered) = (Vec::new(), false);
                    let mut buffer = [0; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                        head.extend_from_slice(&buffer[..n]);
                        if !head.ends_with(b"\r\n\r\n") {
                            continue;
                        }
                        head.clear();
                        if answered && then == Then::CloseOnNext {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() || then == Then::Close {
                            return;
                        }
                        if then == Then::CloseIdle {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                        answered = true;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn client_connection(idle: &Arc<Idle>) -> Upstreams {
        let (upstreams, driver) = Upstreams::new(idle.clone(), Duration::from_secs(5));
        tokio::spawn(driver);
        upstreams
    }

    async fn get(upstreams: &Upstreams, addr: SocketAddr) -> Result<String, UpstreamError> {
        let _release = upstreams.release_when_dropped();
        let request = || {
            Request::get("/")
                .header(header::HOST, addr.to_string())
                .body(Full::default())
                .unwrap()
        };
        let answer = upstreams.send(addr, request).await?;
        let body = answer.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_connection_serves_any_client_once_answered_and_one_at_a_time() {
        let (addr, accepted) = pod(Then::KeepAlive).await;
        let idle = Arc::default();
        let (first, second) = (client_connection(&idle), client_connection(&idle));
        for _ in 0..3 {
            assert_eq!(get(&first, addr).await.unwrap(), "ok");
        }
        assert_eq!(get(&second, addr).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let (a, b) = tokio::join!(get(&first, addr), get(&second, addr));
        assert_eq!((a.unwrap(), b.unwrap()), ("ok".into(), "ok".into()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_pod_closed_is_replaced_without_failing_the_request() {
        for then in [Then::Close, Then::CloseOnNext] {
            let (addr, accepted) = pod(then).await;
            let upstreams = client_connection(&Arc::default());
            for _ in 0..3 {
                assert_eq!(get(&upstreams, addr).await.unwrap(), "ok");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        }
    }

    #[tokio::test]
    async fn the_sweep_lets_go_of_idle_connections_the_pod_closed_and_keeps_the_others() {
        let (closing, _) = pod(Then::CloseIdle).await;
        let (open, _) = pod(Then::KeepAlive).await;
        let idle = Arc::new(Idle::default());
        let upstreams = client_connection(&idle);
        for addr in [closing, open] {
            assert_eq!(get(&upstreams, addr).await.unwrap(), "ok");
        }
        let idle_to = |addr| lock(&idle.0).get(&addr).map_or(0, Vec::len);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            (idle_to(closing), idle_to(open)),
            (1, 1),
            "closed, still held"
        );
        idle.sweep();
        assert_eq!((idle_to(closing), idle_to(open)), (0, 1));
    }

    #[tokio::test]
    async fn a_pod_that_refuses_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let error = get(&client_connection(&Arc::default()), addr)
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error}");
    }
}
