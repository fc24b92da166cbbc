//! The gateway's connections to pods, speaking HTTP/1.1 on the socket itself: a request's
//! head and body go out in one write, and its answer is read straight from the socket by
//! whoever polls it, the client connection's own task (nginx's shape: one event loop from
//! client to pod and back). Through hyper's client the same exchange passed through a
//! dispatch channel, a connection future polled beside the client connection and a body
//! channel: more code run per request, which counts most when a model's work between
//! requests has evicted it from the caches (in front of MiniLM at one connection the gateway
//! then added more latency than nginx). This way a request runs 22% fewer instructions
//! (callgrind), and the gateway adds about what nginx adds (`benches/gateway.rs`). Between
//! requests a connection waits in a pool shared by the client connections of its serving
//! thread (`Idle`, bounded per pod, as nginx's keepalive pool per worker), so a pod sees
//! about as many connections as requests in flight.
//!
//! A pod is a remote like any other: an answer's head is bounded in size and headers, its
//! framing checked (`Content-Length`, chunked, or until close), and a connection is reused
//! only when its answer ended exactly where its framing said.
use super::framing::{Framing, Step};
use super::head::{self, MAX_HEAD_BYTES, MAX_HEADERS, is_hop_by_hop};
use super::link::Link;
use axum::body::Bytes;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use bytes::{Buf, BytesMut};
use http_body::{Frame, SizeHint};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
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
    #[error("the connection to the pod failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the pod closed the connection before its answer ended")]
    Closed,
    #[error("the pod's answer is malformed: {0}")]
    Malformed(&'static str),
}

impl UpstreamError {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout(_))
    }
}

