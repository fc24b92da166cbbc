//! The generation scheduler: one thread owns the model and advances every active sequence
//! by one step per round (a prompt chunk or one token), so a long answer never blocks a
//! short one. Each sequence has its own KV cache; the weights are shared.
use super::{EngineError, Health, LanguageModel, SequenceModel, spawn_worker};
use crate::detokenize::{Delta, TextStream};
use crate::metrics::Metrics;
use crate::sampling::Sampler;
use crate::validation::SamplingParams;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

/// Prompt tokens processed per step: long prompts are split so that other sequences keep
/// producing tokens while one prompt is read.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(EngineError),
}

pub struct GenerationJob {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub span: tracing::Span,
}

struct Submitted {
    job: GenerationJob,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

#[derive(Clone)]
pub struct GenerationEngine {
    jobs: mpsc::UnboundedSender<Submitted>,
    health: Health,
}

impl GenerationEngine {
    pub fn start(
        model: impl LanguageModel,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let health = spawn_worker("generation-worker", move || {
            Scheduler {
                model,
                tokenizer: &tokenizer,
                eos: &eos_token_ids,
                metrics: &metrics,
            }
            .run(rx)
        });
        Self { jobs, health }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Queues a generation; its text arrives on the returned channel. Dropping the
    /// receiver cancels the sequence at its next step.
    pub fn submit(
        &self,
        job: GenerationJob,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.jobs
            .send(Submitted {
                job,
                events,
                enqueued: Instant::now(),
            })
            .map_err(|_| EngineError::WorkerDead)?;
        Ok(rx)
    }
}

struct Scheduler<'a, M> {
    model: M,
    tokenizer: &'a Tokenizer,
    eos: &'a [u32],
    metrics: &'a Metrics,
}

struct Sequence<'a> {
    lm: Box<dyn SequenceModel>,
    job: GenerationJob,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
    prefilled: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    text: TextStream<'a>,
    last_token_at: Option<Instant>,
}

impl<'a, M: LanguageModel> Scheduler<'a, M> {
    fn run(&self, mut rx: mpsc::UnboundedReceiver<Submitted>) {
        let mut active: Vec<Sequence<'a>> = Vec::new();
        loop {
            if active.is_empty() {
                match rx.blocking_recv() {
                    Some(s) => active.push(self.admit(s)),
                    None => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                active.push(self.admit(s));
            }
            active.retain_mut(|seq| !self.step(seq));
        }
    }

    fn admit(&self, s: Submitted) -> Sequence<'a> {
        let text = TextStream::new(self.tokenizer, &s.job.prompt, s.job.stop.clone());
        Sequence {
            lm: self.model.new_sequence(),
            sampler: Sampler::new(&s.job.sampling),
            job: s.job,
            events: s.events,
            enqueued: s.enqueued,
            prefilled: 0,
            generated: Vec::new(),
            text,
            last_token_at: None,
        }
    }

    /// Advances one sequence by one step; true when it has finished.
    fn step(&self, seq: &mut Sequence<'a>) -> bool {
        if seq.events.is_closed() {
            tracing::debug!(parent: &seq.job.span, "client went away; sequence dropped");
            return true;
        }
        let span = seq.job.span.clone();
        let _enter = span.enter();
        match self.advance(seq) {
            Ok(Some(event)) => {
                let _ = seq.events.send(event);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "generation step failed");
                let _ = seq
                    .events
                    .send(Event::Failed(EngineError::Model(e.to_string())));
                true
            }
        }
    }

    /// One step; Some(final event) when the sequence is done.
    fn advance(&self, seq: &mut Sequence<'a>) -> anyhow::Result<Option<Event>> {
        let prompt_len = seq.job.prompt.len();
        let logits = if seq.prefilled < prompt_len {
            let end = (seq.prefilled + PREFILL_CHUNK).min(prompt_len);
            let logits = seq
                .lm
                .forward(&seq.job.prompt[seq.prefilled..end], seq.prefilled)?;
            seq.prefilled = end;
            if end < prompt_len {
                return Ok(None);
            }
            logits
        } else {
            let last = *seq.generated.last().expect("a token follows the prompt");
            seq.lm
                .forward(&[last], prompt_len + seq.generated.len() - 1)?
        };
        let token = seq.sampler.sample(&logits)?;
        let now = Instant::now();
        match seq.last_token_at {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - seq.enqueued).as_secs_f64()),
            Some(at) => self
                .metrics
                .inter_token_latency
                .observe((now - at).as_secs_f64()),
        }
        seq.last_token_at = Some(now);
        seq.generated.push(token);
        self.metrics.tokens_generated.inc();
        let completion_tokens = seq.generated.len();
        let done = |reason| Event::Done {
            reason,
            completion_tokens,
        };

        if self.eos.contains(&token) {
            send_text(seq, |text| text.finish());
            return Ok(Some(done(FinishReason::Stop)));
        }
        match seq
            .text
            .push(token)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?
        {
            Delta::Text(t) => send_text(seq, |_| t),
            Delta::Stopped(t) => {
                send_text(seq, |_| t);
                return Ok(Some(done(FinishReason::Stop)));
            }
        }
        if seq.generated.len() >= seq.job.max_new_tokens {
            send_text(seq, |text| text.finish());
            return Ok(Some(done(FinishReason::Length)));
        }
        Ok(None)
    }
}

