//! Where a file's bytes land. Each connection gathers what it receives into pooled
//! buffers (so the network's buffers are free again at once: holding them in a queue made
//! the allocator map fresh pages for every read) and hands them to the file's threads: one
//! writes each at its offset, one hashes the file in order (straight from the buffer when
//! it continues the hashed prefix, else by reading back what was written once the gap
//! before it fills: segments finishing out of order, a part left by an earlier process),
//! and one flushes to disk as the file grows. Receiving, writing, hashing and flushing
//! overlap.
use super::error::PullError;
use super::fetch::{Digest, RemoteFile};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Size of the buffers the thread writes.
const BUFFER: usize = 512 << 10;
/// Buffers waiting for the thread, per file.
const QUEUE: usize = 4;
/// Bytes written between flushes to disk while a file downloads.
const FLUSH_EVERY: usize = 32 << 20;
/// Read-back step when hashing what is already on disk.
const READ_BACK: usize = 1 << 20;

enum Op {
    Write(u64, Vec<u8>),
    /// The source sends the file again from its start.
    Truncate,
}

/// What the file holds once every sender is done.
pub(super) struct Written {
    /// Bytes hashed: the file's length when it has no gaps.
    pub len: u64,
    pub sha256: String,
    /// The source's own digest where it is not sha256 (hub git blobs, S3 MD5 ETags).
    pub check: Option<String>,
}

/// Queues writes for a file's threads; shared by the file's connections.
pub(super) struct SinkTx {
    tx: tokio::sync::mpsc::Sender<Op>,
    /// Written buffers, back for reuse.
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    path: Arc<Path>,
}

impl SinkTx {
    /// A stream whose next byte lands at `offset`.
    pub(super) fn writer(&self, offset: u64) -> Writer<'_> {
        Writer {
            sink: self,
            offset,
            buf: self.buffer(),
        }
    }

    fn buffer(&self) -> Vec<u8> {
        let reused = self.pool.lock().expect("sink pool lock").pop();
        reused.unwrap_or_else(|| Vec::with_capacity(BUFFER))
    }

    /// Fails only when the threads stopped on an error, which `Sink::finish` reports.
    async fn send(&self, op: Op) -> Result<(), PullError> {
        self.tx.send(op).await.map_err(|_| {
            PullError::io(self.path.to_path_buf())(std::io::Error::other("writing stopped"))
        })
    }
}

/// One stream's bytes on their way to the sink, in order from `offset`.
pub(super) struct Writer<'a> {
    sink: &'a SinkTx,
    /// Where `buf` starts in the file.
    offset: u64,
    buf: Vec<u8>,
}

