//! One file into a part file: resumed from whatever an earlier attempt (or process) left,
//! hashed as it streams, retried with backoff on transient failures, and verified against
//! the size and digest its source publishes. HTTP uses Range requests, S3 ranged GETs.
use super::error::PullError;
use super::progress::Progress;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{GetOptions, GetRange, ObjectStore};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, RANGE};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE_BUFFER: usize = 1 << 20;

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

/// The hash a digest other than sha256 needs, computed alongside sha256.
enum Check {
    Sha1(Sha1),
    Md5(md5::Context),
}

impl Check {
    fn new(digest: Option<&Digest>, size: Option<u64>) -> Option<Self> {
        match (digest?, size) {
            (Digest::GitBlobSha1(_), Some(size)) => {
                let mut h = Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Some(Self::Sha1(h))
            }
            (Digest::Md5(_), _) => Some(Self::Md5(md5::Context::new())),
            _ => None,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha1(h) => h.update(bytes),
            Self::Md5(h) => h.consume(bytes),
        }
    }

    fn hex(self) -> String {
        match self {
            Self::Sha1(h) => hex::encode(h.finalize()),
            Self::Md5(h) => format!("{:x}", h.finalize()),
        }
    }
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
}

pub struct Fetcher {
    pub client: reqwest::Client,
    /// Sent as a bearer token; never logged.
    pub token: Option<String>,
    pub retry_budget: Duration,
    /// HTTP files at least this large are fetched in parallel ranges.
    pub ranged_min: u64,
    /// Ranges of one file in flight at once.
    pub range_parts: usize,
}

/// Exponential backoff with jitter for transient failures, within a total budget.
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

/// The part file and the hashes of the bytes it holds so far.
struct Partial {
    /// Large writes: the network hands over small chunks.
    file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    len: u64,
    hashes: Hashes,
}

/// sha256, and the source's own check where it differs, computed on a thread of their
/// own so that hashing overlaps receiving and writing.
pub(super) struct Hashes {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    thread: std::thread::JoinHandle<(String, Option<String>)>,
}

impl Hashes {
    pub(super) fn start(remote: &RemoteFile) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let mut check = Check::new(remote.digest.as_ref(), remote.size);
        let thread = std::thread::spawn(move || {
            let mut sha256 = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                sha256.update(&chunk);
                if let Some(c) = &mut check {
                    c.update(&chunk);
                }
            }
            (hex::encode(sha256.finalize()), check.map(Check::hex))
        });
        Self { tx, thread }
    }

    pub(super) async fn update(&self, chunk: Bytes) {
        // The thread only stops once the sender is dropped, so this cannot fail.
        let _ = self.tx.send(chunk).await;
    }

    /// The sha256 and the check's digest of everything sent.
    pub(super) async fn finish(self) -> (String, Option<String>) {
        drop(self.tx);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("hash thread"))
            .await
            .expect("join hash thread")
    }
}

