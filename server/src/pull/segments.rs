//! Files of known size come in segments, over HTTP ranges or S3 ranged GETs: one to start
//! with, split in two (the second half going to a new connection) while `pace` says that
//! connections are what limits the file. Each segment's bytes go to the file's sink, which
//! records every written span in a marks file, so a restarted process fetches only the
//! gaps, whatever connection was cut where.
use super::error::PullError;
use super::fetch::{Backoff, Fetcher, RemoteFile, body, open_part, s3_error};
use super::pace::{Pace, TICK};
use super::progress::Progress;
use super::sink::{Sink, SinkTx, Written};
use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::stream::{BoxStream, FuturesUnordered};
use object_store::{GetOptions, GetRange};
use reqwest::StatusCode;
use reqwest::header::CONTENT_RANGE;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A segment with less than twice this left is not split.
const MIN_SPLIT: u64 = 4 << 20;

/// The list of written spans beside a part file, under a name no remote file may take.
pub fn marks(part: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(super::names::RESERVED_PREFIX);
    name.push("ranges-");
    name.push(part.file_name().unwrap_or_default());
    part.with_file_name(name)
}

/// Bytes [next, end) of the file, still to come; `end` drops when the segment is split.
struct Segment(Mutex<(u64, u64)>);

impl Segment {
    fn new((start, end): (u64, u64)) -> Arc<Self> {
        Arc::new(Self(Mutex::new((start, end))))
    }

    fn span(&self) -> (u64, u64) {
        *self.0.lock().expect("segment lock")
    }

    fn left(&self) -> u64 {
        let (next, end) = self.span();
        end.saturating_sub(next)
    }

    /// Claims up to `n` received bytes; fewer once the end is reached.
    fn take(&self, n: u64) -> u64 {
        let mut span = self.0.lock().expect("segment lock");
        let taken = n.min(span.1.saturating_sub(span.0));
        span.0 += taken;
        taken
    }

    /// Hands the second half of what is left to a new segment.
    fn split(&self) -> Option<Arc<Self>> {
        let mut span = self.0.lock().expect("segment lock");
        let left = span.1.saturating_sub(span.0);
        if left < 2 * MIN_SPLIT {
            return None;
        }
        let mid = span.0 + left / 2;
        let tail = (mid, span.1);
        span.1 = mid;
        Some(Self::new(tail))
    }
}

/// The parts of [0, size) that no span covers.
fn gaps(spans: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let (mut gaps, mut at) = (Vec::new(), 0);
    for (start, end) in spans {
        if start > at {
            gaps.push((at, start));
        }
        at = at.max(end);
    }
    if at < size {
        gaps.push((at, size));
    }
    gaps
}

/// What one file's segments share.
struct Shared<'a> {
    file: &'a RemoteFile,
    sink: &'a SinkTx,
    progress: &'a Progress,
    /// This file's bytes received, for its pace.
    received: AtomicU64,
    /// The source answered a range with a range: segments may split.
    ranges: AtomicBool,
}

impl Fetcher {
    /// Fetches `file` (of `size` bytes) into `part`, resuming from the spans its marks list.
    pub(super) async fn fetch_segments(
        &self,
        file: &RemoteFile,
        part: &Path,
        size: u64,
        progress: &Progress,
    ) -> Result<Written, PullError> {
        let marks_path = marks(part);
        let (handle, done) = open(part, &marks_path, size)?;
        let todo = gaps(&done, size);
        progress.add(size - todo.iter().map(|(start, end)| end - start).sum::<u64>());
        let marks_file = std::fs::OpenOptions::new()
            .append(true)
            .open(&marks_path)
            .map_err(PullError::io(&marks_path))?;
        let sink = Sink::start(handle, part, file, done, Some(marks_file))?;
        let shared = Shared {
            file,
            sink: sink.tx(),
            progress,
            received: AtomicU64::new(0),
            ranges: AtomicBool::new(false),
        };
        let fetched = self.run_segments(&shared, size, todo).await;
        // A failed write stops the segments too, and is the cause to report.
        let written = sink.finish().await?;
        fetched?;
        Ok(written)
    }

