//! From each token's hidden state to one vector per sequence, as sentence-transformers'
//! `Pooling` and `Normalize` modules do.
use super::encoder::rows;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Cls,
    Mean,
    Max,
    LastToken,
}

impl Pooling {
    /// One vector per sequence from packed hidden states: `hidden` holds `lens.iter().sum()`
    /// rows of `width` values, sequence after sequence.
    pub fn pool(
        self,
        hidden: &[f32],
        width: usize,
        lens: &[usize],
        normalize: bool,
    ) -> Vec<Vec<f32>> {
        (0..lens.len())
            .map(|i| {
                let r = rows(lens, i);
                let tokens = &hidden[r.start * width..r.end * width];
                let mut v = match self {
                    Self::Cls => tokens[..width].to_vec(),
                    Self::LastToken => tokens[tokens.len() - width..].to_vec(),
                    Self::Mean => {
                        let mut sum = vec![0f32; width];
                        for row in tokens.chunks_exact(width) {
                            sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                        }
                        sum.iter_mut().for_each(|s| *s /= r.len() as f32);
                        sum
                    }
                    Self::Max => {
                        let mut max = vec![f32::NEG_INFINITY; width];
                        for row in tokens.chunks_exact(width) {
                            max.iter_mut().zip(row).for_each(|(m, x)| *m = m.max(*x));
                        }
                        max
                    }
                };
                if normalize {
                    // As torch.nn.functional.normalize: a zero vector stays zero.
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sequences of 2 and 3 tokens, width 2.
    const HIDDEN: [f32; 10] = [1., 2., 3., -4., /* | */ 0., 5., 6., 1., -3., 0.];
    const LENS: [usize; 2] = [2, 3];

    #[test]
    fn each_mode_reads_only_its_own_sequences_tokens() {
        let pool = |p: Pooling| p.pool(&HIDDEN, 2, &LENS, false);
        assert_eq!(pool(Pooling::Cls), vec![vec![1., 2.], vec![0., 5.]]);
        assert_eq!(pool(Pooling::LastToken), vec![vec![3., -4.], vec![-3., 0.]]);
        assert_eq!(pool(Pooling::Mean), vec![vec![2., -1.], vec![1., 2.]]);
        assert_eq!(pool(Pooling::Max), vec![vec![3., 2.], vec![6., 5.]]);
    }

    #[test]
    fn normalised_vectors_have_unit_length_and_zero_stays_zero() {
        let v = Pooling::Cls.pool(&[3., 4.], 2, &[1], true);
        assert_eq!(v, vec![vec![0.6, 0.8]]);
        assert_eq!(
            Pooling::Mean.pool(&[0., 0.], 2, &[1], true),
            vec![vec![0., 0.]]
        );
    }
}
