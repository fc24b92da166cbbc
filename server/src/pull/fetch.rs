//! One file over HTTP into a part file: resumed with a Range request from whatever an
//! earlier attempt (or process) left, hashed as it streams, retried with backoff on
//! transient failures, and verified against the size and digest its source publishes.
use super::error::PullError;
use super::progress::Progress;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, RANGE};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A hash a source publishes for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    Sha256(String),
    /// Git's blob id (sha1 of "blob SIZE\0" and the content): the hub's hash for files
    /// kept outside LFS.
    GitBlobSha1(String),
}

#[derive(Debug, Clone)]
pub struct RemoteFile {
    /// Where it goes inside the model folder.
    pub path: String,
    pub url: String,
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
}

/// The part file and the hashes of the bytes it holds so far.
struct Partial {
    file: tokio::fs::File,
    path: PathBuf,
    len: u64,
    sha256: Sha256,
    sha1: Option<Sha1>,
}

impl Partial {
    async fn open(path: &Path, size: Option<u64>, want_sha1: bool) -> Result<Self, PullError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(PullError::io(parent))?;
        }
        // Hash what an earlier attempt or process left, so the digest covers the whole file.
        let mut partial = Self {
            file: tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(PullError::io(path))?,
            path: path.to_path_buf(),
            len: 0,
            sha256: Sha256::new(),
            sha1: None,
        };
        partial.reset_hashes(size, want_sha1);
        let mut existing = tokio::fs::File::open(path)
            .await
            .map_err(PullError::io(path))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = existing.read(&mut buf).await.map_err(PullError::io(path))?;
            if n == 0 {
                break;
            }
            partial.update(&buf[..n]);
        }
        Ok(partial)
    }

    fn reset_hashes(&mut self, size: Option<u64>, want_sha1: bool) {
        self.len = 0;
        self.sha256 = Sha256::new();
        self.sha1 = match (want_sha1, size) {
            (true, Some(size)) => {
                let mut h = Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Some(h)
            }
            _ => None,
        };
    }

    fn update(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        self.sha256.update(bytes);
        if let Some(h) = &mut self.sha1 {
            h.update(bytes);
        }
    }

    async fn append(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(PullError::io(&self.path))?;
        self.update(bytes);
        Ok(())
    }

    async fn truncate(&mut self, size: Option<u64>, want_sha1: bool) -> Result<(), PullError> {
        self.file
            .set_len(0)
            .await
            .map_err(PullError::io(&self.path))?;
        self.reset_hashes(size, want_sha1);
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
        let want_sha1 = matches!(file.digest, Some(Digest::GitBlobSha1(_)));
        let mut second_try = false;
        loop {
            let mut partial = Partial::open(part, file.size, want_sha1).await?;
            progress.add(partial.len);
            self.download_with_retries(file, &mut partial, progress)
                .await?;
            partial.file.sync_all().await.map_err(PullError::io(part))?;
            let sha256 = hex::encode(partial.sha256.clone().finalize());
            let mismatch = match (&file.size, &file.digest) {
                (Some(size), _) if *size != partial.len => Some(PullError::Size {
                    file: file.path.clone(),
                    expected: *size,
                    actual: partial.len,
                }),
                (_, Some(Digest::Sha256(expected))) if !expected.eq_ignore_ascii_case(&sha256) => {
                    Some(PullError::Integrity {
                        file: file.path.clone(),
                        expected: expected.clone(),
                        actual: sha256.clone(),
                    })
                }
                (_, Some(Digest::GitBlobSha1(expected))) => {
                    let actual = partial
                        .sha1
                        .take()
                        .map(|h| hex::encode(h.finalize()))
                        .unwrap_or_default();
                    (!expected.eq_ignore_ascii_case(&actual)).then(|| PullError::Integrity {
                        file: file.path.clone(),
                        expected: expected.clone(),
                        actual,
                    })
                }
                _ => None,
            };
            let Some(error) = mismatch else {
                return Ok(FileRecord {
                    path: file.path.clone(),
                    size: partial.len,
                    sha256,
                });
            };
            drop(partial);
            tokio::fs::remove_file(part)
                .await
                .map_err(PullError::io(part))?;
            progress.add_negative(file.size.unwrap_or(0));
            if second_try {
                return Err(error);
            }
            tracing::warn!(file = %file.path, %error, "verification failed; fetching the file again from scratch");
            second_try = true;
        }
    }

    async fn download_with_retries(
        &self,
        file: &RemoteFile,
        partial: &mut Partial,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.download_once(file, partial, progress).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    let jitter = Duration::from_millis(
                        rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1),
                    );
                    let wait = backoff + jitter;
                    if started.elapsed() + wait > self.retry_budget {
                        return Err(PullError::RetriesExhausted {
                            uri: file.url.clone(),
                            seconds: started.elapsed().as_secs(),
                            last: e.to_string(),
                        });
                    }
                    tracing::warn!(file = %file.path, error = %e, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
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
        let mut request = self.client.get(&file.url);
        if partial.len > 0 {
            request = request.header(RANGE, format!("bytes={}-", partial.len));
        }
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let network = |e: reqwest::Error| PullError::Network {
            uri: file.url.clone(),
            message: network_message(&e),
        };
        let response = request.send().await.map_err(network)?;
        let want_sha1 = matches!(file.digest, Some(Digest::GitBlobSha1(_)));
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                // The server ignored the range: start over.
                if partial.len > 0 {
                    progress.add_negative(partial.len);
                    partial.truncate(file.size, want_sha1).await?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The part file is longer than the file: it is not this file's prefix.
                progress.add_negative(partial.len);
                partial.truncate(file.size, want_sha1).await?;
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
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(network)?;
            partial.append(&chunk).await?;
            progress.add(chunk.len() as u64);
        }
        partial
            .file
            .flush()
            .await
            .map_err(PullError::io(&partial.path))?;
        Ok(())
    }
}

/// reqwest's Display hides the cause (reset, timeout); the chain says what happened.
fn network_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
