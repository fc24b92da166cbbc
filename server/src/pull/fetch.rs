//! One file into a part file, resumed from whatever an earlier attempt (or process) left,
//! written and hashed by its sink as it streams, retried with backoff on transient
//! failures, and verified against the size and digest its source publishes. Files of known
//! size come in segments (`segments`); a URL of unknown size in one stream.
use super::error::PullError;
use super::progress::Progress;
use super::sink::{Sink, Writer, Written};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStore;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A hash a source publishes for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    Sha256(String),
    /// Git's blob id (sha1 of "blob SIZE\0" and the content): the hub's hash for files
    /// kept outside LFS.
    GitBlobSha1(String),
    /// An S3 ETag of a single-part upload: the content's MD5.
    Md5(String),
}

#[derive(Debug, Clone)]
pub struct RemoteFile {
    /// Where it goes inside the model folder.
    pub path: String,
    /// Where it comes from: fetched over HTTP unless `object` is set; named in errors.
    pub url: String,
    /// The store and key of an s3:// file.
    pub object: Option<(Arc<dyn ObjectStore>, object_store::path::Path)>,
    pub size: Option<u64>,
    pub digest: Option<Digest>,
}

/// What landed, as the marker records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Checked against a hash its source published; false when only its size was known
    /// (a URL without `--sha256`, an S3 multipart upload).
    #[serde(default = "verified_by_default")]
    pub verified: bool,
}

/// Markers written before `verified` existed held only verified files.
fn verified_by_default() -> bool {
    true
}

/// Fetches a fresh Authorization header (a registry's new bearer token).
pub type Renew = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<Option<String>, PullError>>
        + Send
        + Sync,
>;

/// The Authorization header a source's requests carry (a bearer token, Basic
/// credentials; never logged). A registry's bearer tokens expire, Docker Hub's after five
/// minutes, well within a large pull: a 401 asks `renew` for a fresh header, once for all
/// the requests that carried the stale one, and the request is sent again.
#[derive(Clone, Default)]
pub struct Authorization {
    header: Arc<std::sync::RwLock<Option<String>>>,
    renew: Option<(Renew, Arc<tokio::sync::Mutex<()>>)>,
}

impl Authorization {
    pub fn fixed(header: Option<String>) -> Self {
        Self {
            header: Arc::new(std::sync::RwLock::new(header)),
            renew: None,
        }
    }

    pub fn renewable(header: Option<String>, renew: Renew) -> Self {
        Self {
            renew: Some((renew, Arc::default())),
            ..Self::fixed(header)
        }
    }

    fn current(&self) -> Option<String> {
        self.header.read().expect("not poisoned").clone()
    }

    /// After a 401 to a request that carried `sent`: whether a new header is there to try.
    async fn renewed(&self, sent: &Option<String>) -> Result<bool, PullError> {
        let Some((renew, one_at_a_time)) = &self.renew else {
            return Ok(false);
        };
        let _turn = one_at_a_time.lock().await;
        if self.current() != *sent {
            // Another request renewed it meanwhile.
            return Ok(true);
        }
        let fresh = renew().await?;
        let changed = fresh != *sent;
        *self.header.write().expect("not poisoned") = fresh;
        Ok(changed)
    }
}

pub struct Fetcher {
    pub client: reqwest::Client,
    pub authorization: Authorization,
    /// What to do about a 401 or 403, for the source's error.
    pub denied_hint: &'static str,
    pub retry_budget: Duration,
    /// Files at least this large may use several connections.
    pub split_min: u64,
    /// Connections one file may use at once.
    pub connections_per_file: usize,
}

/// Exponential backoff with jitter for transient failures, within a budget of time without
/// progress: a try that moved the download forward starts both over, since a connection
/// dropped after sending bytes says nothing about the source's health.
pub(super) struct Backoff {
    started: Instant,
    next: Duration,
    budget: Duration,
}

impl Backoff {
    pub(super) fn new(budget: Duration) -> Self {
        Self {
            started: Instant::now(),
            next: Duration::from_millis(250),
            budget,
        }
    }

    /// The last try moved the download forward.
    pub(super) fn progressed(&mut self) {
        *self = Self::new(self.budget);
    }

