//! The gateway's HTTP/1.1 server side, on the socket itself, as its side towards pods is
//! (`upstream`): a request's head and body are read whole before it is answered (the body
//! is forwarded whole anyway: the gateway reads `model` from it), and an answer's head goes
//! out with its first bytes in one write, the rest frame by frame as the pod sends them.
//! Behind hyper's server the same exchange ran about a third more CPU a request (a bare
//! proxy measured both ways: 89-100 us against 61-72), which counts most when a model's
//! work between requests has evicted the gateway from the caches.
//!
//! A client is a remote like any other: a head is bounded (64 KiB, 100 headers) and must
//! be in within the header timeout, which also bounds idle keep-alive; a body is bounded by
//! `max_body_bytes` and `body_timeout`; a request framed both by `Content-Length` and by
//! `Transfer-Encoding` (RFC 9112 §6.3: the mark of request smuggling) or by a coding other
//! than chunked is refused. Requests reach pods framed anew by the gateway, so no byte of a
//! client's framing reaches a pod.
use super::error::GatewayError;
use super::framing::{Framing, Step};
use super::head::{self, MAX_HEAD_BYTES, MAX_HEADERS};
use super::link::Link;
use super::proxy::{self, GatewayBody};
use axum::body::Bytes;
use axum::http::{Method, Request, Response, StatusCode, Uri, Version, header};
use axum::response::IntoResponse;
use bytes::BytesMut;
use futures::FutureExt;
use http_body::Body as _;
use http_body_util::BodyExt;
use kandle_listen::Closing;
use std::cell::RefCell;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// After refusing a request whose body was not read, how long and how much of it is read
/// and dropped before closing: closing with unread bytes would reset the connection, and
/// the client could lose the answer that says why (RFC 9112 §9.6).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// What bounds a client connection's requests.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// From when a connection waits for a request until that request's head is in.
    pub header_timeout: Duration,
    /// From the head until the whole body is in.
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    /// How long a write may wait for a client that does not read (nginx's `send_timeout`):
    /// past it the connection closes, and a pod's answer with it.
    pub send_timeout: Duration,
}

/// What answers a connection's requests.
pub(super) trait Answer {
    fn answer(&self, request: Request<Bytes>)
    -> impl Future<Output = Response<GatewayBody>> + Send;

    /// Counts a request refused before it could be answered (its head or body).
    fn refused(&self, status: StatusCode);
}

