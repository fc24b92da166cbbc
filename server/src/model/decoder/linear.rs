//! The decoder's linear maps: a weight matrix and an optional bias, and maps that read the
//! same input (q, k and v; gate and up) stacked into one product where their storage allows,
//! so each step quantizes that input once and makes one pass over the pool instead of three.
use super::matrix::Matrix;
use super::source::Source;
use candle_core::{D, Result, Tensor};

pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        src: &mut dyn Source,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: src.matrix(&format!("{name}.weight"), rows, cols)?,
            bias: if bias {
                Some(src.vector(&format!("{name}.bias"), rows)?)
            } else {
                None
            },
        })
    }

    pub fn quantized(&self) -> bool {
        self.weight.quantized()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Linear maps of one input, whose outputs are its parts.
pub enum Stacked {
    /// One product; each part's outputs are the next `widths` columns.
    Fused { linear: Linear, widths: Vec<usize> },
    /// Storage that does not stack (mixed formats, candle's own quantized types).
    Apart(Vec<Linear>),
}

impl Stacked {
    /// `parts` as (name, rows) of a [rows, cols] matrix each.
    pub fn load(
        src: &mut dyn Source,
        parts: &[(&str, usize)],
        cols: usize,
        bias: bool,
    ) -> Result<Self> {
        let linears = parts
            .iter()
            .map(|&(name, rows)| Linear::load(src, name, rows, cols, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Matrix> = linears.iter().map(|l| &l.weight).collect();
        let Some(weight) = Matrix::stack(&weights)? else {
            return Ok(Self::Apart(linears));
        };
        let bias = if bias {
            let biases: Vec<&Tensor> = linears.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self::Fused {
            linear: Linear { weight, bias },
            widths: parts.iter().map(|&(_, rows)| rows).collect(),
        })
    }

    /// The parts' outputs side by side, in the order the parts were given.
    pub fn forward_joined(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Fused { linear, .. } => linear.forward(x),
            Self::Apart(linears) => {
                let parts = linears
                    .iter()
                    .map(|l| l.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, D::Minus1)
            }
        }
    }

    /// Each of the `N` parts' output, in the order the parts were given.
    pub fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let parts: Vec<Tensor> = match self {
            Self::Fused { linear, widths } => {
                let y = linear.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        at += w;
                        y.narrow(D::Minus1, at - w, w)
                    })
                    .collect::<Result<_>>()?
            }
            Self::Apart(linears) => linears
                .iter()
                .map(|l| l.forward(x))
                .collect::<Result<_>>()?,
        };
        parts.try_into().map_err(|p: Vec<Tensor>| {
            candle_core::Error::msg(format!("{} stacked parts, not {N}", p.len()))
        })
    }
}
