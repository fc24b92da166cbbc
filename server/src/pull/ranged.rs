//! Large HTTP files in parallel ranges: fixed-size chunks fetched by several connections
//! and written in place, each recorded in a marks file when complete so that a restarted
//! process fetches only the chunks still missing. Hashing follows the completed prefix of
//! the file (reading it back from the page cache) while later chunks still download.
use super::error::PullError;
use super::fetch::{Backoff, Fetcher, Hashes, RemoteFile, network_message};
use super::progress::Progress;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, RANGE};
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MIN_CHUNK: u64 = 1 << 20;
const MAX_CHUNK: u64 = 16 << 20;
/// Bytes gathered before a positional write, and read back per hashing step.
const PIECE: usize = 256 << 10;

/// The list of finished chunks beside a part file.
pub fn marks(part: &Path) -> PathBuf {
    let mut name = part.as_os_str().to_owned();
    name.push(".ranges");
    PathBuf::from(name)
}

struct Chunks {
    size: u64,
    chunk: u64,
}

impl Chunks {
    fn count(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// First byte and length of chunk `i`.
    fn span(&self, i: u64) -> (u64, u64) {
        let start = i * self.chunk;
        (start, self.chunk.min(self.size - start))
    }
}

impl Fetcher {
    /// Fetches `file` in ranges; None when the source ignores ranges (fetch it whole then).
    pub(super) async fn fetch_ranged(
        &self,
        file: &RemoteFile,
        part: &Path,
        size: u64,
        progress: &Progress,
    ) -> Result<Option<(u64, String, Option<String>)>, PullError> {
        let chunks = Chunks {
            size,
            chunk: (size / (self.range_parts.max(1) as u64 * 2)).clamp(MIN_CHUNK, MAX_CHUNK),
        };
        let marks_path = marks(part);
        let (handle, done) = open(part, &marks_path, size)?;
        for &i in &done {
            progress.add(chunks.span(i).1);
        }
        let marks_file = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&marks_path)
                .map_err(PullError::io(&marks_path))?,
        ));
        let todo: Vec<u64> = (0..chunks.count()).filter(|i| !done.contains(i)).collect();
        let frontier = tokio::sync::Mutex::new(Frontier {
            next: 0,
            done,
            hashes: Hashes::start(file),
        });
        frontier.lock().await.advance(part, &chunks).await?;
        let result = futures::stream::iter(todo)
            .map(|i| {
                let (handle, marks_file, chunks, frontier) =
                    (handle.clone(), marks_file.clone(), &chunks, &frontier);
                async move {
                    let (start, len) = chunks.span(i);
                    let mut backoff = Backoff::new(self.retry_budget);
                    loop {
                        match self.fetch_range(file, &handle, start, len, progress).await {
                            Ok(()) => break,
                            Err(e @ PullError::RangesUnsupported { .. }) => return Err(e),
                            Err(e) => backoff.wait(file, e).await?,
                        }
                    }
                    writeln!(marks_file.lock().expect("marks lock"), "{i}")
                        .map_err(PullError::io(part))?;
                    let mut frontier = frontier.lock().await;
                    frontier.done.insert(i);
                    frontier.advance(part, chunks).await
                }
            })
            .buffer_unordered(self.range_parts.max(1))
            .try_collect::<()>()
            .await;
        match result {
            Err(PullError::RangesUnsupported { .. }) => {
                tracing::info!(file = %file.path, "the source ignores ranges; fetching the file in one stream");
                let _ = std::fs::remove_file(part);
                let _ = std::fs::remove_file(&marks_path);
                return Ok(None);
            }
            other => other?,
        }
        handle.sync_all().map_err(PullError::io(part))?;
        let (sha256, check) = frontier.into_inner().hashes.finish().await;
        Ok(Some((size, sha256, check)))
    }

    async fn fetch_range(
        &self,
        file: &RemoteFile,
        handle: &Arc<std::fs::File>,
        start: u64,
        len: u64,
        progress: &Progress,
    ) -> Result<(), PullError> {
        let mut request = self
            .client
            .get(&file.url)
            .header(RANGE, format!("bytes={start}-{}", start + len - 1));
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let network = |e: reqwest::Error| PullError::Network {
            uri: file.url.clone(),
            message: network_message(&e),
        };
        let response = request.send().await.map_err(network)?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                return Err(PullError::RangesUnsupported {
                    uri: file.url.clone(),
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
        let (mut written, mut buffer) = (0u64, Vec::with_capacity(PIECE));
        let outcome = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(network)?;
                progress.add(chunk.len() as u64);
                buffer.extend_from_slice(&chunk);
                if buffer.len() >= PIECE {
                    written += write_at(
                        handle,
                        std::mem::take(&mut buffer),
                        start + written,
                        &file.path,
                    )
                    .await?;
                }
            }
            written += write_at(handle, buffer, start + written, &file.path).await?;
            if written != len {
                return Err(PullError::Network {
                    uri: file.url.clone(),
                    message: format!("range ended after {written} of {len} bytes"),
                });
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            // The chunk will be fetched again whole.
            progress.add_negative(written);
        }
        outcome
    }
}

/// Opens (or creates at full size) the part file and reads which chunks are done. A part
/// that is not a ranged part of this size starts over.
fn open(
    part: &Path,
    marks_path: &Path,
    size: u64,
) -> Result<(Arc<std::fs::File>, HashSet<u64>), PullError> {
    if let Some(parent) = part.parent() {
        std::fs::create_dir_all(parent).map_err(PullError::io(parent))?;
    }
    let resumable = std::fs::metadata(part).is_ok_and(|m| m.len() == size) && marks_path.exists();
    let done = if resumable {
        std::fs::read_to_string(marks_path)
            .map_err(PullError::io(marks_path))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    } else {
        std::fs::write(marks_path, "").map_err(PullError::io(marks_path))?;
        HashSet::new()
    };
    let handle = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(part)
        .map_err(PullError::io(part))?;
    handle.set_len(size).map_err(PullError::io(part))?;
    Ok((Arc::new(handle), done))
}

async fn write_at(
    handle: &Arc<std::fs::File>,
    data: Vec<u8>,
    offset: u64,
    name: &str,
) -> Result<u64, PullError> {
    let (handle, len, name) = (handle.clone(), data.len() as u64, name.to_string());
    tokio::task::spawn_blocking(move || {
        handle
            .write_all_at(&data, offset)
            .map_err(PullError::io(name))
    })
    .await
    .expect("write task")?;
    Ok(len)
}

/// The chunks hashed so far (all before `next`) and those written but not yet hashed.
struct Frontier {
    next: u64,
    done: HashSet<u64>,
    hashes: Hashes,
}

impl Frontier {
    /// Hashes every finished chunk that continues the hashed prefix.
    async fn advance(&mut self, part: &Path, chunks: &Chunks) -> Result<(), PullError> {
        while self.done.contains(&self.next) {
            let (start, len) = chunks.span(self.next);
            let file = std::fs::File::open(part).map_err(PullError::io(part))?;
            let file = Arc::new(file);
            let mut offset = 0;
            while offset < len {
                let n = (len - offset).min(PIECE as u64) as usize;
                let reader = file.clone();
                let at = start + offset;
                let piece = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    let mut buf = vec![0u8; n];
                    reader.read_exact_at(&mut buf, at)?;
                    Ok(buf)
                })
                .await
                .expect("read task")
                .map_err(PullError::io(part))?;
                self.hashes.update(Bytes::from(piece)).await;
                offset += n as u64;
            }
            self.next += 1;
        }
        Ok(())
    }
}