/// Serves one client connection until the client closes it, it fails, a request is
/// refused, or the server shuts down.
pub(super) async fn serve(
    stream: TcpStream,
    answerer: &impl Answer,
    limits: &Limits,
    mut closing: Closing,
) {
    let mut client = Client {
        link: Link::new(stream),
        send_timeout: limits.send_timeout,
    };
    loop {
        let received = tokio::select! {
            biased;
            received = client.request(limits) => received,
            // A closing server closes connections between requests; a head begun is read.
            () = closing.wait(), if client.link.read.is_empty() => return,
        };
        let received = match received {
            Ok(received) => received,
            Err(Stop::Close) => return,
            Err(Stop::Refuse(error)) => {
                tracing::debug!(%error, "request refused");
                let response = proxy::own(error.into_response());
                answerer.refused(response.status());
                let _ = client.respond(response, &Asked::refused()).await;
                client.linger().await;
                return;
            }
        };
        let Received { request, mut asked } = received;
        let response = tokio::select! {
            biased;
            response = answerer.answer(request) => response,
            // The client is gone: dropping the answer's future cancels the pod's work.
            () = client.gone() => return,
        };
        asked.keep_alive &= !closing.is_closing();
        match client.respond(response, &asked).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// Why a connection stops reading requests.
enum Stop {
    /// Without a word: the client closed, went silent, or failed.
    Close,
    /// With this answer.
    Refuse(GatewayError),
}

/// What a request asks of its answer's framing.
struct Asked {
    http11: bool,
    /// `HEAD`: the answer's head only.
    head_only: bool,
    keep_alive: bool,
}

impl Asked {
    /// A refused request's: the connection closes after the answer.
    fn refused() -> Self {
        Self {
            http11: true,
            head_only: false,
            keep_alive: false,
        }
    }
}

struct Received {
    request: Request<Bytes>,
    asked: Asked,
}

/// A client connection and what has been read from it and not yet taken.
struct Client {
    link: Link,
    send_timeout: Duration,
}

/// A request's head: all of it but the body.
struct RequestHead {
    request: Request<()>,
    fields: head::Fields,
    http11: bool,
}

impl Client {
    /// The next request, head and body, each within its time.
    async fn request(&mut self, limits: &Limits) -> Result<Received, Stop> {
        let head = tokio::time::timeout(limits.header_timeout, self.head())
            .await
            .map_err(|_| Stop::Close)??;
        let RequestHead {
            request,
            fields,
            http11,
        } = head;
        let framing = framing(&fields, http11, limits.max_body_bytes).map_err(Stop::Refuse)?;
        let expects_continue = http11
            && request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let body = tokio::time::timeout(
            limits.body_timeout,
            self.body(framing, limits.max_body_bytes, expects_continue),
        )
        .await
        .map_err(|_| Stop::Refuse(GatewayError::BodyTimeout(limits.body_timeout.as_secs())))??;
        let asked = Asked {
            http11,
            head_only: request.method() == Method::HEAD,
            keep_alive: if http11 {
                !fields.close
            } else {
                fields.keep_alive
            },
        };
        Ok(Received {
            request: request.map(|()| body),
            asked,
        })
    }

    /// A request's head, taken off the front of `read` once all of it is there.
    async fn head(&mut self) -> Result<RequestHead, Stop> {
        loop {
            // A connection kept alive comes back with nothing unread: no parse before a read.
            if !self.link.read.is_empty()
                && let Some(head) = parse_head(&mut self.link.read).map_err(Stop::Refuse)?
            {
                return Ok(head);
            }
            match self.link.fill().await {
                Ok(1..) => {}
                Ok(0) | Err(_) => return Err(Stop::Close),
            }
        }
    }

    /// A request's body, whole, within `limit` bytes. A client that asked whether to go on
    /// (`Expect: 100-continue`) is told to when the body has not come with the head.
    async fn body(
        &mut self,
        mut framing: Framing,
        limit: usize,
        mut expects_continue: bool,
    ) -> Result<Bytes, Stop> {
        // The body usually arrives in one piece, kept as read; more are gathered.
        let mut first: Option<Bytes> = None;
        let mut gathered = BytesMut::new();
        loop {
            let step = framing.step(&mut self.link.read).map_err(|why| {
                Stop::Refuse(GatewayError::InvalidRequest(format!(
                    "The request body's chunked framing is broken: {why}"
                )))
            })?;
            match step {
                Step::Data { bytes, last } => {
                    let had = first.as_ref().map_or(0, Bytes::len) + gathered.len();
                    if had + bytes.len() > limit {
                        return Err(Stop::Refuse(GatewayError::PayloadTooLarge(limit)));
                    }
                    if had == 0 {
                        first = Some(bytes);
                    } else {
                        if let Some(first) = first.take() {
                            gathered.extend_from_slice(&first);
                        }
                        gathered.extend_from_slice(&bytes);
                    }
                    if !last {
                        continue;
                    }
                }
                Step::End => {}
                Step::More => {
                    if std::mem::take(&mut expects_continue) {
                        self.link
                            .stream
                            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await
                            .map_err(|_| Stop::Close)?;
                    }
                    match self.link.fill().await {
                        Ok(1..) => continue,
                        Ok(0) | Err(_) => return Err(Stop::Close),
                    }
                }
            }
            return Ok(first.unwrap_or_else(|| gathered.freeze()));
        }
    }

    /// Resolves if the client closes the connection (or it fails) while its request is
    /// answered. What it sends meanwhile (a next request) is kept, up to a head's bound;
    /// past that it is no longer watched.
    async fn gone(&mut self) {
        std::future::poll_fn(|cx| {
            loop {
                if self.link.read.len() >= MAX_HEAD_BYTES {
                    return Poll::Pending;
                }
                match self.link.poll_fill(cx) {
                    Poll::Ready(Ok(1..)) => {}
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
    }

    /// Writes `response` framed for what was `asked`; whether the connection may carry
    /// another request after it.
    async fn respond(
        &mut self,
        response: Response<GatewayBody>,
        asked: &Asked,
    ) -> std::io::Result<bool> {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let mut keep_alive = asked.keep_alive;
        let no_body = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let length = body.size_hint().exact();
        let chunked = !no_body && length.is_none() && asked.http11;
        // An HTTP/1.0 client's answer of unknown length ends when the connection does.
        keep_alive &= no_body || length.is_some() || chunked;
        let mut head = Vec::with_capacity(256 + 64 * parts.headers.len());
        for part in [
            b"HTTP/1.1 ",
            status.as_str().as_bytes(),
            b" ",
            status.canonical_reason().unwrap_or("").as_bytes(),
            b"\r\n",
        ] {
            head.extend_from_slice(part);
        }
        for (name, value) in &parts.headers {
            if !(head::is_hop_by_hop(name) || name == header::CONTENT_LENGTH) {
                for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                    head.extend_from_slice(part);
                }
            }
        }
        if !parts.headers.contains_key(header::DATE) {
            date(&mut head);
        }
        match length {
            _ if no_body => {}
            Some(n) => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                head.extend_from_slice(b"\r\n");
            }
            None if chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
        head.extend_from_slice(match (keep_alive, asked.http11) {
            (false, _) => b"connection: close\r\n\r\n",
            (true, false) => b"connection: keep-alive\r\n\r\n",
            (true, true) => b"\r\n",
        });
        if no_body || asked.head_only {
            self.write(&[&head]).await?;
            return Ok(keep_alive);
        }
        // The head waits for the body's first bytes when they are there already: one
        // write for both. An answer still being worked on gets its head at once.
        let mut pending = head;
        let mut sent = 0u64;
        loop {
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => {
                    self.write(&[&pending]).await?;
                    pending.clear();
                    body.frame().await
                }
            };
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers are not passed on; nor are empty frames, which would end a
                    // chunked body.
                    _ => continue,
                },
                None => {
                    if chunked {
                        pending.extend_from_slice(b"0\r\n\r\n");
                    }
                    self.write(&[&pending]).await?;
                    // A body shorter than its length leaves the client waiting for the rest.
                    return Ok(keep_alive && length.is_none_or(|n| n == sent));
                }
                // The pod failed mid-answer: the client sees the answer cut short.
                Some(Err(_)) => return Ok(false),
            };
            sent += data.len() as u64;
            if length.is_some_and(|n| sent > n) {
                return Ok(false);
            }
            if chunked {
                let mut size = [0u8; 18];
                let line = chunk_line(data.len(), &mut size);
                let end: &[u8] = if body.is_end_stream() {
                    b"\r\n0\r\n\r\n"
                } else {
                    b"\r\n"
                };
                self.write(&[&pending, line, &data, end]).await?;
                if body.is_end_stream() {
                    return Ok(keep_alive);
                }
            } else {
                self.write(&[&pending, &data]).await?;
            }
            pending.clear();
        }
    }

    /// Writes `parts` whole, in as few system calls as the socket takes them.
    async fn write(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut slices = [IoSlice::new(&[]); 4];
        let mut count = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            slices[count] = IoSlice::new(part);
            count += 1;
        }
        let mut slices = &mut slices[..count];
        while !slices.is_empty() {
            let n =
                tokio::time::timeout(self.send_timeout, self.link.stream.write_vectored(slices))
                    .await
                    .map_err(|_| std::io::ErrorKind::TimedOut)??;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }

    /// After a refusal: says it has finished, then reads and drops what the client still
    /// sends, for a bounded time and amount, before the connection closes.
    async fn linger(&mut self) {
        let _ = self.link.stream.shutdown().await;
        let mut dropped = 0;
        let mut scratch = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            while dropped < LINGER_BYTES {
                match self.link.stream.read(&mut scratch).await {
                    Ok(n @ 1..) => dropped += n,
                    _ => return,
                }
            }
        })
        .await;
    }
}

