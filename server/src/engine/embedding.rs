//! Dynamic batching for embeddings: requests that wait while the model is busy are grouped
//! into one forward pass, up to a sequence count and a padded-token budget.
use super::{EmbeddingModel, EncoderInput, EngineError, Health, spawn_worker};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Instrument;

/// The longest a batch waits for the clients the last batch answered.
const MAX_FILL_WAIT: Duration = Duration::from_millis(10);

pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
}

struct Job {
    input: EncoderInput,
    reply: oneshot::Sender<Result<Vec<f32>, EngineError>>,
}

#[derive(Clone)]
pub struct EmbeddingEngine {
    jobs: mpsc::Sender<Job>,
    health: Health,
}

impl EmbeddingEngine {
    pub fn start(model: impl EmbeddingModel, limits: BatchLimits, metrics: Arc<Metrics>) -> Self {
        let (jobs, rx) = mpsc::channel();
        let health = spawn_worker("embedding-worker", move || run(model, rx, limits, &metrics));
        Self { jobs, health }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub async fn embed(&self, input: EncoderInput) -> Result<Vec<f32>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { input, reply })
            .map_err(|_| EngineError::WorkerDead)?;
        rx.instrument(tracing::debug_span!("embed_wait"))
            .await
            .map_err(|_| EngineError::WorkerDead)?
    }
}

fn run(
    model: impl EmbeddingModel,
    rx: mpsc::Receiver<Job>,
    limits: BatchLimits,
    metrics: &Metrics,
) {
    let mut carried: Option<Job> = None;
    // The last batch: how many it held and how long it took.
    let (mut last, mut took) = (0, Duration::ZERO);
    loop {
        let Some(first) = carried.take().or_else(|| rx.recv().ok()) else {
            return;
        };
        let mut longest = first.input.ids.len();
        let mut batch = vec![first];
        // Under steady load the clients the last batch answered are on their way back when
        // the next one forms: taking only those already queued split 32 connections into
        // batches of ~28 and ~4 in turn (mean 16). Up to the last batch's size, a batch
        // waits for them, at most an eighth of the last batch's time (and MAX_FILL_WAIT).
        let fill_by = Instant::now() + (took / 8).min(MAX_FILL_WAIT);
        while batch.len() < limits.max_batch_size {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) if batch.len() < last => {
                    match rx.recv_timeout(fill_by.saturating_duration_since(Instant::now())) {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            let padded = longest.max(job.input.ids.len()) * (batch.len() + 1);
            if padded > limits.max_batch_tokens {
                carried = Some(job);
                break;
            }
            longest = longest.max(job.input.ids.len());
            batch.push(job);
        }
        // Requests whose clients left are not computed.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics.batch_size.observe(batch.len() as f64);
        let inputs: Vec<EncoderInput> = batch
            .iter_mut()
            .map(|j| std::mem::replace(&mut j.input, EncoderInput::single(Vec::new())))
            .collect();
        let span = tracing::debug_span!("embed_batch", size = inputs.len(), longest);
        let started = Instant::now();
        let result = span.in_scope(|| model.embed(&inputs));
        (last, took) = (inputs.len(), started.elapsed());
        match result {
            Ok(vectors) => {
                for (job, vector) in batch.into_iter().zip(vectors) {
                    let _ = job.reply.send(Ok(vector));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedding batch failed");
                for job in batch {
                    let _ = job.reply.send(Err(EngineError::Model(e.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records batch sizes; takes the given time per batch; panics on a token id of 666 to
    /// stand in for a model bug.
    struct Fake(Arc<Mutex<Vec<usize>>>, Duration);

    impl EmbeddingModel for Fake {
        fn embed(&self, batch: &[EncoderInput]) -> candle_core::Result<Vec<Vec<f32>>> {
            assert!(!batch.iter().any(|s| s.ids.contains(&666)), "model bug");
            std::thread::sleep(self.1);
            self.0.lock().unwrap().push(batch.len());
            Ok(batch.iter().map(|s| vec![s.ids.len() as f32]).collect())
        }
    }

    fn engine(
        max_batch_size: usize,
        max_batch_tokens: usize,
    ) -> (EmbeddingEngine, Arc<Mutex<Vec<usize>>>) {
        engine_taking(max_batch_size, max_batch_tokens, Duration::from_millis(20))
    }

    fn engine_taking(
        max_batch_size: usize,
        max_batch_tokens: usize,
        per_batch: Duration,
    ) -> (EmbeddingEngine, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let limits = BatchLimits {
            max_batch_size,
            max_batch_tokens,
        };
        let model = Fake(sizes.clone(), per_batch);
        (
            EmbeddingEngine::start(model, limits, Arc::new(Metrics::new())),
            sizes,
        )
    }

    /// Eight clients sending three requests each, one after another: those a batch answered
    /// come back together, and the next batch waits the moment it takes for them instead of
    /// leaving with the first few (which split each round into a small batch and the rest).
    #[tokio::test]
    async fn answered_clients_rejoin_one_batch() {
        // 80 ms a batch: the next may wait 10 ms for its clients.
        let (engine, sizes) = engine_taking(8, 1000, Duration::from_millis(80));
        let client = |engine: EmbeddingEngine| async move {
            for _ in 0..3 {
                engine
                    .embed(EncoderInput::single(vec![1; 4]))
                    .await
                    .unwrap();
            }
        };
        futures::future::join_all((0..8).map(|_| client(engine.clone()))).await;
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 24);
        // Three rounds of eight; the first requests may split while the worker wakes.
        assert!(sizes.len() <= 4, "{sizes:?}");
    }

    #[tokio::test]
    async fn waiting_requests_are_batched_within_limits() {
        let (engine, sizes) = engine(8, 1000);
        let results = futures::future::join_all(
            (1..=20).map(|n| engine.embed(EncoderInput::single(vec![1; n]))),
        )
        .await;
        for (n, r) in (1..=20).zip(results) {
            assert_eq!(
                r.unwrap(),
                vec![n as f32],
                "each reply goes to its own request"
            );
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");
        assert!(
            sizes.iter().any(|&s| s > 1),
            "requests that waited were grouped: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn token_budget_splits_batches() {
        let (engine, sizes) = engine(64, 100);
        let results = futures::future::join_all(
            (0..10).map(|_| engine.embed(EncoderInput::single(vec![1; 40]))),
        )
        .await;
        assert!(results.iter().all(Result::is_ok));
        // 40 tokens each: at most two fit in a 100-token budget.
        assert!(sizes.lock().unwrap().iter().all(|&s| s <= 2));
    }

    #[tokio::test]
    async fn a_dead_worker_is_unhealthy_and_answers_unavailable() {
        let (engine, _) = engine(8, 1000);
        assert!(engine.health().is_alive());
        assert!(matches!(
            engine.embed(EncoderInput::single(vec![666])).await,
            Err(EngineError::WorkerDead)
        ));
        // The reply is dropped while the thread unwinds, a moment before the flag clears.
        for _ in 0..100 {
            if !engine.health().is_alive() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!engine.health().is_alive());
        assert!(matches!(
            engine.embed(EncoderInput::single(vec![1])).await,
            Err(EngineError::WorkerDead)
        ));
    }
}