impl Partial {
    async fn open(path: &Path, remote: &RemoteFile) -> Result<Self, PullError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(PullError::io(parent))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(PullError::io(path))?;
        let mut partial = Self {
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            path: path.to_path_buf(),
            len: 0,
            hashes: Hashes::start(remote),
        };
        // Hash what an earlier attempt or process left, so the digest covers the whole file.
        let mut existing = tokio::fs::File::open(path)
            .await
            .map_err(PullError::io(path))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = existing.read(&mut buf).await.map_err(PullError::io(path))?;
            if n == 0 {
                return Ok(partial);
            }
            partial.len += n as u64;
            partial
                .hashes
                .update(Bytes::copy_from_slice(&buf[..n]))
                .await;
        }
    }

    async fn append(&mut self, chunk: Bytes) -> Result<(), PullError> {
        self.file
            .write_all(&chunk)
            .await
            .map_err(PullError::io(&self.path))?;
        self.len += chunk.len() as u64;
        self.hashes.update(chunk).await;
        Ok(())
    }

    /// Throws the part away: the source will send the file from its start.
    async fn restart(&mut self, remote: &RemoteFile, progress: &Progress) -> Result<(), PullError> {
        progress.add_negative(self.len);
        self.file.flush().await.map_err(PullError::io(&self.path))?;
        self.file
            .get_mut()
            .set_len(0)
            .await
            .map_err(PullError::io(&self.path))?;
        self.len = 0;
        // The old thread ends when its sender drops with the replaced value.
        self.hashes = Hashes::start(remote);
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
            let ranged = match file.size {
                Some(size) if file.object.is_none() && size >= self.ranged_min => {
                    self.fetch_ranged(file, part, size, progress).await?
                }
                _ => None,
            };
            let (len, sha256, check) = match ranged {
                Some(done) => done,
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
                });
            };
            progress.add_negative(len);
            tokio::fs::remove_file(part)
                .await
                .map_err(PullError::io(part))?;
            let _ = tokio::fs::remove_file(super::ranged::marks(part)).await;
            if second_try {
                return Err(error);
            }
            tracing::warn!(file = %file.path, %error, "verification failed; fetching the file again from scratch");
            second_try = true;
        }
    }

    /// The whole file in one stream, resumed from the part's length.
    async fn fetch_sequential(
        &self,
        file: &RemoteFile,
        part: &Path,
        progress: &Progress,
    ) -> Result<(u64, String, Option<String>), PullError> {
        let mut partial = Partial::open(part, file).await?;
        progress.add(partial.len);
        self.download_with_retries(file, &mut partial, progress)
            .await?;
        partial.file.flush().await.map_err(PullError::io(part))?;
        partial
            .file
            .get_ref()
            .sync_all()
            .await
            .map_err(PullError::io(part))?;
        let Partial { len, hashes, .. } = partial;
        let (sha256, check) = hashes.finish().await;
        Ok((len, sha256, check))
    }

    async fn download_with_retries(
        &self,
        file: &RemoteFile,
        partial: &mut Partial,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let mut backoff = Backoff::new(self.retry_budget);
        loop {
            match self.download_once(file, partial, progress).await {
                Ok(()) => return Ok(()),
                Err(e) => backoff.wait(file, e).await?,
            }
        }
    }

    async fn download_once(
        &self,
        file: &RemoteFile,
        partial: &mut Partial,
        progress: &Progress,
    ) -> Result<(), PullError> {
        if file.size.is_some_and(|size| partial.len == size) {
            return Ok(());
        }
        let mut body = match &file.object {
            Some((store, key)) => self.s3_body(file, store.as_ref(), key, partial.len).await?,
            None => self.http_body(file, partial, progress).await?,
        };
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            progress.add(chunk.len() as u64);
            partial.append(chunk).await?;
        }
        partial
            .file
            .flush()
            .await
            .map_err(PullError::io(&partial.path))?;
        Ok(())
    }

    /// The rest of the file over HTTP: a Range request when a part exists.
    async fn http_body(
        &self,
        file: &RemoteFile,
        partial: &mut Partial,
        progress: &Progress,
    ) -> Result<BoxStream<'static, Result<Bytes, PullError>>, PullError> {
        let mut request = self.client.get(&file.url);
        if partial.len > 0 {
            request = request.header(RANGE, format!("bytes={}-", partial.len));
        }
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let uri = file.url.clone();
        let network = move |e: reqwest::Error| PullError::Network {
            uri: uri.clone(),
            message: network_message(&e),
        };
        let response = request.send().await.map_err(network.clone())?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // The server ignored the range: start over.
            StatusCode::OK => partial.restart(file, progress).await?,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The part is longer than the file: it is not this file's prefix.
                partial.restart(file, progress).await?;
                return Err(PullError::Network {
                    uri: file.url.clone(),
                    message: "range not satisfiable; starting the file over".into(),
                });
            }
            status => {
                return Err(PullError::from_status(
                    &file.url,
                    status.as_u16(),
                    self.token.is_some(),
                ));
            }
        }
        Ok(response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(&network))
            .boxed())
    }

    /// The rest of an S3 object: a ranged GET when a part exists.
    async fn s3_body(
        &self,
        file: &RemoteFile,
        store: &dyn ObjectStore,
        key: &object_store::path::Path,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, PullError>>, PullError> {
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let result = store
            .get_opts(key, options)
            .await
            .map_err(|e| s3_error(&file.url, e))?;
        let uri = file.url.clone();
        Ok(result
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| s3_error(&uri, e)))
            .boxed())
    }
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