/// A request's head taken off the front of `read`, once all of it is there.
fn parse_head(read: &mut BytesMut) -> Result<Option<RequestHead>, GatewayError> {
    // Left uninitialised: filling 100 empty headers would write 3 KiB for every parse.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        read,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if read.len() < MAX_HEAD_BYTES => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(GatewayError::HeadTooLarge);
        }
        Err(e) => {
            return Err(GatewayError::InvalidRequest(format!(
                "The request's head is malformed: {e}"
            )));
        }
    };
    let malformed = |why: &str| GatewayError::InvalidRequest(format!("The request's {why}"));
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| malformed("method is invalid"))?;
    let target = parsed.path.unwrap_or_default();
    let target_at = target.as_ptr() as usize - read.as_ptr() as usize;
    let target_len = target.len();
    let http11 = parsed.version == Some(1);
    let mut places = [head::Place::default(); MAX_HEADERS];
    let count = head::place(read, parsed.headers, &mut places);
    let bytes = read.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(bytes.slice(target_at..target_at + target_len))
        .map_err(|_| malformed("target is not a valid URI"))?;
    let mut fields = head::fields(&bytes, &places[..count])
        .map_err(|why| malformed(&format!("headers are invalid: {why}")))?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *request.headers_mut() = std::mem::take(&mut fields.headers);
    Ok(Some(RequestHead {
        request,
        fields,
        http11,
    }))
}