    /// Waits before the next try after a transient failure; gives up (returning the
    /// error) when it is permanent or the budget is spent.
    pub(super) async fn wait(
        &mut self,
        file: &RemoteFile,
        error: PullError,
    ) -> Result<(), PullError> {
        if !error.is_transient() {
            return Err(error);
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (self.next.as_millis() as u64 / 2 + 1));
        let wait = self.next + jitter;
        if self.started.elapsed() + wait > self.budget {
            return Err(PullError::RetriesExhausted {
                uri: file.url.clone(),
                seconds: self.started.elapsed().as_secs(),
                last: error.to_string(),
            });
        }
        tracing::warn!(file = %file.path, %error, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
        tokio::time::sleep(wait).await;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        Ok(())
    }
}

impl Fetcher {
    /// Downloads `file` into `part` and verifies it; a bad file is deleted and fetched once
    /// more from scratch before the pull fails naming both hashes.
    pub async fn fetch(
        &self,
        file: &RemoteFile,
        part: &Path,
        progress: &Progress,
    ) -> Result<FileRecord, PullError> {
        let mut second_try = false;
        loop {
            let Written { len, sha256, check } = match file.size {
                Some(size) => self.fetch_segments(file, part, size, progress).await?,
                None => self.fetch_sequential(file, part, progress).await?,
            };
            let actual = match &file.digest {
                Some(Digest::Sha256(_)) => Some(sha256.clone()),
                Some(_) => check,
                None => None,
            };
            let mismatch = match (file.size, &file.digest, actual) {
                (Some(size), _, _) if size != len => Some(PullError::Size {
                    file: file.path.clone(),
                    expected: size,
                    actual: len,
                }),
                (
                    _,
                    Some(
                        Digest::Sha256(expected)
                        | Digest::GitBlobSha1(expected)
                        | Digest::Md5(expected),
                    ),
                    Some(actual),
                ) if !expected.eq_ignore_ascii_case(&actual) => Some(PullError::Integrity {
                    file: file.path.clone(),
                    expected: expected.clone(),
                    actual,
                }),
                _ => None,
            };
            let Some(error) = mismatch else {
                return Ok(FileRecord {
                    path: file.path.clone(),
                    size: len,
                    sha256,
                    verified: file.digest.is_some(),
                });
            };
            progress.add_negative(len);
            tokio::fs::remove_file(part)
                .await
                .map_err(PullError::io(part))?;
            let _ = tokio::fs::remove_file(super::segments::marks(part)).await;
            if second_try {
                return Err(error);
            }
            tracing::warn!(file = %file.path, %error, "verification failed; fetching the file again from scratch");
            second_try = true;
        }
    }

    /// A file of unknown size in one stream, resumed from the part's length.
    async fn fetch_sequential(
        &self,
        file: &RemoteFile,
        part: &Path,
        progress: &Progress,
    ) -> Result<Written, PullError> {
        let handle = open_part(part)?;
        let len = handle.metadata().map_err(PullError::io(part))?.len();
        progress.add(len);
        let sink = Sink::start(handle, part, file, [(0, len)], None)?;
        let mut writer = sink.tx().writer(len);
        let downloaded = self
            .download_with_retries(file, &mut writer, progress)
            .await;
        drop(writer);
        // A failed write stops the download too, and is the cause to report.
        let written = sink.finish().await?;
        downloaded?;
        Ok(written)
    }

