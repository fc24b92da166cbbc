//! The generation scheduler: continuous batching. One thread owns the model; each step is
//! one forward pass over every running sequence (a token for each decoding sequence, a
//! prompt chunk for each being read), under a token budget per step, so weights are read
//! once for all of them and a long answer never blocks a short one. KV-cache blocks are
//! handed out as sequences grow; when the pool runs dry the newest sequence is set back to
//! the queue and recomputed later, so no sequence ever writes into another's blocks. Full
//! blocks are shared between sequences with the same prefix (see `blocks`).
use super::blocks::BlockPool;
use super::sampling::{LogSoftmax, Sampler, SamplingParams};
use super::{BLOCK_TOKENS, Chunk, EngineError, Health, LanguageModel, spawn_worker};
use crate::constrain::{Constraint, Mask};
use crate::detokenize::{Delta, TextStream};
use crate::metrics::Metrics;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

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

/// A generated token's log-probability under the model, and the most likely tokens at its
/// step with theirs, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// Text, with the log-probabilities of the tokens that made it when they were asked for
    /// (a token whose text is held back, by a stop sequence that may begin or an unfinished
    /// character, comes with the text it ends up in).
    Text(String, Vec<TokenLogprob>),
    /// The prompt's first token, which nothing predicts, and the log-probabilities of the
    /// tokens after it, sent once the prompt is read and before any text, when the job asks
    /// for them.
    Prompt(u32, Vec<TokenLogprob>),
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
    /// The grammar the output must follow, if any.
    pub constraint: Option<Constraint>,
    /// Whether to report each token's log-probability, and with how many alternatives.
    pub logprobs: Option<usize>,
    /// Whether to report the prompt's tokens' too (with as many alternatives), as
    /// `Event::Prompt`. Its logits are then computed for every row, so its prefix is never
    /// taken from the cache.
    pub prompt_logprobs: bool,
    pub span: tracing::Span,
}

/// Rows of a prompt whose log-probabilities are asked for that one step reads: each needs a
/// row of logits as wide as the vocabulary (a 150k vocabulary makes 128 rows 77 MB).
const PROMPT_LOGPROB_ROWS: usize = 128;

/// How much work one step may take on, and how much cache memory there is.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences advanced together.
    pub max_running: usize,
    /// Tokens fed to one forward pass (each decoding sequence's one, plus prompt chunks).
    pub max_step_tokens: usize,
    /// KV-cache blocks in the pool.
    pub kv_blocks: usize,
    /// Whether sequences reuse the cached blocks of a prefix they share.
    pub prefix_caching: bool,
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
    /// Allocates the KV cache, then starts the worker; an allocation failure is returned.
    pub fn start(
        mut model: impl LanguageModel,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> candle_core::Result<Self> {
        model.allocate_kv(limits.kv_blocks)?;
        metrics.kv_cache_blocks.set(limits.kv_blocks as i64);
        metrics
            .kv_cache_bytes
            .set((limits.kv_blocks * model.kv_bytes_per_block()) as i64);
        let (jobs, rx) = mpsc::unbounded_channel();
        let health = spawn_worker("generation-worker", move || {
            Scheduler {
                model,
                tokenizer: &tokenizer,
                eos: &eos_token_ids,
                metrics: &metrics,
                limits,
                pool: BlockPool::new(limits.kv_blocks, limits.prefix_caching),
                running: Vec::new(),
                waiting: VecDeque::new(),
            }
            .run(rx)
        });
        Ok(Self { jobs, health })
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

struct Sequence<'a> {
    job: GenerationJob,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
    /// The prompt, then every generated token.
    tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    /// Leading full blocks recorded in the pool's prefix cache, and the id of their content.
    registered: usize,
    prefix: u64,
    sampler: Sampler,
    constraint: Option<Constraint>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    logprobs: Vec<TokenLogprob>,
    /// The prompt's log-probabilities read so far, while they are asked for and not sent.
    prompt_logprobs: Option<Vec<TokenLogprob>>,
    text: TextStream<'a>,
    last_token_at: Option<Instant>,
}

impl Sequence<'_> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.job.prompt.len()
    }

    /// The most rows one step may read of this sequence.
    fn row_cap(&self) -> usize {
        match self.prompt_logprobs {
            Some(_) => PROMPT_LOGPROB_ROWS,
            None => usize::MAX,
        }
    }

    /// Keeps the log-probabilities of the prompt tokens that `logits` (one row per token of
    /// the rows read from position `start`) predict and that were not kept before (a
    /// preempted sequence reads its prompt again); sends them all once the prompt is read.
    fn read_prompt_logprobs(&mut self, logits: &Tensor, start: usize) -> anyhow::Result<()> {
        let (Some(kept), Some(top)) = (&mut self.prompt_logprobs, self.job.logprobs) else {
            return Ok(());
        };
        let prompt = &self.job.prompt;
        for (k, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
            // Row `start + k` predicts the token after it; kept[j] is prompt token j + 1's.
            let next = start + k + 1;
            if next == kept.len() + 1 && next < prompt.len() {
                kept.push(LogSoftmax::new(row, top).of(prompt[next]));
            }
        }
        if start + logits.dim(0)? >= prompt.len() {
            let kept = self.prompt_logprobs.take().unwrap_or_default();
            let _ = self.events.send(Event::Prompt(prompt[0], kept));
        }
        Ok(())
    }
}