fn send_text(seq: &mut Sequence<'_>, text: impl FnOnce(&mut TextStream<'_>) -> String) {
    let text = text(&mut seq.text);
    if !text.is_empty() {
        let _ = seq.events.send(Event::Text(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use tokenizers::models::wordlevel::WordLevel;

    const VOCAB: usize = 8;

    /// Always predicts the token after the last one (mod VOCAB), slowly, like a real model.
    #[derive(Clone)]
    struct Counting;
    impl SequenceModel for Counting {
        fn forward(&mut self, tokens: &[u32], _pos: usize) -> candle_core::Result<Tensor> {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let next = (tokens[tokens.len() - 1] as usize + 1) % VOCAB;
            let logits: Vec<f32> = (0..VOCAB)
                .map(|i| if i == next { 1.0 } else { 0.0 })
                .collect();
            Tensor::new(logits, &Device::Cpu)
        }
    }
    impl LanguageModel for Counting {
        fn new_sequence(&self) -> Box<dyn SequenceModel> {
            Box::new(self.clone())
        }
    }

    fn engine(eos: Vec<u32>) -> GenerationEngine {
        let vocab = (0..VOCAB)
            .map(|i| (format!("t{i}"), i as u32))
            .chain([("<unk>".to_string(), VOCAB as u32)]);
        let model = WordLevel::builder()
            .vocab(vocab.collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let tokenizer = Arc::new(Tokenizer::new(model));
        GenerationEngine::start(Counting, tokenizer, eos, Arc::new(Metrics::new()))
    }

    fn job(prompt: Vec<u32>, max_new_tokens: usize, stop: &[&str]) -> GenerationJob {
        GenerationJob {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            span: tracing::Span::none(),
        }
    }

    async fn collect(
        mut rx: mpsc::UnboundedReceiver<Event>,
    ) -> (String, FinishReason, usize, Instant) {
        let mut text = String::new();
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(t) => text.push_str(&t),
                Event::Done {
                    reason,
                    completion_tokens,
                } => return (text, reason, completion_tokens, Instant::now()),
                Event::Failed(e) => panic!("{e}"),
            }
        }
        panic!("stream ended without Done");
    }

    #[tokio::test]
    async fn generates_until_max_tokens_eos_or_stop() {
        let engine = engine(vec![7]);
        let (text, reason, n, _) = collect(engine.submit(job(vec![0], 3, &[])).unwrap()).await;
        assert_eq!(
            (text.as_str(), reason, n),
            (" t1 t2 t3", FinishReason::Length, 3)
        );
        let (text, reason, n, _) = collect(engine.submit(job(vec![4], 10, &[])).unwrap()).await;
        assert_eq!(
            (text.as_str(), reason, n),
            (" t5 t6", FinishReason::Stop, 3),
            "eos ends it, unprinted"
        );
        let (text, reason, _, _) = collect(engine.submit(job(vec![0], 10, &["t3"])).unwrap()).await;
        assert_eq!((text.as_str(), reason), (" t1 t2 ", FinishReason::Stop));
    }

    #[tokio::test]
    async fn a_short_answer_is_not_blocked_by_a_long_one() {
        let engine = engine(vec![]);
        let long = engine.submit(job(vec![0], 200, &[])).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let short = engine.submit(job(vec![0], 3, &[])).unwrap();
        let (long_done, short_done) = tokio::join!(collect(long), collect(short));
        assert!(
            short_done.3 < long_done.3,
            "the short request finished first"
        );
        assert_eq!(long_done.2, 200);
    }

    #[tokio::test]
    async fn long_prompts_are_prefilled_in_chunks() {
        let engine = engine(vec![]);
        let prompt: Vec<u32> = (0..600).map(|i| (i % VOCAB) as u32).collect();
        let (_, _, n, _) = collect(engine.submit(job(prompt, 2, &[])).unwrap()).await;
        assert_eq!(n, 2);
    }
}