/// How a request's body is framed (RFC 9112 §6.3), refused when its framing is ambiguous or
/// its declared length over `limit`.
fn framing(fields: &head::Fields, http11: bool, limit: usize) -> Result<Framing, GatewayError> {
    match (fields.chunked, fields.length) {
        (true, Some(_)) => Err(GatewayError::InvalidRequest(
            "A request may not carry both Content-Length and Transfer-Encoding".into(),
        )),
        (true, None) if !http11 => Err(GatewayError::InvalidRequest(
            "Transfer-Encoding needs HTTP/1.1".into(),
        )),
        (true, None) => Ok(Framing::chunked()),
        (false, Some(n)) if n > limit as u64 => Err(GatewayError::PayloadTooLarge(limit)),
        (false, length) => Ok(Framing::Length(length.unwrap_or(0))),
    }
}

/// A chunk's size line, in hex, written into `buffer`.
fn chunk_line(size: usize, buffer: &mut [u8; 18]) -> &[u8] {
    let digits = (usize::BITS - size.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in buffer[..digits].iter_mut().enumerate() {
        let nibble = (size >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    buffer[digits..digits + 2].copy_from_slice(b"\r\n");
    &buffer[..digits + 2]
}

/// Appends a `Date` header, formatted once a second per serving thread.
fn date(head: &mut Vec<u8>) {
    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    NOW.with_borrow_mut(|(at, value)| {
        if *at != second {
            *at = second;
            *value = httpdate::fmt_http_date(now);
        }
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use kandle_listen::ConnectionLimits;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::TcpListener;

    /// Answers `POST` with what it received, `GET /stream` with a body of unknown length
    /// sent in two parts a moment apart, `GET /slow` never and `GET /endless` with a body
    /// that never ends (each noting when it is dropped), and anything else with its method
    /// and path.
    #[derive(Default)]
    struct Echo {
        slow_dropped: Arc<AtomicBool>,
        endless_dropped: Arc<AtomicBool>,
        refused: std::sync::Mutex<Vec<u16>>,
    }

    struct NoteDrop(Arc<AtomicBool>);

    impl Drop for NoteDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Answer for Echo {
        async fn answer(&self, request: Request<Bytes>) -> Response<GatewayBody> {
            let body = match (request.method(), request.uri().path()) {
                (&Method::POST, _) => Body::from(request.into_body()),
                (_, "/stream") => Body::from_stream(futures::stream::unfold(0, |n| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (n < 2).then(|| (Ok::<_, std::io::Error>(format!("part{n};")), n + 1))
                })),
                (_, "/endless") => {
                    let noted = NoteDrop(self.endless_dropped.clone());
                    Body::from_stream(futures::stream::repeat_with(move || {
                        let _keep = &noted;
                        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 * 1024]))
                    }))
                }
                (_, "/slow") => {
                    let _noted = NoteDrop(self.slow_dropped.clone());
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                (method, path) => Body::from(format!("{method} {path}")),
            };
            proxy::own(Response::new(body))
        }

        fn refused(&self, status: StatusCode) {
            self.refused.lock().unwrap().push(status.as_u16());
        }
    }

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        max_body_bytes: 64,
        send_timeout: Duration::from_millis(300),
    };

    /// A front on loopback answering with `echo` until `shutdown` resolves.
    async fn front(
        echo: Arc<Echo>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 16,
            header_timeout: LIMITS.header_timeout,
        };
        tokio::spawn(kandle_listen::serve_connections(
            listener,
            limits,
            shutdown,
            move |stream, closing| {
                let echo = echo.clone();
                async move { serve(stream, &*echo, &LIMITS, closing).await }
            },
        ));
        addr
    }

    /// Sends `wire` on a new connection and reads until the gateway closes it (or 3 s pass).
    async fn exchange(addr: SocketAddr, wire: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(wire).await.unwrap();
        read_to_close(&mut stream).await
    }

    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut read = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut read)).await;
        String::from_utf8_lossy(&read).into_owned()
    }

    /// Reads until `read` holds `text`.
    async fn read_until(stream: &mut TcpStream, read: &mut Vec<u8>, text: &str) {
        tokio::time::timeout(Duration::from_secs(3), async {
            while !String::from_utf8_lossy(read).contains(text) {
                let mut buffer = [0; 1024];
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(
                    n > 0,
                    "closed before {text:?}: {}",
                    String::from_utf8_lossy(read)
                );
                read.extend_from_slice(&buffer[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {text:?} in {}", String::from_utf8_lossy(read)));
    }

    #[tokio::test]
    async fn requests_pipelined_on_one_connection_are_answered_in_order() {
        let addr = front(Arc::default(), std::future::pending()).await;
        let answer = exchange(
            addr,
            b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let bodies: Vec<&str> = answer
            .split("\r\n\r\n")
            .skip(1)
            .map(|b| &b[..b.find("HTTP/").unwrap_or(b.len())])
            .collect();
        assert_eq!(bodies, ["GET /a", "hello", "GET /c"], "{answer}");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert_eq!(answer.matches("content-length: ").count(), 3, "{answer}");
        assert_eq!(answer.matches("date: ").count(), 3, "{answer}");
        assert!(
            answer.contains("connection: close\r\n\r\nGET /c"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_gathered_and_a_client_that_expects_is_told_to_go_on() {
        let addr = front(Arc::default(), std::future::pending()).await;
        let answer = exchange(
            addr,
            b"POST /v1/x HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n",
        )
        .await;
        assert!(
            answer.ends_with("content-length: 7\r\nconnection: close\r\n\r\nabcdefg"),
            "{answer}"
        );

        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /v1/x HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
            .await
            .unwrap();
        let mut read = Vec::new();
        read_until(&mut stream, &mut read, "HTTP/1.1 100 Continue\r\n\r\n").await;
        stream.write_all(b"ok").await.unwrap();
        read_until(&mut stream, &mut read, "\r\n\r\nok").await;
    }

    /// The answer's status line and OpenAI error, and whether the connection was closed.
    async fn refused(addr: SocketAddr, wire: &[u8]) -> (String, serde_json::Value) {
        let answer = exchange(addr, wire).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.contains("connection: close"), "{answer}");
        let error: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        (
            head.lines().next().unwrap_or_default().to_string(),
            error["error"].clone(),
        )
    }

    #[tokio::test]
    async fn ambiguous_oversized_or_broken_requests_are_refused_in_openai_shape() {
        let echo = Arc::new(Echo::default());
        let addr = front(echo.clone(), std::future::pending()).await;
        for (wire, status, says) in [
            (
                &b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
                "HTTP/1.1 400 Bad Request",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                "HTTP/1.1 400 Bad Request",
                "other than chunked",
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
                "HTTP/1.1 400 Bad Request",
                "conflicting Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 65\r\n\r\n",
                "HTTP/1.1 413 Payload Too Large",
                "limit of 64 bytes",
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n30\r\n\
                  aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n30\r\naaaaaaaaaaaaaaaaaaaaaaaaa",
                "HTTP/1.1 413 Payload Too Large",
                "limit of 64 bytes",
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "HTTP/1.1 400 Bad Request",
                "an invalid chunk size",
            ),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "HTTP/1.1 400 Bad Request", "malformed"),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request", "malformed"),
        ] {
            let (line, error) = refused(addr, wire).await;
            assert_eq!(line, status, "{}", String::from_utf8_lossy(wire));
            assert!(error["message"].as_str().unwrap_or_default().contains(says), "{error}");
            assert_eq!(error["type"], "invalid_request_error");
        }
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        while huge.len() < MAX_HEAD_BYTES + 100 {
            huge.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let (line, _) = refused(addr, &huge).await;
        assert_eq!(line, "HTTP/1.1 431 Request Header Fields Too Large");
        // Each refusal is counted, for the gateway's metrics.
        assert_eq!(
            *echo.refused.lock().unwrap(),
            [400, 400, 400, 413, 413, 400, 400, 400, 431]
        );
    }

    #[tokio::test]
    async fn a_body_late_is_a_408_and_a_silent_connection_is_closed() {
        let addr = front(Arc::default(), std::future::pending()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nhalf")
            .await
            .unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );

        let started = std::time::Instant::now();
        let answer = exchange(addr, b"GET / HTT").await;
        assert_eq!(answer, "", "a half-sent head is dropped without a word");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn http_1_0_clients_get_closes_unless_they_keep_alive_and_a_stream_is_chunked() {
        let addr = front(Arc::default(), std::future::pending()).await;
        let answer = exchange(addr, b"GET /stream HTTP/1.0\r\n\r\n").await;
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        assert!(
            answer.ends_with("connection: close\r\n\r\npart0;part1;"),
            "{answer}"
        );

        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let mut read = Vec::new();
        read_until(
            &mut stream,
            &mut read,
            "connection: keep-alive\r\n\r\nGET /a",
        )
        .await;
        stream.write_all(b"HEAD /b HTTP/1.1\r\n\r\n").await.unwrap();
        read_until(&mut stream, &mut read, "content-length: 7\r\n\r\n").await;

        // Chunks go out as the answer makes them, the first before the second is made.
        stream
            .write_all(b"GET /stream HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut stream, &mut read, "transfer-encoding: chunked\r\n").await;
        read_until(&mut stream, &mut read, "\r\n6\r\npart0;\r\n").await;
        assert!(!String::from_utf8_lossy(&read).contains("part1"));
        read_until(&mut stream, &mut read, "6\r\npart1;\r\n0\r\n\r\n").await;
    }

    #[tokio::test]
    async fn a_client_gone_drops_its_answer_and_shutdown_closes_idle_connections() {
        let echo = Arc::new(Echo::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = front(echo.clone(), async move {
            let _ = stopped.await;
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!echo.slow_dropped.load(Ordering::SeqCst));
        drop(stream);
        until_set(&echo.slow_dropped, "still answering a client gone").await;

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
        let mut read = Vec::new();
        read_until(&mut idle, &mut read, "GET /a").await;
        stop.send(()).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(read_to_close(&mut idle).await, "");
        assert!(
            started.elapsed() < LIMITS.header_timeout,
            "closed on shutdown, not by timeout"
        );
    }

    /// Waits until `flag` is set, for at most 3 s.
    async fn until_set(flag: &AtomicBool, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !flag.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_let_go_after_the_send_timeout() {
        let echo = Arc::new(Echo::default());
        let addr = front(echo.clone(), std::future::pending()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /endless HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        until_set(
            &echo.endless_dropped,
            "still answering a client that reads nothing",
        )
        .await;
        drop(stream);
    }

    #[test]
    fn chunk_lines_are_lowercase_hex() {
        let mut buffer = [0; 18];
        for (size, line) in [
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (4096, "1000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            assert_eq!(chunk_line(size, &mut buffer), line.as_bytes());
        }
    }
}