struct Scheduler<'a, M> {
    model: M,
    tokenizer: &'a Tokenizer,
    eos: &'a [u32],
    metrics: &'a Metrics,
    limits: Limits,
    pool: BlockPool,
    /// Oldest first: the newest is the first set back when blocks run out.
    running: Vec<Sequence<'a>>,
    waiting: VecDeque<Sequence<'a>>,
}

impl<'a, M: LanguageModel> Scheduler<'a, M> {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Submitted>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(s) => self.enqueue(s),
                    None => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.enqueue(s);
            }
            self.drop_cancelled();
            let planned = self.plan();
            if planned.is_empty() {
                continue;
            }
            self.step(&planned);
        }
    }

    fn enqueue(&mut self, mut s: Submitted) {
        // A sequence the whole pool cannot hold would preempt itself forever; `serve` sizes
        // the context to the pool, so only a misconfigured caller gets here.
        let capacity = self.limits.kv_blocks * BLOCK_TOKENS;
        let refusal = if s.job.prompt.is_empty() {
            Some("an empty prompt has no next token".to_string())
        } else if s.job.prompt.len() + s.job.max_new_tokens > capacity {
            Some(format!(
                "the sequence needs more than the KV cache's {capacity} tokens"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            let _ = s.events.send(Event::Failed(EngineError::Refused(message)));
            return;
        }
        let text = TextStream::new(self.tokenizer, &s.job.prompt, s.job.stop.clone());
        self.waiting.push_back(Sequence {
            sampler: Sampler::new(&s.job.sampling),
            constraint: s.job.constraint.take(),
            logprobs: Vec::new(),
            prompt_logprobs: (s.job.prompt_logprobs && s.job.logprobs.is_some()).then(Vec::new),
            tokens: s.job.prompt.clone(),
            job: s.job,
            events: s.events,
            enqueued: s.enqueued,
            cached: 0,
            blocks: Vec::new(),
            registered: 0,
            prefix: 0,
            text,
            last_token_at: None,
        });
    }

    fn drop_cancelled(&mut self) {
        let pool = &mut self.pool;
        let mut keep = |seq: &mut Sequence<'_>| {
            if seq.events.is_closed() {
                tracing::debug!(parent: &seq.job.span, "client went away; sequence dropped");
                pool.release(&mut seq.blocks);
                false
            } else {
                true
            }
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(keep);
    }

    /// Picks each running sequence's rows for this step, giving it the blocks they need
    /// (setting the newest sequences back when there are too few), then admits waiting
    /// sequences in order while the budget and the pool allow, passing over any whose prefix
    /// another is computing. Prompt chunks leave room in the budget for every later decoding
    /// sequence's token, so a long prompt slows the others' steps but does not stall them.
    /// Returns (index into `running`, rows) pairs.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        let decoding = |s: &Sequence<'_>| s.tokens.len() - s.cached == 1;
        let mut budget = self.limits.max_step_tokens;
        let mut planned = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let remaining = seq.tokens.len() - seq.cached;
            let later_decoding = self.running[i + 1..].iter().filter(|s| decoding(s)).count();
            // At least one row even when the decoding sequences would take the whole budget,
            // so a prompt is never starved by a small --max-step-tokens.
            let rows = remaining
                .min(budget.saturating_sub(later_decoding).max(1))
                .min(seq.row_cap());
            let needed = (seq.cached + rows).div_ceil(BLOCK_TOKENS) - seq.blocks.len();
            while self.pool.available() < needed && self.running.len() > i + 1 {
                self.preempt_newest();
            }
            let seq = &mut self.running[i];
            if !self.pool.take(needed, &mut seq.blocks) {
                // The pool fits at least one whole context, so only a sequence that is not
                // the oldest can get here; it waits its turn again.
                self.preempt_newest();
                break;
            }
            planned.push((i, rows));
            budget -= rows;
            i += 1;
        }
        // Waiting sequences passed over this step (see below) keep their place.
        let mut next = 0;
        while budget > 0 && self.running.len() < self.limits.max_running {
            let Some(seq) = self.waiting.get_mut(next) else {
                break;
            };
            // Cached blocks of its prefix, leaving at least one token to compute: the last
            // one's logits are what the sequence waits for.
            let reusable = match seq.prompt_logprobs {
                Some(_) => 0,
                None => (seq.tokens.len() - 1) / BLOCK_TOKENS,
            };
            let (hits, prefix) = self.pool.reuse(&seq.tokens, reusable, &mut seq.blocks);
            // A running sequence is computing the next block of its prefix (requests that
            // share a system prompt, arriving together): it waits until the cache has that
            // block rather than compute it again beside it, as SGLang does; the sequences
            // after it go ahead.
            if self.limits.prefix_caching
                && hits < reusable
                && being_computed(&self.running, &seq.tokens[..(hits + 1) * BLOCK_TOKENS])
            {
                self.pool.release(&mut seq.blocks);
                next += 1;
                continue;
            }
            let cached = hits * BLOCK_TOKENS;
            let rows = (seq.tokens.len() - cached).min(budget).min(seq.row_cap());
            if !self.pool.take(
                (cached + rows).div_ceil(BLOCK_TOKENS) - hits,
                &mut seq.blocks,
            ) {
                self.pool.release(&mut seq.blocks);
                break;
            }
            (seq.cached, seq.registered, seq.prefix) = (cached, hits, prefix);
            if self.limits.prefix_caching {
                self.metrics
                    .prefix_cache_queries
                    .inc_by(seq.tokens.len() as u64);
                self.metrics.prefix_cache_hits.inc_by(cached as u64);
            }
            let seq = self.waiting.remove(next).expect("it was there");
            planned.push((self.running.len(), rows));
            self.running.push(seq);
            budget -= rows;
        }
        planned
    }

    /// Frees the newest running sequence's blocks and puts it at the head of the queue; it
    /// will read its prompt and generated tokens again.
    fn preempt_newest(&mut self) {
        if let Some(mut seq) = self.running.pop() {
            self.pool.release(&mut seq.blocks);
            (seq.cached, seq.registered, seq.prefix) = (0, 0, 0);
            self.metrics.preemptions.inc();
            tracing::debug!(parent: &seq.job.span, tokens = seq.tokens.len(), "preempted for KV-cache blocks");
            self.waiting.push_front(seq);
        }
    }

    /// One forward pass over the planned rows, then a token for each sequence whose rows
    /// reached its end; finished sequences leave and give their blocks back.
    fn step(&mut self, planned: &[(usize, usize)]) {
        // The grammars of the sequences that pick a token this step; their masks depend
        // only on tokens already chosen, so they are computed while the model runs.
        let mut constrained: Vec<(usize, Constraint)> = planned
            .iter()
            .filter_map(|&(i, rows)| {
                let seq = &mut self.running[i];
                let samples = seq.cached + rows == seq.tokens.len();
                Some((i, seq.constraint.take_if(|_| samples)?))
            })
            .collect();
        let chunks: Vec<Chunk<'_>> = planned
            .iter()
            .map(|&(i, rows)| {
                let seq = &self.running[i];
                Chunk {
                    tokens: &seq.tokens[seq.cached..seq.cached + rows],
                    start: seq.cached,
                    blocks: &seq.blocks,
                    every_row: seq.prompt_logprobs.is_some(),
                }
            })
            .collect();
        self.metrics.batch_size.observe(chunks.len() as f64);
        // Where each chunk's rows of logits start.
        let offsets: Vec<usize> = chunks
            .iter()
            .scan(0, |next, c| {
                let at = *next;
                *next += c.logit_rows();
                Some(at)
            })
            .collect();
        let model = &mut self.model;
        let (logits, computed) = std::thread::scope(|scope| {
            let masks = (!constrained.is_empty()).then(|| {
                scope.spawn(|| {
                    constrained
                        .iter_mut()
                        .map(|(i, c)| (*i, c.mask()))
                        .collect::<Vec<_>>()
                })
            });
            let logits = model.forward(&chunks);
            let masks = masks.map(|h| h.join().expect("grammar masks never panic"));
            (logits, masks.unwrap_or_default())
        });
        let mut masks: Vec<Option<Result<Mask, String>>> = std::iter::repeat_with(|| None)
            .take(self.running.len())
            .collect();
        for (i, mask) in computed {
            masks[i] = Some(mask);
        }
        for (i, constraint) in constrained {
            self.running[i].constraint = Some(constraint);
        }
        let mut finished = vec![false; self.running.len()];
        // Each finished sequence's last event, sent once its blocks are back in the pool.
        let mut ends = Vec::new();
        for (&(i, rows), offset) in planned.iter().zip(offsets) {
            let seq = &mut self.running[i];
            let span = seq.job.span.clone();
            let _enter = span.enter();
            let every_row = seq.prompt_logprobs.is_some();
            let outcome = logits
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|l| {
                    if every_row {
                        seq.read_prompt_logprobs(&l.narrow(0, offset, rows)?, seq.cached)?;
                        Ok(l.get(offset + rows - 1)?)
                    } else {
                        Ok(l.get(offset)?)
                    }
                })
                .and_then(|l| {
                    seq.cached += rows;
                    register_full_blocks(seq, &mut self.pool);
                    if seq.cached < seq.tokens.len() {
                        return Ok(None);
                    }
                    advance(seq, &l, masks[i].take(), self.eos, self.metrics)
                });
            let last = match outcome {
                Ok(event) => event,
                Err(e) => {
                    tracing::error!(error = %e, "generation step failed");
                    Some(Event::Failed(EngineError::Model(e.to_string())))
                }
            };
            if let Some(event) = last {
                finished[i] = true;
                ends.push((seq.events.clone(), event));
            }
        }
        let mut index = 0;
        let pool = &mut self.pool;
        self.running.retain_mut(|seq| {
            let done = finished[index];
            index += 1;
            if done {
                pool.release(&mut seq.blocks);
            }
            !done
        });
        // A client that sees its request end then sees its blocks free in the metrics.
        self.report();
        for (events, event) in ends {
            let _ = events.send(event);
        }
    }

    /// The gauges of the sequences and the pool, as they are now.
    fn report(&self) {
        self.metrics
            .sequences_running
            .set(self.running.len() as i64);
        self.metrics
            .sequences_waiting
            .set(self.waiting.len() as i64);
        self.metrics
            .kv_cache_blocks_used
            .set((self.limits.kv_blocks - self.pool.available()) as i64);
    }
}