    async fn download_with_retries(
        &self,
        file: &RemoteFile,
        writer: &mut Writer<'_>,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let mut backoff = Backoff::new(self.retry_budget);
        loop {
            let before = writer.position();
            match self.download_once(file, writer, progress).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if writer.position() > before {
                        backoff.progressed();
                    }
                    backoff.wait(file, e).await?;
                }
            }
        }
    }

    async fn download_once(
        &self,
        file: &RemoteFile,
        writer: &mut Writer<'_>,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let (mut body, total) = self.http_body(file, writer, progress).await?;
        let received = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                if writer.position() + chunk.len() as u64 > total {
                    return Err(PullError::Refused {
                        uri: file.url.clone(),
                        reason: format!("the server sent more than the {total} bytes it announced"),
                    });
                }
                progress.add(chunk.len() as u64);
                writer.push(&chunk).await?;
            }
            if writer.position() < total {
                return Err(PullError::Network {
                    uri: file.url.clone(),
                    message: format!("connection closed at byte {} of {total}", writer.position()),
                });
            }
            Ok(())
        }
        .await;
        // What arrived before a failure is kept: the next try resumes after it.
        writer.flush().await?;
        received
    }

    /// The rest of the file over HTTP (a Range request when a part exists), with the whole
    /// file's size as the server announces it: a file of unknown size has no bound, so it
    /// is refused.
    async fn http_body(
        &self,
        file: &RemoteFile,
        writer: &mut Writer<'_>,
        progress: &Progress,
    ) -> Result<(BoxStream<'static, Result<Bytes, PullError>>, u64), PullError> {
        let range = (writer.position() > 0).then(|| format!("bytes={}-", writer.position()));
        let response = self.get(file, range).await?;
        let total = match response.status() {
            StatusCode::PARTIAL_CONTENT => response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, total)| total.parse::<u64>().ok()),
            _ => response.content_length(),
        };
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // The server ignored the range: start over.
            StatusCode::OK => self.restart(writer, progress).await?,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The part is longer than the file: it is not this file's prefix.
                self.restart(writer, progress).await?;
                return Err(PullError::Network {
                    uri: file.url.clone(),
                    message: "range not satisfiable; starting the file over".into(),
                });
            }
            status => {
                return Err(PullError::from_status(
                    &file.url,
                    status.as_u16(),
                    self.denied_hint,
                ));
            }
        }
        let total = total.ok_or_else(|| PullError::Refused {
            uri: file.url.clone(),
            reason: "the server announced no size (Content-Length); a download needs a bound"
                .into(),
        })?;
        Ok((body(file, response).boxed(), total))
    }

    /// GETs `file` with the source's authorization and `range` (a Range header) if given;
    /// once more with a renewed authorization after a 401.
    pub(super) async fn get(
        &self,
        file: &RemoteFile,
        range: Option<String>,
    ) -> Result<reqwest::Response, PullError> {
        let sent = self.authorization.current();
        let response = self.send(file, range.as_deref(), &sent).await?;
        if response.status() == StatusCode::UNAUTHORIZED
            && self.authorization.renewed(&sent).await?
        {
            tracing::info!(file = %file.path, "the authorization expired; renewed it");
            return self
                .send(file, range.as_deref(), &self.authorization.current())
                .await;
        }
        Ok(response)
    }

    async fn send(
        &self,
        file: &RemoteFile,
        range: Option<&str>,
        authorization: &Option<String>,
    ) -> Result<reqwest::Response, PullError> {
        let mut request = self.client.get(&file.url);
        if let Some(range) = range {
            request = request.header(RANGE, range);
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request
            .send()
            .await
            .map_err(|e| network_error(&file.url, &e))
    }

    /// Throws the part away: the source will send the file from its start.
    async fn restart(&self, writer: &mut Writer<'_>, progress: &Progress) -> Result<(), PullError> {
        progress.add_negative(writer.position());
        writer.restart().await
    }
}

/// A small answer (a listing) read whole, refused past `max` bytes whatever its headers say.
pub(super) async fn bounded_body(
    uri: &str,
    response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, PullError> {
    let too_large = || PullError::Refused {
        uri: uri.into(),
        reason: format!("the answer is larger than {max} bytes"),
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| network_error(uri, &e))?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A response's body, its failures named after `file`.
pub(super) fn body(
    file: &RemoteFile,
    response: reqwest::Response,
) -> impl futures::Stream<Item = Result<Bytes, PullError>> + Send + 'static {
    let uri = file.url.clone();
    response
        .bytes_stream()
        .map(move |chunk| chunk.map_err(|e| network_error(&uri, &e)))
}

fn network_error(uri: &str, e: &reqwest::Error) -> PullError {
    PullError::Network {
        uri: uri.into(),
        message: network_message(e),
    }
}

/// A file's part in the staging folder, as an earlier attempt left it (or new).
pub(super) fn open_part(part: &Path) -> Result<std::fs::File, PullError> {
    if let Some(parent) = part.parent() {
        std::fs::create_dir_all(parent).map_err(PullError::io(parent))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(PullError::io(part))
}

/// object_store's errors as pull errors: missing and forbidden are permanent, the rest
/// (network, throttling, 5xx after the store's own retries) transient.
pub fn s3_error(uri: &str, e: object_store::Error) -> PullError {
    match e {
        object_store::Error::NotFound { .. } => PullError::NotFound { uri: uri.into() },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => PullError::Unauthorized {
            uri: uri.into(),
            status: 403,
            hint: "; check the AWS credentials",
        },
        other => {
            // object_store reports list failures as Generic, with the HTTP status only in
            // the message; a 4xx there is as permanent as any other.
            let message = other.to_string();
            let status = message
                .split("status code: ")
                .nth(1)
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok());
            match status {
                Some(404) => PullError::NotFound { uri: uri.into() },
                Some(401 | 403) => PullError::Unauthorized {
                    uri: uri.into(),
                    status: 403,
                    hint: "; check the AWS credentials",
                },
                Some(status) if (400..500).contains(&status) && status != 429 => {
                    PullError::Status {
                        uri: uri.into(),
                        status,
                    }
                }
                _ => PullError::Network {
                    uri: uri.into(),
                    message,
                },
            }
        }
    }
}

/// reqwest's Display hides the cause (reset, timeout); the chain says what happened.
pub(super) fn network_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