    async fn run_segments(
        &self,
        shared: &Shared<'_>,
        size: u64,
        todo: Vec<(u64, u64)>,
    ) -> Result<(), PullError> {
        let max = if size >= self.split_min {
            self.connections_per_file.max(1)
        } else {
            1
        };
        let mut queue: Vec<Arc<Segment>> = todo.into_iter().rev().map(Segment::new).collect();
        let mut active: Vec<Arc<Segment>> = Vec::new();
        let mut running = FuturesUnordered::new();
        let mut pace = Pace::new(max);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while running.len() < max
                && let Some(segment) = queue.pop()
            {
                active.push(segment.clone());
                running.push(self.segment(shared, segment));
            }
            tokio::select! {
                finished = running.next() => match finished {
                    None => return Ok(()),
                    Some(result) => {
                        result?;
                        active.retain(|s| s.left() > 0);
                    }
                },
                _ = tick.tick() => {
                    let left = active.iter().chain(&queue).map(|s| s.left()).sum();
                    let received = shared.received.load(Ordering::Relaxed);
                    let add = pace.tick(received, running.len(), left);
                    tracing::trace!(file = %shared.file.path, received, left, connections = running.len(), add, "pace");
                    if add > 0 && shared.ranges.load(Ordering::Relaxed) {
                        for _ in 0..add {
                            let Some(longest) = active.iter().max_by_key(|s| s.left()) else {
                                break;
                            };
                            let Some(tail) = longest.split() else { break };
                            tracing::debug!(file = %shared.file.path, span = ?tail.span(), "another connection");
                            active.push(tail.clone());
                            running.push(self.segment(shared, tail));
                        }
                    }
                }
            }
        }
    }

    /// One segment to its end, retried with backoff from where each try stopped.
    async fn segment(&self, shared: &Shared<'_>, segment: Arc<Segment>) -> Result<(), PullError> {
        let mut backoff = Backoff::new(self.retry_budget);
        loop {
            let before = segment.span().0;
            match self.segment_once(shared, &segment).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if segment.span().0 > before {
                        backoff.progressed();
                    }
                    backoff.wait(shared.file, e).await?;
                }
            }
        }
    }

    async fn segment_once(&self, shared: &Shared<'_>, segment: &Segment) -> Result<(), PullError> {
        let (start, end) = segment.span();
        if start >= end {
            return Ok(());
        }
        let mut body = self.open_range(shared, start, end).await?;
        let mut writer = shared.sink.writer(start);
        let received = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                let taken = segment.take(chunk.len() as u64);
                shared.progress.add(taken);
                shared.received.fetch_add(taken, Ordering::Relaxed);
                writer.push(&chunk[..taken as usize]).await?;
                if segment.left() == 0 {
                    // Done, or split: the rest belongs to another connection.
                    return Ok(());
                }
            }
            let (next, end) = segment.span();
            Err(PullError::Network {
                uri: shared.file.url.clone(),
                message: format!("connection closed at byte {next} of a range ending at {end}"),
            })
        }
        .await;
        // What arrived before a failure is kept: the next try resumes after it.
        writer.flush().await?;
        received
    }

    /// Bytes [start, end) of the file: a range where the source honours it, else the whole
    /// file with the bytes before `start` skipped.
    async fn open_range(
        &self,
        shared: &Shared<'_>,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, PullError>>, PullError> {
        let file = shared.file;
        if let Some((store, key)) = &file.object {
            let options = GetOptions {
                range: Some(GetRange::Bounded(start..end)),
                ..GetOptions::default()
            };
            let result = store
                .get_opts(key, options)
                .await
                .map_err(|e| s3_error(&file.url, e))?;
            shared.ranges.store(true, Ordering::Relaxed);
            let uri = file.url.clone();
            return Ok(result
                .into_stream()
                .map(move |chunk| chunk.map_err(|e| s3_error(&uri, e)))
                .boxed());
        }
        let response = self
            .get(file, Some(format!("bytes={start}-{}", end - 1)))
            .await?;
        let skip = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let from = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes ")?.split_once('-')?.0.parse().ok());
                if from != Some(start) {
                    return Err(PullError::Protocol {
                        uri: file.url.clone(),
                        message: format!("asked for bytes from {start}, got range {from:?}"),
                    });
                }
                shared.ranges.store(true, Ordering::Relaxed);
                0
            }
            StatusCode::OK => start as usize,
            status => {
                return Err(PullError::from_status(
                    &file.url,
                    status.as_u16(),
                    self.denied_hint,
                ));
            }
        };
        if skip > 0 {
            tracing::info!(file = %file.path, skip, "the source ignores ranges; skipping to the missing bytes");
        }
        Ok(skip_bytes(body(file, response), skip).boxed())
    }
}

/// `body` without its first `skip` bytes.
fn skip_bytes(
    body: impl futures::Stream<Item = Result<Bytes, PullError>> + Send + 'static,
    mut skip: usize,
) -> impl futures::Stream<Item = Result<Bytes, PullError>> + Send + 'static {
    body.filter_map(move |chunk| {
        let chunk = chunk.map(|mut c| {
            let n = skip.min(c.len());
            c.advance(n);
            skip -= n;
            c
        });
        futures::future::ready(match chunk {
            Ok(c) if c.is_empty() => None,
            other => Some(other),
        })
    })
}

/// Opens (or creates at full size) the part file and reads the spans already written. A
/// part that is not of this size starts over.
fn open(
    part: &Path,
    marks_path: &Path,
    size: u64,
) -> Result<(std::fs::File, Vec<(u64, u64)>), PullError> {
    let handle = open_part(part)?;
    let len = handle.metadata().map_err(PullError::io(part))?.len();
    let resumable = len == size && marks_path.exists();
    let done = if resumable {
        std::fs::read_to_string(marks_path)
            .map_err(PullError::io(marks_path))?
            .lines()
            .filter_map(|l| {
                let (start, end) = l.trim().split_once(' ')?;
                Some((start.parse().ok()?, end.parse().ok()?))
            })
            .filter(|&(start, end)| start < end && end <= size)
            .collect()
    } else {
        std::fs::write(marks_path, "").map_err(PullError::io(marks_path))?;
        Vec::new()
    };
    handle.set_len(size).map_err(PullError::io(part))?;
    Ok((handle, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_what_no_span_covers() {
        assert_eq!(gaps(&[], 10), [(0, 10)]);
        assert_eq!(gaps(&[(0, 10)], 10), []);
        assert_eq!(gaps(&[(6, 8), (0, 2), (1, 3)], 10), [(3, 6), (8, 10)]);
    }

    #[test]
    fn a_split_gives_away_half_of_what_is_left() {
        let segment = Segment::new((0, 64 << 20));
        assert_eq!(segment.take(16 << 20), 16 << 20);
        let tail = segment.split().unwrap();
        assert_eq!(segment.span(), (16 << 20, 40 << 20));
        assert_eq!(tail.span(), (40 << 20, 64 << 20));
        assert_eq!(segment.take(30 << 20), 24 << 20, "no byte past the new end");
        assert!(Segment::new((0, MIN_SPLIT)).split().is_none());
    }
}