/// Whether a running sequence starts with `prefix` and has yet to compute its end. Running,
/// it will (each step plans it while the budget lasts), and its full blocks then go to the
/// prefix cache; or it leaves first.
fn being_computed(running: &[Sequence<'_>], prefix: &[u32]) -> bool {
    running
        .iter()
        .any(|r| r.cached < prefix.len() && r.tokens.starts_with(prefix))
}

/// Offers the blocks the sequence has filled since the last step to the prefix cache.
fn register_full_blocks(seq: &mut Sequence<'_>, pool: &mut BlockPool) {
    while (seq.registered + 1) * BLOCK_TOKENS <= seq.cached {
        let i = seq.registered;
        let tokens = &seq.tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
        seq.prefix = pool.register(seq.prefix, tokens, seq.blocks[i]);
        seq.registered += 1;
    }
}

/// Samples the token after the sequence's last; Some(final event) when it is done.
fn advance(
    seq: &mut Sequence<'_>,
    logits: &candle_core::Tensor,
    mask: Option<Result<Mask, String>>,
    eos: &[u32],
    metrics: &Metrics,
) -> anyhow::Result<Option<Event>> {
    let mut logits = logits.to_vec1()?;
    // The model's own distribution: before penalties and grammar, as vLLM reports it.
    let distribution = seq.job.logprobs.map(|top| LogSoftmax::new(&logits, top));
    if let Some(mask) = mask {
        mask.map_err(|e| anyhow::anyhow!("grammar: {e}"))?
            .apply(&mut logits);
    }
    let token = seq.sampler.sample(logits);
    // A grammar allows an end-of-sequence token only once the document is complete.
    if let Some(constraint) = seq.constraint.as_mut().filter(|_| !eos.contains(&token)) {
        constraint
            .accept(token)
            .map_err(|e| anyhow::anyhow!("grammar: {e}"))?;
    }
    let now = Instant::now();
    match seq.last_token_at {
        None => metrics
            .time_to_first_token
            .observe((now - seq.enqueued).as_secs_f64()),
        Some(at) => metrics
            .inter_token_latency
            .observe((now - at).as_secs_f64()),
    }
    seq.last_token_at = Some(now);
    seq.tokens.push(token);
    if let Some(d) = distribution.filter(|_| !eos.contains(&token)) {
        seq.logprobs.push(d.of(token));
    }
    metrics.tokens_generated.inc();
    let completion_tokens = seq.generated();
    let done = |reason| Event::Done {
        reason,
        completion_tokens,
    };

    if eos.contains(&token) {
        send_text(seq, true, |text| text.finish());
        return Ok(Some(done(FinishReason::Stop)));
    }
    match seq
        .text
        .push(token)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?
    {
        Delta::Text(t) => send_text(seq, false, |_| t),
        Delta::Stopped(t) => {
            send_text(seq, true, |_| t);
            return Ok(Some(done(FinishReason::Stop)));
        }
    }
    if completion_tokens >= seq.job.max_new_tokens {
        send_text(seq, true, |text| text.finish());
        return Ok(Some(done(FinishReason::Length)));
    }
    Ok(None)
}

/// Sends the text, if any, with the log-probabilities gathered since the last text; when
/// the sequence is done (`last`), sends what is left even without text.
fn send_text(seq: &mut Sequence<'_>, last: bool, text: impl FnOnce(&mut TextStream<'_>) -> String) {
    let text = text(&mut seq.text);
    if !text.is_empty() || (last && !seq.logprobs.is_empty()) {
        let logprobs = std::mem::take(&mut seq.logprobs);
        let _ = seq.events.send(Event::Text(text, logprobs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use tokenizers::models::wordlevel::WordLevel;

    const VOCAB: usize = 8;

    /// Predicts the token after the last one (mod VOCAB), slowly, like a real model. It
    /// reads each sequence's history back from its KV-cache slots and fails when that is
    /// not a counting run, so a sequence given another's blocks, or recomputed wrongly after
    /// preemption, cannot pass unnoticed.
    #[derive(Default)]
    struct Counting {
        slots: Vec<u32>,
        passes: Arc<std::sync::atomic::AtomicUsize>,
        largest_step: Arc<std::sync::atomic::AtomicUsize>,
        rows: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl LanguageModel for Counting {
        fn kv_bytes_per_block(&self) -> usize {
            BLOCK_TOKENS * 4
        }

        fn allocate_kv(&mut self, blocks: usize) -> candle_core::Result<()> {
            self.slots = vec![u32::MAX; blocks * BLOCK_TOKENS];
            Ok(())
        }

        fn forward(&mut self, chunks: &[Chunk<'_>]) -> candle_core::Result<Tensor> {
            use std::sync::atomic::Ordering::Relaxed;
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.passes.fetch_add(1, Relaxed);
            let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
            self.largest_step.fetch_max(rows, Relaxed);
            self.rows.fetch_add(rows, Relaxed);
            let slot = |c: &Chunk<'_>, pos: usize| {
                c.blocks[pos / BLOCK_TOKENS] as usize * BLOCK_TOKENS + pos % BLOCK_TOKENS
            };
            let mut logits = Vec::new();
            for c in chunks {
                for (k, &t) in c.tokens.iter().enumerate() {
                    self.slots[slot(c, c.start + k)] = t;
                }
                let end = c.start + c.tokens.len();
                let history: Vec<u32> = (0..end).map(|p| self.slots[slot(c, p)]).collect();
                if history
                    .windows(2)
                    .any(|w| w[1] as usize != (w[0] as usize + 1) % VOCAB)
                {
                    candle_core::bail!("cache corrupted: {history:?}");
                }
                for &last in &history[end - c.logit_rows()..] {
                    let next = (last as usize + 1) % VOCAB;
                    logits.extend((0..VOCAB).map(|i| if i == next { 1f32 } else { 0.0 }));
                }
            }
            let rows = logits.len() / VOCAB;
            Tensor::from_vec(logits, (rows, VOCAB), &Device::Cpu)
        }
    }

    const ROOMY: Limits = Limits {
        max_running: 32,
        max_step_tokens: 256,
        kv_blocks: 256,
        prefix_caching: true,
    };

    fn engine_with(
        eos: Vec<u32>,
        model: Counting,
        limits: Limits,
    ) -> (GenerationEngine, Arc<Metrics>) {
        let vocab = (0..VOCAB)
            .map(|i| (format!("t{i}"), i as u32))
            .chain([("<unk>".to_string(), VOCAB as u32)]);
        let tokenizer = WordLevel::builder()
            .vocab(vocab.collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let engine = GenerationEngine::start(
            model,
            Arc::new(Tokenizer::new(tokenizer)),
            eos,
            limits,
            metrics.clone(),
        )
        .unwrap();
        (engine, metrics)
    }

    fn engine(eos: Vec<u32>) -> GenerationEngine {
        engine_with(eos, Counting::default(), ROOMY).0
    }

    /// What Counting generates after `prompt`: " t5 t6 t7 t0 …".
    fn counting_text(prompt: &[u32], n: usize) -> String {
        let last = *prompt.last().unwrap() as usize;
        (1..=n)
            .map(|k| format!(" t{}", (last + k) % VOCAB))
            .collect()
    }

    fn counting_prompt(first: usize, len: usize) -> Vec<u32> {
        (first..first + len).map(|i| (i % VOCAB) as u32).collect()
    }

    fn job(prompt: Vec<u32>, max_new_tokens: usize, stop: &[&str]) -> GenerationJob {
        GenerationJob {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            constraint: None,
            logprobs: None,
            prompt_logprobs: false,
            span: tracing::Span::none(),
        }
    }

    async fn collect(rx: mpsc::UnboundedReceiver<Event>) -> (String, FinishReason, usize, Instant) {
        collect_with_prompt(rx).await.1
    }

    /// The prompt's first token and log-probabilities, which come before any text, and the
    /// rest.
    async fn collect_with_prompt(
        mut rx: mpsc::UnboundedReceiver<Event>,
    ) -> (
        Option<(u32, Vec<TokenLogprob>)>,
        (String, FinishReason, usize, Instant),
    ) {
        let (mut text, mut prompt) = (String::new(), None);
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(t, _) => text.push_str(&t),
                Event::Prompt(first, l) => {
                    assert!(text.is_empty() && prompt.is_none(), "one, before the text");
                    prompt = Some((first, l));
                }
                Event::Done {
                    reason,
                    completion_tokens,
                } => return (prompt, (text, reason, completion_tokens, Instant::now())),
                Event::Failed(e) => panic!("{e}"),
            }
        }
        panic!("stream ended without Done");
    }

    /// Sequences the engine cannot run fail at once, and the engine serves the next one.
    #[tokio::test]
    async fn an_empty_or_oversized_sequence_fails_at_once() {
        let (engine, _) = engine_with(
            vec![],
            Counting::default(),
            Limits {
                kv_blocks: 2,
                ..ROOMY
            },
        );
        for (prompt, n) in [(vec![], 3), (counting_prompt(0, 20), 20)] {
            let mut rx = engine.submit(job(prompt, n, &[])).unwrap();
            assert!(matches!(rx.recv().await, Some(Event::Failed(_))));
        }
        let (text, ..) = collect(engine.submit(job(vec![0], 3, &[])).unwrap()).await;
        assert_eq!(text, " t1 t2 t3");
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

    /// Eight sequences of different lengths advance together: each step is one forward
    /// pass for all of them, not one per sequence.
    #[tokio::test]
    async fn one_forward_pass_serves_every_running_sequence() {
        let model = Counting::default();
        let passes = model.passes.clone();
        let (engine, _) = engine_with(vec![], model, ROOMY);
        // Submitted together, before the worker wakes, so they run side by side.
        let receivers: Vec<_> = (0..8)
            .map(|i| {
                engine
                    .submit(job(counting_prompt(i, 3 + 5 * i), 40, &[]))
                    .unwrap()
            })
            .collect();
        let results = futures::future::join_all(receivers.into_iter().map(collect)).await;
        for (i, (text, reason, n, _)) in results.into_iter().enumerate() {
            assert_eq!(
                (text, reason, n),
                (
                    counting_text(&counting_prompt(i, 3 + 5 * i), 40),
                    FinishReason::Length,
                    40
                )
            );
        }
        let passes = passes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            passes <= 2 * 40,
            "{passes} forward passes for 8 x 40 tokens"
        );
    }

    /// A pool far smaller than the load: sequences wait for blocks or are set back and
    /// recomputed, none fails or reads another's cache, every block comes back, and no step
    /// exceeds its token budget.
    #[tokio::test]
    async fn an_exhausted_kv_pool_makes_sequences_wait_never_mix() {
        for prefix_caching in [false, true] {
            exhaust_the_pool(prefix_caching).await;
        }
    }

    async fn exhaust_the_pool(prefix_caching: bool) {
        let limits = Limits {
            max_running: 8,
            max_step_tokens: 48,
            kv_blocks: 8,
            prefix_caching,
        };
        let model = Counting::default();
        let largest_step = model.largest_step.clone();
        let (engine, metrics) = engine_with(vec![], model, limits);
        let cases: Vec<(Vec<u32>, usize)> = (0..12)
            .map(|i| (counting_prompt(i, 5 + 7 * i % 40), 30 + 3 * i))
            .collect();
        // Every third also asks for its prompt's log-probabilities, read again when it is
        // set back.
        let asks = |i: usize| i.is_multiple_of(3);
        let receivers: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (prompt, n))| {
                let job = GenerationJob {
                    logprobs: asks(i).then_some(1),
                    prompt_logprobs: asks(i),
                    ..job(prompt.clone(), *n, &[])
                };
                engine.submit(job).unwrap()
            })
            .collect();
        let results =
            futures::future::join_all(receivers.into_iter().map(collect_with_prompt)).await;
        for (i, ((prompt, n), (logprobs, (text, reason, got, _)))) in
            cases.iter().zip(results).enumerate()
        {
            assert_eq!(
                (text, reason, got),
                (counting_text(prompt, *n), FinishReason::Length, *n),
                "prefix caching {prefix_caching}"
            );
            assert_eq!(logprobs.is_some(), asks(i));
            if let Some(logprobs) = logprobs {
                assert_counting_prompt(prompt, &logprobs);
            }
        }
        assert!(
            metrics.preemptions.get() > 0,
            "the pool was too small for all at once"
        );
        assert!(largest_step.load(std::sync::atomic::Ordering::Relaxed) <= 48);
        let used = || metrics.kv_cache_blocks_used.get();
        // The gauge is set after the step in which the last sequence finished.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while used() != 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(used(), 0, "every block came back");
    }

    /// Each prompt token after the first, in order, was the model's most likely (Counting
    /// predicts every step of a counting prompt).
    fn assert_counting_prompt(prompt: &[u32], (first, logprobs): &(u32, Vec<TokenLogprob>)) {
        assert_eq!(*first, prompt[0]);
        let tokens: Vec<u32> = logprobs.iter().map(|l| l.token).collect();
        assert_eq!(tokens, prompt[1..]);
        for l in logprobs {
            assert_eq!(l.top[0], (l.token, l.logprob));
            assert!(l.top.iter().skip(1).all(|t| t.1 < l.logprob), "{l:?}");
        }
    }

    /// A prompt's log-probabilities cover every token after its first however the prompt is
    /// read: in steps of at most `PROMPT_LOGPROB_ROWS` rows, and in full even when another
    /// sequence left its prefix in the cache. A one-token prompt has none.
    #[tokio::test]
    async fn prompt_logprobs_cover_every_token_after_the_first() {
        let model = Counting::default();
        let largest_step = model.largest_step.clone();
        let (engine, metrics) = engine_with(vec![], model, ROOMY);
        let prompt = counting_prompt(2, 300);
        collect(engine.submit(job(prompt.clone(), 2, &[])).unwrap()).await;
        largest_step.store(0, std::sync::atomic::Ordering::Relaxed);
        let hits = metrics.prefix_cache_hits.get();
        for prompt in [prompt, vec![5]] {
            let asking = GenerationJob {
                logprobs: Some(2),
                prompt_logprobs: true,
                ..job(prompt.clone(), 3, &[])
            };
            let (logprobs, (text, ..)) = collect_with_prompt(engine.submit(asking).unwrap()).await;
            assert_eq!(text, counting_text(&prompt, 3));
            assert_counting_prompt(&prompt, &logprobs.unwrap());
        }
        assert_eq!(metrics.prefix_cache_hits.get(), hits, "read, not reused");
        let largest = largest_step.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(largest, PROMPT_LOGPROB_ROWS);
    }

    /// A prompt that starts like an earlier one (its whole text, then more) computes only
    /// what follows the cached full blocks, gives the same text as without the cache, and the
    /// hit shows in the metrics; with caching off everything is computed again.
    #[tokio::test]
    async fn a_shared_prefix_is_computed_once() {
        for prefix_caching in [true, false] {
            let model = Counting::default();
            let rows = model.rows.clone();
            let limits = Limits {
                prefix_caching,
                ..ROOMY
            };
            let (engine, metrics) = engine_with(vec![], model, limits);
            let computed = || rows.load(std::sync::atomic::Ordering::Relaxed);
            let first = counting_prompt(3, 70);
            let (text, ..) = collect(engine.submit(job(first.clone(), 5, &[])).unwrap()).await;
            assert_eq!(text, counting_text(&first, 5));
            let before = computed();
            // The first sequence's prompt and answer, then a follow-up: like a chat's next turn.
            let second = counting_prompt(3, 100);
            let (text, ..) = collect(engine.submit(job(second.clone(), 5, &[])).unwrap()).await;
            assert_eq!(
                text,
                counting_text(&second, 5),
                "prefix caching {prefix_caching}"
            );
            let recomputed = computed() - before;
            if prefix_caching {
                // 70 prompt + 4 fed-back tokens made 4 full blocks (64 tokens).
                assert_eq!(recomputed, 100 - 64 + 4, "the tail and 4 decode steps");
                assert_eq!(metrics.prefix_cache_hits.get(), 64);
                assert_eq!(metrics.prefix_cache_queries.get(), 170);
            } else {
                assert_eq!(recomputed, 100 + 4);
                assert_eq!(metrics.prefix_cache_hits.get(), 0);
            }
        }
    }

    /// Two requests with the same prompt arriving together: the second waits for the first
    /// to fill the prefix cache and computes only the rest (without that, both compute the
    /// whole prompt in the same step and neither finds a cached block). Both get the text
    /// they would get alone.
    #[tokio::test]
    async fn a_prefix_shared_by_requests_arriving_together_is_computed_once() {
        let (engine, metrics) = engine_with(vec![], Counting::default(), ROOMY);
        // Keeps the engine stepping, so the two below arrive between steps, together. It
        // starts at another token, so no block of its matches theirs.
        let busy = engine
            .submit(job(counting_prompt(0, 10), 500, &[]))
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let prompt = counting_prompt(3, 70);
        let twins = [0, 1].map(|_| engine.submit(job(prompt.clone(), 5, &[])).unwrap());
        for rx in twins {
            let (text, ..) = collect(rx).await;
            assert_eq!(text, counting_text(&prompt, 5));
        }
        drop(busy);
        // The first's 70 prompt tokens made 4 full blocks (64 tokens).
        assert_eq!(metrics.prefix_cache_hits.get(), 64);
        assert_eq!(metrics.prefix_cache_queries.get(), 10 + 70 + 70);
    }
}
