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