impl Link {
    /// Whether the pod has closed it (or sent what nobody asked for), seen without waiting:
    /// a read is tried only when the socket has said it is readable.
    fn closed(&self) -> bool {
        let mut byte = [0; 1];
        !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Idle connections to pods, shared by every client connection of a serving thread. Keyed
/// by pod addresses, which come from the API server, not from callers: hashed with
/// foldhash, not SipHash.
#[derive(Default)]
pub struct Idle(Mutex<HashMap<SocketAddr, Vec<Link>, foldhash::fast::RandomState>>);

impl Idle {
    /// An idle connection to `addr` still open, the most recently used first.
    fn take(&self, addr: SocketAddr) -> Option<Link> {
        loop {
            let link = lock(&self.0).get_mut(&addr)?.pop()?;
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

    /// Lets go of the idle connections that pods have closed: each would otherwise hold a
    /// socket, half closed, until taken.
    pub(super) fn sweep(&self) {
        for links in lock(&self.0).values_mut() {
            links.retain(|link| !link.closed());
        }
    }
}

/// Each lock is held for a few steps that cannot panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request for pods: all of it but `Host`, which names each pod. Never `HEAD` (the
/// gateway forwards `POST`s), whose answers would carry a length but no body.
pub(super) struct Outgoing {
    pub method: Method,
    pub path: PathAndQuery,
    /// The client's, checked by the HTTP server that read them (no line breaks); those
    /// that are not the pod's are left out as the head is written (`forwards`).
    pub headers: HeaderMap,
    /// Whether the gateway checked the caller's API key, which is then the gateway's, not
    /// the pod's.
    pub key_checked: bool,
    pub body: Bytes,
}

impl Outgoing {
    /// Whether a client's header goes on to the pod: not one that belongs to one
    /// connection, nor the framing and `Host`, written here for the pod, nor `Expect` (the
    /// gateway has read the whole body; a pod's `100 Continue` would be for the gateway), nor
    /// the API key the gateway checked. Skipped as the head is written: removing them from
    /// the map would cost a hash and a probe per name, for every request.
    fn forwards(&self, name: &HeaderName) -> bool {
        !(is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || (self.key_checked && name == header::AUTHORIZATION))
    }

    /// The head, written byte by byte: `format!`'s machinery would be more code to run per
    /// request, often cold.
    fn head(&self, host: &HeaderValue) -> Vec<u8> {
        let mut head = Vec::with_capacity(128 + 64 * self.headers.len());
        for part in [
            self.method.as_str().as_bytes(),
            b" ",
            self.path.as_str().as_bytes(),
            b" HTTP/1.1\r\nhost: ",
            host.as_bytes(),
            b"\r\ncontent-length: ",
            itoa::Buffer::new().format(self.body.len()).as_bytes(),
            b"\r\n",
        ] {
            head.extend_from_slice(part);
        }
        for (name, value) in self.headers.iter().filter(|(name, _)| self.forwards(name)) {
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                head.extend_from_slice(part);
            }
        }
        head.extend_from_slice(b"\r\n");
        head
    }
}

/// A serving thread's way to the pods, cloned into each of its client connections.
#[derive(Clone)]
pub(super) struct Upstreams {
    idle: Arc<Idle>,
    connect_timeout: Duration,
}

/// An exchange that failed, and whether the pod answered anything at all.
struct Failed {
    error: UpstreamError,
    unanswered: bool,
}

impl Upstreams {
    pub(super) fn new(idle: Arc<Idle>, connect_timeout: Duration) -> Self {
        Self {
            idle,
            connect_timeout,
        }
    }

    /// Sends `request` to the pod at `addr` (`host`), on an idle connection when there is
    /// one, else on a new one, and reads its answer's head; the body is read as it is
    /// polled. An idle connection the pod closed as the request went (pods close idle ones)
    /// fails without an answer; the request then goes once more, on a new connection.
    pub(super) async fn send(
        &self,
        addr: SocketAddr,
        host: &HeaderValue,
        request: &Outgoing,
    ) -> Result<Response<PodBody>, UpstreamError> {
        let head = request.head(host);
        if let Some(link) = self.idle.take(addr) {
            match exchange(link, &head, &request.body).await {
                Ok(answer) => return Ok(self.answer(addr, answer)),
                Err(failed) if failed.unanswered => {
                    tracing::debug!(pod = %addr, error = %failed.error, "idle connection closed; sending on a new one");
                }
                Err(failed) => return Err(failed.error),
            }
        }
        // Boxed: most requests find an idle connection, and their futures need not carry
        // room for a connect.
        let link = Box::pin(self.connect(addr)).await?;
        match exchange(link, &head, &request.body).await {
            Ok(answer) => Ok(self.answer(addr, answer)),
            Err(failed) => Err(failed.error),
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Link, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(Link::new(stream))
    }

    fn answer(&self, addr: SocketAddr, (head, link): (Head, Link)) -> Response<PodBody> {
        let mut body = PodBody {
            link: Some(link),
            framing: head.framing,
            reuse: head.reuse.then(|| (self.idle.clone(), addr)),
        };
        // Nothing will poll a body that is over before it starts.
        if body.framing == Framing::Length(0) {
            body.end();
        }
        let mut answer = Response::new(body);
        *answer.status_mut() = head.status;
        *answer.headers_mut() = head.headers;
        answer
    }
}

/// Writes the request on `link` and reads its answer's head.
async fn exchange(mut link: Link, head: &[u8], body: &[u8]) -> Result<(Head, Link), Failed> {
    let unanswered = |error: UpstreamError| Failed {
        error,
        unanswered: true,
    };
    let mut out = head.chain(body);
    link.stream
        .write_all_buf(&mut out)
        .await
        .map_err(|e| unanswered(e.into()))?;
    loop {
        // Idle connections come back with nothing unread: no parse before the first read.
        if !link.read.is_empty() {
            match parse_head(&mut link.read) {
                Ok(Some(head)) => return Ok((head, link)),
                Ok(None) => {}
                Err(error) => {
                    return Err(Failed {
                        error,
                        unanswered: false,
                    });
                }
            }
        }
        let answered = !link.read.is_empty();
        let read = link.fill().await;
        let error = match read {
            Ok(0) => UpstreamError::Closed,
            Ok(_) => continue,
            Err(e) => e.into(),
        };
        return Err(Failed {
            error,
            unanswered: !answered,
        });
    }
}

/// An answer's head, as passed on.
struct Head {
    status: StatusCode,
    /// Less those that belong to one connection and the framing, which the gateway's own
    /// HTTP server sets again for its client.
    headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may carry another request once the body has been read.
    reuse: bool,
}

/// The final answer's head, taken off the front of `read`, once all of it is there;
/// interim answers (`100 Continue`) before it are skipped.
fn parse_head(read: &mut BytesMut) -> Result<Option<Head>, UpstreamError> {
    let parser = httparse::ParserConfig::default();
    loop {
        // Left uninitialised: filling 100 empty headers wrote 3 KiB for every parse.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let length = match parser.parse_response_with_uninit_headers(&mut parsed, read, &mut fields)
        {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if read.len() < MAX_HEAD_BYTES => return Ok(None),
            Ok(httparse::Status::Partial) => {
                return Err(UpstreamError::Malformed("head over 64 KiB"));
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(UpstreamError::Malformed("over 100 headers"));
            }
            Err(_) => return Err(UpstreamError::Malformed("not an HTTP/1.1 answer")),
        };
        let code = parsed.code.unwrap_or_default();
        if code == 101 {
            return Err(UpstreamError::Malformed("101 Switching Protocols"));
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| UpstreamError::Malformed("status code out of range"))?;
        // HTTP/1.0 closes after each answer unless it says otherwise; kandle's pods speak 1.1.
        let http11 = parsed.version == Some(1);
        let mut places = [head::Place::default(); MAX_HEADERS];
        let fields = head::place(read, parsed.headers, &mut places);
        let bytes = read.split_to(length).freeze();
        let fields = head::fields(&bytes, &places[..fields]).map_err(UpstreamError::Malformed)?;
        if !status.is_informational() {
            return Ok(Some(head_of(status, http11, fields)));
        }
    }
}

fn head_of(status: StatusCode, http11: bool, fields: head::Fields) -> Head {
    let head::Fields {
        headers,
        length,
        chunked,
        close,
        keep_alive,
    } = fields;
    let mut reuse = if http11 { !close } else { keep_alive };
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        // RFC 9112 §6.3: chunked wins over a Content-Length sent beside it, but a pod that
        // sends both is not to be trusted with the connection afterwards.
        reuse &= length.is_none();
        Framing::chunked()
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        reuse = false;
        Framing::UntilClose
    };
    Head {
        status,
        headers,
        framing,
        reuse,
    }
}

/// An answer's body, read from the pod's connection as it is polled. Once it has ended as
/// its framing says, the connection goes back to the pool; dropped before that, the
/// connection closes, which cancels the work on the pod.
pub(super) struct PodBody {
    link: Option<Link>,
    framing: Framing,
    /// Where the connection goes once the body has ended, when it may be reused.
    reuse: Option<(Arc<Idle>, SocketAddr)>,
}

impl PodBody {
    fn end(&mut self) {
        self.framing = Framing::Done;
        if let (Some(link), Some((idle, addr))) = (self.link.take(), self.reuse.take()) {
            // Bytes past the answer's end: nobody asked for them.
            if link.read.is_empty() {
                idle.put(addr, link);
            }
        }
    }
}

impl http_body::Body for PodBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let body = self.get_mut();
        loop {
            let Some(link) = body.link.as_mut() else {
                return Poll::Ready(None);
            };
            match body
                .framing
                .step(&mut link.read)
                .map_err(UpstreamError::Malformed)?
            {
                Step::Data { bytes, last } => {
                    if last {
                        body.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Step::End => {
                    body.end();
                    return Poll::Ready(None);
                }
                Step::More => {}
            }
            match ready!(link.poll_fill(cx)) {
                Ok(0) if body.framing == Framing::UntilClose => {
                    body.framing = Framing::Done;
                    body.link = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    body.link = None;
                    return Poll::Ready(Some(Err(UpstreamError::Closed)));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
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

    /// A pod on loopback answering every request with `answer`, written in pieces of
    /// `piece` bytes a moment apart, counting the connections it accepts and keeping the
    /// requests' heads.
    async fn pod_answering(
        answer: &'static [u8],
        piece: usize,
        then: Then,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (mut read, mut answered) = (Vec::new(), false);
                    let mut buffer = [0; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                        read.extend_from_slice(&buffer[..n]);
                        let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&read[..end + 4]).into_owned();
                        let length = head
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length: "))
                            .map_or(0, |n| n.parse().unwrap());
                        if read.len() < end + 4 + length {
                            continue;
                        }
                        read.clear();
                        lock(&seen).push(head);
                        if answered && then == Then::CloseOnNext {
                            return;
                        }
                        for piece in answer.chunks(piece) {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            if piece.len() < answer.len() {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                        if then == Then::Close {
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
        (addr, accepted, heads)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    async fn pod(then: Then) -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _) = pod_answering(OK, OK.len(), then).await;
        (addr, accepted)
    }

    fn client_connection(idle: &Arc<Idle>) -> Upstreams {
        Upstreams::new(idle.clone(), Duration::from_secs(5))
    }

    fn request(headers: HeaderMap) -> Outgoing {
        Outgoing {
            method: Method::POST,
            path: PathAndQuery::from_static("/v1/embeddings?x=1"),
            headers,
            key_checked: false,
            body: Bytes::from_static(b"{}"),
        }
    }

    async fn answer(
        upstreams: &Upstreams,
        addr: SocketAddr,
    ) -> Result<Response<PodBody>, UpstreamError> {
        let host = HeaderValue::from_str(&addr.to_string()).unwrap();
        upstreams
            .send(addr, &host, &request(HeaderMap::new()))
            .await
    }

    async fn get(upstreams: &Upstreams, addr: SocketAddr) -> Result<String, UpstreamError> {
        let body = answer(upstreams, addr).await?.into_body();
        let body = body.collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn idle_to(idle: &Idle, addr: SocketAddr) -> usize {
        lock(&idle.0).get(&addr).map_or(0, Vec::len)
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
    async fn the_request_goes_as_one_head_with_the_pods_host_and_its_own_length() {
        let (addr, _, heads) = pod_answering(OK, OK.len(), Then::KeepAlive).await;
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        let host = HeaderValue::from_static("pod.example:8080");
        let upstreams = client_connection(&Arc::default());
        let answer = upstreams
            .send(addr, &host, &request(headers))
            .await
            .unwrap();
        answer.into_body().collect().await.unwrap();
        assert_eq!(
            lock(&heads).as_slice(),
            [
                "POST /v1/embeddings?x=1 HTTP/1.1\r\nhost: pod.example:8080\r\n\
              content-length: 2\r\nx-request-id: abc\r\n\r\n"
            ]
        );
    }

    #[test]
    fn the_head_leaves_out_what_is_not_the_pods() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "gateway.example"),
            ("content-length", "99"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eDp5"),
            ("expect", "100-continue"),
            ("authorization", "Bearer sk-1"),
            ("content-type", "application/json"),
            ("x-request-id", "abc"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let host = HeaderValue::from_static("pod.example:8080");
        let mut outgoing = request(headers);
        let head = |outgoing: &Outgoing| String::from_utf8(outgoing.head(&host)).unwrap();
        let start = "POST /v1/embeddings?x=1 HTTP/1.1\r\nhost: pod.example:8080\r\n\
            content-length: 2\r\n";
        let rest = "content-type: application/json\r\nx-request-id: abc\r\n\r\n";
        assert_eq!(
            head(&outgoing),
            format!("{start}authorization: Bearer sk-1\r\n{rest}"),
            "a key the gateway did not check is the pod's"
        );
        outgoing.key_checked = true;
        assert_eq!(head(&outgoing), format!("{start}{rest}"));
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
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = (idle_to(&idle, closing), idle_to(&idle, open));
        assert_eq!(held, (1, 1), "closed, still held");
        idle.sweep();
        assert_eq!((idle_to(&idle, closing), idle_to(&idle, open)), (0, 1));
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

    #[tokio::test]
    async fn a_chunked_answer_passes_on_as_it_comes_and_its_connection_is_reused() {
        const STREAM: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n3\r\none\r\n0\r\n\r\n";
        // Three bytes at a time: every line of the framing split across reads.
        let (addr, accepted, _) = pod_answering(STREAM, 3, Then::KeepAlive).await;
        let idle = Arc::new(Idle::default());
        let upstreams = client_connection(&idle);
        for _ in 0..2 {
            let answer = answer(&upstreams, addr).await.unwrap();
            assert_eq!(answer.headers()["content-type"], "text/event-stream");
            assert!(!answer.headers().contains_key("transfer-encoding"));
            let mut body = answer.into_body();
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push(frame.unwrap().into_data().unwrap());
            }
            assert!(frames.len() > 1, "passed on as read, not gathered");
            assert_eq!(frames.concat(), b"data: one");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_to(&idle, addr), 1);
    }

    #[tokio::test]
    async fn an_interim_answer_is_skipped() {
        const ANSWER: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\
            content-length: 2\r\nx-kept: yes\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\nok";
        let (addr, _, _) = pod_answering(ANSWER, ANSWER.len(), Then::KeepAlive).await;
        let answer = answer(&client_connection(&Arc::default()), addr)
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::CREATED);
        let names: Vec<_> = answer.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            ["x-kept"],
            "hop-by-hop headers and framing are not passed on"
        );
        assert_eq!(http_body::Body::size_hint(answer.body()).exact(), Some(2));
    }

    #[tokio::test]
    async fn an_empty_answer_is_over_at_once_and_its_connection_reused() {
        const EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (addr, _, _) = pod_answering(EMPTY, EMPTY.len(), Then::KeepAlive).await;
        let idle = Arc::new(Idle::default());
        let answer = answer(&client_connection(&idle), addr).await.unwrap();
        assert!(http_body::Body::is_end_stream(answer.body()));
        assert_eq!(idle_to(&idle, addr), 1);
    }

    #[tokio::test]
    async fn answers_that_close_or_end_oddly_leave_their_connection_unused() {
        for answer_bytes in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
        ] {
            let (addr, accepted, _) = pod_answering(answer_bytes, 1024, Then::KeepAlive).await;
            let idle = Arc::new(Idle::default());
            let upstreams = client_connection(&idle);
            for _ in 0..2 {
                assert_eq!(get(&upstreams, addr).await.unwrap(), "ok");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            assert_eq!(idle_to(&idle, addr), 0);
        }
        // No length: the body runs until the pod closes.
        let until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        let (addr, _, _) = pod_answering(until_close, 4, Then::Close).await;
        let upstreams = client_connection(&Arc::default());
        assert_eq!(get(&upstreams, addr).await.unwrap(), "all of it");
    }

    #[tokio::test]
    async fn malformed_or_truncated_answers_are_errors() {
        let huge_head: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            format!("x-filler: {}\r\n", "a".repeat(2000)).repeat(50)
        )
        .leak()
        .as_bytes();
        let many_headers: &'static [u8] =
            format!("HTTP/1.1 200 OK\r\n{}\r\n", "x: 1\r\n".repeat(101))
                .leak()
                .as_bytes();
        for (wire, error) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not an HTTP/1.1 answer"),
            (huge_head, "head over 64 KiB"),
            (many_headers, "over 100 headers"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                "conflicting Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                "a transfer coding other than chunked",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "101 Switching Protocols",
            ),
        ] {
            let (addr, _, _) = pod_answering(wire, wire.len(), Then::Close).await;
            let upstreams = client_connection(&Arc::default());
            let Err(failed) = answer(&upstreams, addr).await else {
                panic!("{error}: passed on");
            };
            assert_eq!(
                failed.to_string(),
                UpstreamError::Malformed(error).to_string()
            );
        }
        let truncated = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort";
        let (addr, _, _) = pod_answering(truncated, truncated.len(), Then::Close).await;
        let upstreams = client_connection(&Arc::default());
        assert!(matches!(
            get(&upstreams, addr).await,
            Err(UpstreamError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        const SLOW: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n";
        let (addr, accepted, _) = pod_answering(SLOW, 8, Then::KeepAlive).await;
        let idle = Arc::new(Idle::default());
        let upstreams = client_connection(&idle);
        let mut body = answer(&upstreams, addr).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(idle_to(&idle, addr), 0);
        assert_eq!(get(&upstreams, addr).await.unwrap(), "ab");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
