//! The threads that run models. Model work never runs on tokio's threads: each engine owns
//! an OS thread fed by a channel, replies through channels, and publishes its health.
pub mod embedding;
pub mod generation;

use candle_core::Tensor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One sequence's view of a causal language model: it owns its KV cache.
pub trait SequenceModel: Send {
    /// Runs `tokens` at positions `pos..` and returns the logits for the next token.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor>;
}

pub trait LanguageModel: Send + 'static {
    /// A fresh sequence sharing this model's weights.
    fn new_sequence(&self) -> Box<dyn SequenceModel>;
}

pub trait EmbeddingModel: Send + 'static {
    /// One vector per sequence of the batch.
    fn embed(&self, batch: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>>;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model worker has stopped")]
    WorkerDead,
    #[error("model failed: {0}")]
    Model(String),
}

impl From<EngineError> for crate::error::ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::WorkerDead => Self::Unavailable("The model worker has stopped"),
            EngineError::Model(m) => Self::Internal(m),
        }
    }
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