impl Writer<'_> {
    /// Where the next byte lands.
    pub(super) fn position(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    pub(super) async fn push(&mut self, mut data: &[u8]) -> Result<(), PullError> {
        while !data.is_empty() {
            let n = (BUFFER - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == BUFFER {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Hands what is gathered to the thread.
    pub(super) async fn flush(&mut self) -> Result<(), PullError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, self.sink.buffer());
        let at = self.offset;
        self.offset += full.len() as u64;
        self.sink.send(Op::Write(at, full)).await
    }

    /// Drops what is gathered and empties the file: the source sends it again from the start.
    pub(super) async fn restart(&mut self) -> Result<(), PullError> {
        self.buf.clear();
        self.offset = 0;
        self.sink.send(Op::Truncate).await
    }
}

pub(super) struct Sink {
    tx: SinkTx,
    thread: std::thread::JoinHandle<std::io::Result<Written>>,
}

impl Sink {
    /// Starts the thread for `file` (at `path`), whose `written` spans already hold this
    /// file's bytes; `marks`, where given, records every span written.
    pub(super) fn start(
        file: std::fs::File,
        path: &Path,
        remote: &RemoteFile,
        written: impl IntoIterator<Item = (u64, u64)>,
        marks: Option<std::fs::File>,
    ) -> Result<Self, PullError> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let pool = Arc::new(Mutex::new(Vec::new()));
        let mut hashing = Hashing::new(remote.digest.as_ref(), remote.size);
        for (start, end) in written {
            hashing.written(start, end);
        }
        let thread = {
            let pool = pool.clone();
            std::thread::Builder::new()
                .name("pull-write".into())
                .spawn(move || run(&file, rx, hashing, marks, &pool))
                .map_err(PullError::io(path))?
        };
        Ok(Self {
            tx: SinkTx {
                tx,
                pool,
                path: Arc::from(path),
            },
            thread,
        })
    }

    pub(super) fn tx(&self) -> &SinkTx {
        &self.tx
    }

    /// Waits for every queued write, flushes the file to disk, and returns its digests. Call
    /// it before reporting a download's error: a failed write is the cause then.
    pub(super) async fn finish(self) -> Result<Written, PullError> {
        let Self { tx, thread } = self;
        let path = tx.path.to_path_buf();
        drop(tx);
        tokio::task::spawn_blocking(move || thread.join().expect("sink thread"))
            .await
            .expect("join sink thread")
            .map_err(PullError::io(path))
    }
}

/// Writes on this thread, hashes on another, and flushes to disk on a third as the file
/// grows, so a file streams at the pace of the slowest of them rather than of all in turn,
/// and the flush that makes it durable at the end has little left to do.
fn run(
    file: &std::fs::File,
    rx: tokio::sync::mpsc::Receiver<Op>,
    hashing: Hashing,
    marks: Option<std::fs::File>,
    pool: &Mutex<Vec<Vec<u8>>>,
) -> std::io::Result<Written> {
    let (to_hasher, hasher_rx) = std::sync::mpsc::sync_channel(QUEUE);
    let (to_flusher, flusher_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::scope(|scope| {
        let hasher = std::thread::Builder::new()
            .name("pull-hash".into())
            .spawn_scoped(scope, || hash(file, hasher_rx, hashing, pool))?;
        // Its errors are its own to report: the kernel tells a writeback error only once.
        let flusher = std::thread::Builder::new()
            .name("pull-flush".into())
            .spawn_scoped(scope, move || {
                flusher_rx.iter().try_for_each(|()| file.sync_data())
            })?;
        let wrote = write(file, rx, marks, &to_hasher, &to_flusher);
        drop((to_hasher, to_flusher));
        let flushed = flusher.join().expect("flush thread");
        let hashed = hasher.join().expect("hash thread");
        wrote.and(flushed).and(hashed)
    })
}

/// What the hashing thread gets, in the order the file was written.
enum Hash {
    Written(u64, Vec<u8>),
    /// The file is about to be emptied: start over, and say so before it is.
    Reset(std::sync::mpsc::SyncSender<()>),
}

fn write(
    file: &std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Op>,
    mut marks: Option<std::fs::File>,
    hasher: &std::sync::mpsc::SyncSender<Hash>,
    flusher: &std::sync::mpsc::SyncSender<()>,
) -> std::io::Result<()> {
    let mut unflushed = 0;
    // A failed send means the hasher stopped on an error, which it reports.
    while let Some(op) = rx.blocking_recv() {
        match op {
            Op::Write(offset, bytes) => {
                file.write_all_at(&bytes, offset)?;
                unflushed += bytes.len();
                // Never waits: a flush still running takes these bytes along too.
                if unflushed >= FLUSH_EVERY && flusher.try_send(()).is_ok() {
                    unflushed = 0;
                }
                if let Some(marks) = &mut marks {
                    writeln!(marks, "{offset} {}", offset + bytes.len() as u64)?;
                }
                if hasher.send(Hash::Written(offset, bytes)).is_err() {
                    return Ok(());
                }
            }
            Op::Truncate => {
                // The hasher may still be reading back what is about to go.
                let (ack, reset) = std::sync::mpsc::sync_channel(1);
                if hasher.send(Hash::Reset(ack)).is_err() || reset.recv().is_err() {
                    return Ok(());
                }
                file.set_len(0)?;
            }
        }
    }
    file.sync_all()
}

fn hash(
    file: &std::fs::File,
    rx: std::sync::mpsc::Receiver<Hash>,
    mut hashing: Hashing,
    pool: &Mutex<Vec<Vec<u8>>>,
) -> std::io::Result<Written> {
    let mut buf = vec![0u8; READ_BACK];
    hashing.catch_up(file, &mut buf)?;
    for op in rx {
        match op {
            Hash::Written(offset, mut bytes) => {
                hashing.received(offset, &bytes);
                hashing.catch_up(file, &mut buf)?;
                bytes.clear();
                pool.lock().expect("sink pool lock").push(bytes);
            }
            Hash::Reset(ack) => {
                hashing.reset();
                let _ = ack.send(());
            }
        }
    }
    Ok(hashing.finish())
}

/// sha256 and the source's check over the file's prefix [0, hashed), with the spans
/// written beyond it waiting their turn.
struct Hashing {
    sha256: Sha256,
    check: Option<Check>,
    init: (Option<Digest>, Option<u64>),
    hashed: u64,
    /// Written beyond the hashed prefix, not yet hashed: start → end, disjoint.
    waiting: BTreeMap<u64, u64>,
}

impl Hashing {
    fn new(digest: Option<&Digest>, size: Option<u64>) -> Self {
        Self {
            sha256: Sha256::new(),
            check: Check::new(digest, size),
            init: (digest.cloned(), size),
            hashed: 0,
            waiting: BTreeMap::new(),
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.init.0.as_ref(), self.init.1);
    }

    fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        if let Some(c) = &mut self.check {
            c.update(bytes);
        }
        self.hashed += bytes.len() as u64;
    }

    /// `bytes` were written at `offset`: hashed now if they continue the prefix (a range
    /// fetched again may overlap it), else remembered.
    fn received(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if offset <= self.hashed && self.hashed < end {
            self.update(&bytes[(self.hashed - offset) as usize..]);
        } else if offset > self.hashed {
            self.written(offset, end);
        }
    }

    /// Remembers [start, end) as written, merged with the spans it touches.
    fn written(&mut self, mut start: u64, mut end: u64) {
        let touching: Vec<(u64, u64)> = self
            .waiting
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.waiting.remove(&s);
            (start, end) = (start.min(s), end.max(e));
        }
        self.waiting.insert(start, end);
    }

    /// Hashes, reading back from the file, every waiting span the prefix now reaches.
    fn catch_up(&mut self, file: &std::fs::File, buf: &mut [u8]) -> std::io::Result<()> {
        while let Some((&start, &end)) = self.waiting.first_key_value() {
            if start > self.hashed {
                return Ok(());
            }
            self.waiting.remove(&start);
            while self.hashed < end {
                let n = (end - self.hashed).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], self.hashed)?;
                self.update(&buf[..n]);
            }
        }
        Ok(())
    }

    fn finish(self) -> Written {
        Written {
            len: self.hashed,
            sha256: hex::encode(self.sha256.finalize()),
            check: self.check.map(Check::hex),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn remote() -> RemoteFile {
        RemoteFile {
            path: "f".into(),
            url: "http://x/f".into(),
            object: None,
            size: None,
            digest: None,
        }
    }

    async fn sink_with(existing: &[u8], ops: Vec<(u64, &[u8])>) -> (Written, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, existing).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let sink = Sink::start(file, &path, &remote(), [(0, existing.len() as u64)], None).unwrap();
        for (offset, bytes) in ops {
            let mut writer = sink.tx().writer(offset);
            writer.push(bytes).await.unwrap();
            writer.flush().await.unwrap();
        }
        let written = sink.finish().await.unwrap();
        (written, std::fs::read(&path).unwrap())
    }

    #[tokio::test]
    async fn out_of_order_and_repeated_writes_hash_the_file_in_order() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let ops = vec![
            (6000, &data[6000..8000]),
            (0, &data[..1000]),
            (3000, &data[3000..6000]),
            // A range fetched again after failing part way overlaps what was hashed.
            (0, &data[..1500]),
            (1500, &data[1500..3000]),
            (8000, &data[8000..]),
        ];
        let (written, on_disk) = sink_with(&data[..400], ops).await;
        assert_eq!(on_disk, data);
        assert_eq!(written.len, data.len() as u64);
        assert_eq!(written.sha256, sha(&data));
    }

    #[tokio::test]
    async fn a_gap_leaves_the_hash_at_the_prefix() {
        let data = vec![5u8; 4096];
        let (written, _) = sink_with(&[], vec![(0, &data[..1000]), (2000, &data[2000..])]).await;
        assert_eq!(written.len, 1000, "the size check catches the hole");
        assert_eq!(written.sha256, sha(&data[..1000]));
    }
}
