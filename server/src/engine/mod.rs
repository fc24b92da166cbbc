//! The threads that run models. Model work never runs on tokio's threads: each engine owns
//! an OS thread fed by a channel, replies through channels, and publishes its health.
pub mod blocks;
pub mod embedding;
pub mod generation;
pub mod sampling;

pub use sampling::SamplingParams;

use candle_core::Tensor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Tokens per KV-cache block: the unit in which sequences are given cache memory.
pub const BLOCK_TOKENS: usize = 16;

/// One sequence's rows in an engine step: `tokens` at positions `start..`, whose keys and
/// values go to (and whose earlier ones are read from) the cache blocks `blocks` lists.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
    /// Logits for every row, not only the last (a prompt's log-probabilities).
    pub every_row: bool,
}

impl Chunk<'_> {
    /// Rows of logits the forward pass returns for this chunk.
    pub fn logit_rows(&self) -> usize {
        if self.every_row { self.tokens.len() } else { 1 }
    }
}

/// A causal language model with a paged KV cache that it owns and the scheduler allots.
pub trait LanguageModel: Send + 'static {
    /// Bytes one cache block takes.
    fn kv_bytes_per_block(&self) -> usize;
    /// Replaces the KV cache with one of `blocks` blocks.
    fn allocate_kv(&mut self, blocks: usize) -> candle_core::Result<()>;
    /// One forward pass over every chunk; f32 logits [rows, vocab]: each chunk's
    /// `logit_rows` in order, the last for the token after the chunk's last.
    fn forward(&mut self, chunks: &[Chunk<'_>]) -> candle_core::Result<Tensor>;
}

/// One input of an encoder: token ids, and where the second text of a pair (a query's
/// document) begins, its tokens being of type 1; `ids.len()` for a single text.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderInput {
    pub ids: Vec<u32>,
    pub second: usize,
}

impl EncoderInput {
    pub fn single(ids: Vec<u32>) -> Self {
        let second = ids.len();
        Self { ids, second }
    }
}

/// An encoder model: embeddings, or a classifier's logits.
pub trait EmbeddingModel: Send + 'static {
    /// One vector per input of the batch.
    fn embed(&self, batch: &[EncoderInput]) -> candle_core::Result<Vec<Vec<f32>>>;
}

impl<M: EmbeddingModel + ?Sized> EmbeddingModel for Box<M> {
    fn embed(&self, batch: &[EncoderInput]) -> candle_core::Result<Vec<Vec<f32>>> {
        (**self).embed(batch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model worker has stopped")]
    WorkerDead,
    #[error("model failed: {0}")]
    Model(String),
    /// Work the engine can never do, whatever the load (validation keeps it out).
    #[error("{0}")]
    Refused(String),
}

/// Liveness of an engine's thread: cleared when the thread ends for any reason, panics
/// included, so `/healthz` fails and the kubelet restarts the pod.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Spawns the worker thread; its health turns false when `body` returns or panics.
fn spawn_worker(name: &str, body: impl FnOnce() + Send + 'static) -> Health {
    let health = Health(Arc::new(AtomicBool::new(true)));
    let flag = health.clone();
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            struct ClearOnExit(Health, String);
            impl Drop for ClearOnExit {
                fn drop(&mut self) {
                    self.0.0.store(false, Ordering::Release);
                    if std::thread::panicking() {
                        tracing::error!(worker = %self.1, "model worker panicked; the server is unhealthy");
                    }
                }
            }
            let _guard = ClearOnExit(flag, thread_name);
            body();
        })
        .expect("spawn model worker thread");
    health
}
