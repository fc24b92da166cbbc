//! A weight matrix as the decoder uses it: candle's `QMatMul` (dense, or quantized where candle
//! has a fast kernel) or kandle's own quantized kernels.
use super::quant;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Result, Tensor};

pub enum Matrix {
    Candle(QMatMul),
    Quantized(quant::Matrix),
}

impl Matrix {
    /// `x @ self.T`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Quantized(m) => m.forward(&x.contiguous()?),
        }
    }

    /// The matrices' rows one after another, as one matrix, where their storage allows: the
    /// same kandle format, or dense candle tensors of one dtype; None otherwise.
    pub fn stack(parts: &[&Self]) -> Result<Option<Self>> {
        let quantized: Option<Vec<&quant::Matrix>> = parts
            .iter()
            .map(|m| match m {
                Self::Quantized(q) => Some(q),
                Self::Candle(_) => None,
            })
            .collect();
        if let Some(q) = quantized {
            return Ok(quant::Matrix::stack(&q).map(Self::Quantized));
        }
        let dense: Option<Vec<Tensor>> = parts
            .iter()
            .map(|m| match m {
                Self::Candle(QMatMul::Tensor(t)) => Some(t.clone()),
                _ => None,
            })
            .collect();
        match dense {
            Some(ts) if ts.iter().all(|t| t.dtype() == ts[0].dtype()) => {
                Ok(Some(Self::Candle(QMatMul::Tensor(Tensor::cat(&ts, 0)?))))
            }
            _ => Ok(None),
        }
    }

    /// Whether the weights are stored quantized (a GGUF file's), not as plain floats.
    pub fn quantized(&self) -> bool {
        !matches!(
            self,
            Self::Candle(QMatMul::Tensor(_) | QMatMul::TensorF16(_))
        )
    }

    /// The rows `ids` of an embedding table, as f32.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.embedding(ids),
            Self::Quantized(m) => {
                let ids = ids.to_vec1::<u32>()?;
                Tensor::from_vec(m.embedding(&ids)?, (ids.len(), m.cols()), &Device::Cpu)
            }
        }
    }
}
