//! Next-token choice: OpenAI's presence and frequency penalties, then candle's sampler.
use crate::validation::SamplingParams;
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::collections::HashMap;

pub struct Sampler {
    processor: LogitsProcessor,
    presence_penalty: f32,
    frequency_penalty: f32,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let temperature = p.temperature;
        let sampling = if temperature == 0.0 {
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
    use candle_core::Device;

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
