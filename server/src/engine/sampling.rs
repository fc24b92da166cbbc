//! Next-token choice with OpenAI's parameters: presence and frequency penalties on the
//! logits, then greedy decoding, or sampling at a temperature from the top-k tokens and the
//! top-p probability mass, drawn from a generator seeded per request.
use super::generation::TokenLogprob;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::HashMap;

/// Below this temperature sampling is argmax in all but rounding (logits divided by 1e-38
/// overflow); vLLM treats it as greedy too.
const MIN_TEMPERATURE: f64 = 1e-5;
/// Candidates first considered for top-p: the mass is nearly always within them, which
/// saves sorting the whole vocabulary; the set grows fourfold until it holds the mass.
const TOP_P_FIRST_CANDIDATES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// In (0, 1); None keeps the whole distribution.
    pub top_p: Option<f64>,
    /// At least 1; None keeps every token.
    pub top_k: Option<usize>,
    pub seed: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl SamplingParams {
    /// Deterministic argmax decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token has been generated, for the penalties.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params: params.clone(),
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from the last position's logits (not empty) and remembers it
    /// for the penalties. Always a valid index, whatever the values.
    pub fn sample(&mut self, mut logits: Vec<f32>) -> u32 {
        let p = &self.params;
        for (&token, &count) in &self.counts {
            if let Some(v) = logits.get_mut(token as usize) {
                *v -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
        let token = if p.temperature < MIN_TEMPERATURE {
            argmax(&logits)
        } else {
            self.draw(&logits)
        };
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let best = argmax(logits);
        let top = logits[best as usize];
        if !top.is_finite() {
            return best;
        }
        let inv_t = 1.0 / self.params.temperature;
        // Relative to the best, so none overflows; NaN weighs nothing.
        let weight = |i: u32| {
            ((f64::from(logits[i as usize]) - f64::from(top)) * inv_t)
                .exp()
                .max(0.0)
        };
        let u = self.rng.random::<f64>();
        if self.params.top_k.is_none() && self.params.top_p.is_none() {
            // The whole vocabulary: no list of candidates to build for every token.
            return pick(0..logits.len() as u32, weight, u).unwrap_or(best);
        }
        let mut candidates: Vec<u32> = (0..logits.len() as u32).collect();
        if let Some(k) = self.params.top_k {
            keep_largest(&mut candidates, k, logits);
        }
        if let Some(top_p) = self.params.top_p {
            let total: f64 = candidates.iter().map(|&i| weight(i)).sum();
            let mut n = TOP_P_FIRST_CANDIDATES;
            loop {
                keep_largest_sorted(&mut candidates, n, logits);
                let mut mass = 0.0;
                let kept = candidates.iter().position(|&i| {
                    mass += weight(i);
                    mass >= top_p * total
                });
                match kept {
                    Some(last) => {
                        candidates.truncate(last + 1);
                        break;
                    }
                    None if n >= candidates.len() => break,
                    None => n *= 4,
                }
            }
        }
        pick(candidates.iter().copied(), weight, u).unwrap_or(best)
    }
}

/// Log-probabilities of one step's logits (a copy: sampling consumes the original).
pub struct LogSoftmax {
    logits: Vec<f32>,
    log_total: f32,
    top: Vec<(u32, f32)>,
}

impl LogSoftmax {
    /// Remembers the `top` most likely tokens; NaN logits count as impossible.
    pub fn new(logits: &[f32], top: usize) -> Self {
        let numbers = || logits.iter().copied().filter(|v| !v.is_nan());
        let max = numbers().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = numbers().map(|v| f64::from(v - max).exp()).sum();
        let log_total = max + sum.ln() as f32;
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        keep_largest_sorted(&mut ids, top, logits);
        ids.truncate(top);
        let top = ids
            .iter()
            .map(|&i| (i, logits[i as usize] - log_total))
            .collect();
        Self {
            logits: logits.to_vec(),
            log_total,
            top,
        }
    }

    pub fn of(self, token: u32) -> TokenLogprob {
        let v = self.logits[token as usize];
        TokenLogprob {
            token,
            logprob: if v.is_nan() {
                f32::NEG_INFINITY
            } else {
                v - self.log_total
            },
            top: self.top,
        }
    }
}

/// The token that `u` (in [0, 1)) falls on when `ids` share the unit interval by weight; the
/// last one when rounding leaves a sliver past it, None when there are none.
fn pick(
    ids: impl Iterator<Item = u32> + Clone,
    weight: impl Fn(u32) -> f64,
    u: f64,
) -> Option<u32> {
    let total: f64 = ids.clone().map(&weight).sum();
    let mut left = u * total;
    let mut last = None;
    for i in ids {
        left -= weight(i);
        if left < 0.0 {
            return Some(i);
        }
        last = Some(i);
    }
    last
}

/// The first index of the largest value (NaN never wins over a number).
/// The first index of the largest logit, NaN ignored (0 when all are NaN). The maximum is
/// taken in 8 independent lanes, so the loop vectorises: this pass over the vocabulary, once
/// per token per sequence on the engine thread, was 2.5% of a batched decode profile.
fn argmax(logits: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let max = lanes.into_iter().fold(tail, f32::max);
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Larger logits first; NaN last.
fn descending(logits: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    |&a, &b| {
        let (a, b) = (logits[a as usize], logits[b as usize]);
        b.partial_cmp(&a)
            .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
    }
}

/// Keeps the `k` candidates with the largest logits, in no particular order.
fn keep_largest(candidates: &mut Vec<u32>, k: usize, logits: &[f32]) {
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k, descending(logits));
        candidates.truncate(k);
    }
}

/// Puts the `k` largest first, sorted, and leaves the others after them.
fn keep_largest_sorted(candidates: &mut [u32], k: usize, logits: &[f32]) {
    let k = k.min(candidates.len());
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k, descending(logits));
    }
    candidates[..k].sort_unstable_by(descending(logits));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SamplingFields;
    use crate::validation::generation_params;
    use proptest::prelude::*;

    /// Finite values that stress the arithmetic: tiny, huge, negative, exact bounds.
    fn odd_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(1e-300),
            Just(1e-38),
            Just(f64::MIN_POSITIVE),
            Just(1e-6),
            Just(2.0),
            Just(1.0),
            Just(-0.0),
            -3.0..3.0f64,
            any::<f64>(),
        ]
    }

    proptest! {
        /// Whatever sampling values a request carries, they are refused as a 400 or give a
        /// token from the vocabulary.
        #[test]
        fn any_accepted_sampling_values_give_a_token(
            temperature in proptest::option::of(odd_f64()),
            top_p in proptest::option::of(odd_f64()),
            top_k in proptest::option::of(-3i64..100_000),
            presence in proptest::option::of(odd_f64()),
            frequency in proptest::option::of(odd_f64()),
            seed in proptest::option::of(any::<i64>()),
            logits in proptest::collection::vec(
                prop_oneof![-1e4f32..1e4, Just(f32::NEG_INFINITY), Just(f32::NAN)], 1..64),
        ) {
            let fields: SamplingFields = serde_json::from_value(serde_json::json!({
                "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "presence_penalty": presence, "frequency_penalty": frequency, "seed": seed,
            })).unwrap();
            let Ok(params) = generation_params(fields) else { return Ok(()) };
            let mut sampler = Sampler::new(&params.sampling);
            for _ in 0..3 {
                let token = sampler.sample(logits.clone());
                prop_assert!((token as usize) < logits.len(), "{token} for {params:?}");
            }
        }
    }

    fn params(temperature: f64, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed,
            ..SamplingParams::greedy()
        }
    }

    /// How often each token is drawn in `n` samples.
    fn frequencies(p: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(&p);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits.to_vec()) as usize] += 1;
            // Penalties are off; forget the draw so each one sees the same logits.
            s.counts.clear();
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        let mut s = Sampler::new(&params(0.0, 1));
        assert_eq!(s.sample(vec![0.1, 3.0, 0.2, 3.0]), 1);
        assert_eq!(s.sample(vec![f32::NAN, -1.0]), 1);
        assert_eq!(s.sample(vec![f32::NAN; 3]), 0);
        // Past the 8-lane loop's tail, and among infinities.
        let mut long = vec![0.5f32; 21];
        long[13] = 2.0;
        long[17] = 2.0;
        assert_eq!(s.sample(long), 13);
        assert_eq!(s.sample(vec![f32::NEG_INFINITY; 11]), 0);
    }

    #[test]
    fn samples_follow_the_softmax_at_the_temperature() {
        // ln 1, ln 2, ln 3, ln 4: probabilities 0.1..0.4 at temperature 1; at 0.5 squared.
        let logits: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|x| x.ln()).collect();
        let f = frequencies(params(1.0, 3), &logits, 40_000);
        for (got, want) in f.iter().zip([0.1, 0.2, 0.3, 0.4]) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
        let f = frequencies(params(0.5, 3), &logits, 40_000);
        for (got, want) in f.iter().zip([1., 4., 9., 16.].map(|w| w / 30.)) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_likeliest_tokens() {
        let logits: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|x| x.ln()).collect();
        let top_k = SamplingParams {
            top_k: Some(2),
            ..params(1.0, 5)
        };
        let f = frequencies(top_k, &logits, 20_000);
        assert_eq!(&f[..2], &[0.0, 0.0]);
        assert!((f[3] - 4. / 7.).abs() < 0.015, "{f:?}");
        // 0.4 + 0.3 reaches 0.65: the two likeliest tokens, renormalised.
        let top_p = SamplingParams {
            top_p: Some(0.65),
            ..params(1.0, 5)
        };
        let f = frequencies(top_p, &logits, 20_000);
        assert_eq!(&f[..2], &[0.0, 0.0]);
        assert!((f[3] - 4. / 7.).abs() < 0.015, "{f:?}");
    }

    #[test]
    fn top_p_reaches_past_the_first_candidates_of_a_flat_distribution() {
        // 1,000 equal logits: top_p 0.5 keeps 500 of them, more than the first 64.
        let f = frequencies(
            SamplingParams {
                top_p: Some(0.5),
                ..params(1.0, 9)
            },
            &[0.0; 1000],
            20_000,
        );
        let drawn = f.iter().filter(|&&x| x > 0.0).count();
        assert_eq!(drawn, 500);
    }

    #[test]
    fn the_same_seed_gives_the_same_samples() {
        let logits = vec![1.0f32, 1.1, 0.9, 1.05];
        let run = |seed| {
            let mut s = Sampler::new(&params(1.0, seed));
            (0..32)
                .map(|_| s.sample(logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(&SamplingParams {
            frequency_penalty: 1.0,
            ..params(0.0, 1)
        });
        assert_eq!(s.sample(vec![2.0, 1.5]), 0);
        assert_eq!(s.sample(vec![2.0, 1.5]), 1);
    }
}
