//! Next-token choice: OpenAI's presence and frequency penalties, then candle's sampler.
use crate::validation::SamplingParams;
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::collections::HashMap;

const MIN_TEMPERATURE: f64 = 1e-5;
/// Any top_p at most the largest probability keeps that token alone, and the largest
/// probability over a vocabulary of under a million tokens is above this.
const MIN_TOP_P: f64 = 1e-6;

pub struct Sampler {
    processor: LogitsProcessor,
    presence_penalty: f32,
    frequency_penalty: f32,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let temperature = p.temperature;
        // Below these, sampling is argmax in all but rounding: logits divided by a
        // temperature of 1e-38 overflow, and a top_p under f32's precision keeps no token.
        // vLLM treats temperatures under 1e-5 as greedy too.
        let sampling = if temperature < MIN_TEMPERATURE || p.top_p.is_some_and(|p| p < MIN_TOP_P) {
            Sampling::ArgMax
        } else {
            match (p.top_k, p.top_p) {
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (None, None) => Sampling::All { temperature },
            }
        };
        Self {
            processor: LogitsProcessor::from_sampling(p.seed, sampling),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from last-position logits and remembers it for the penalties.
    pub fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        let token = if self.counts.is_empty()
            || (self.presence_penalty == 0.0 && self.frequency_penalty == 0.0)
        {
            self.processor.sample(logits)?
        } else {
            let mut values = logits.to_vec1::<f32>()?;
            for (&token, &count) in &self.counts {
                if let Some(v) = values.get_mut(token as usize) {
                    *v -= self.presence_penalty + self.frequency_penalty * count as f32;
                }
            }
            self.processor
                .sample(&Tensor::new(values, logits.device())?)?
        };
        *self.counts.entry(token).or_default() += 1;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SamplingFields;
    use crate::validation::generation_params;
    use candle_core::Device;
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
        /// token from the vocabulary: never an error that would be a 500.
        #[test]
        fn any_accepted_sampling_values_give_a_token(
            temperature in proptest::option::of(odd_f64()),
            top_p in proptest::option::of(odd_f64()),
            top_k in proptest::option::of(-3i64..100_000),
            presence in proptest::option::of(odd_f64()),
            frequency in proptest::option::of(odd_f64()),
            seed in proptest::option::of(any::<i64>()),
            logits in proptest::collection::vec(-1e4f32..1e4, 1..64),
        ) {
            let fields: SamplingFields = serde_json::from_value(serde_json::json!({
                "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "presence_penalty": presence, "frequency_penalty": frequency, "seed": seed,
            })).unwrap();
            let Ok(params) = generation_params(fields) else { return Ok(()) };
            let mut sampler = Sampler::new(&params.sampling);
            let logits = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
            for _ in 0..3 {
                let token = sampler.sample(&logits);
                prop_assert!(token.as_ref().is_ok_and(|&t| (t as usize) < logits.dim(0).unwrap()), "{token:?} for {params:?}");
            }
        }
    }

    fn params(temperature: f64, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p: None,
            top_k: None,
            seed,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let logits = Tensor::new(&[0.1f32, 3.0, 0.2], &Device::Cpu).unwrap();
        let mut s = Sampler::new(&params(0.0, 1));
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_samples() {
        let logits = Tensor::new(&[1.0f32, 1.1, 0.9, 1.05], &Device::Cpu).unwrap();
        let run = |seed| {
            let mut s = Sampler::new(&params(1.0, seed));
            (0..32)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let logits = Tensor::new(&[2.0f32, 1.5], &Device::Cpu).unwrap();
        let mut s = Sampler::new(&SamplingParams {
            frequency_penalty: 1.0,
            ..params(0.0, 1)
        });
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
}
