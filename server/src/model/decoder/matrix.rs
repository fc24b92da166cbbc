//! A weight matrix as the decoder uses it: candle's `QMatMul` (dense, or quantized where candle
//! has a fast kernel) or one of kandle's own kernels.
use super::q4_1;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Result, Tensor};

pub enum Matrix {
    Candle(QMatMul),
    Q4_1(q4_1::Matrix),
}

impl Matrix {
    /// `x @ self.T`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Q4_1(m) => m.forward(&x.contiguous()?),
        }
    }

    /// The rows `ids` of an embedding table, as f32.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.embedding(ids),
            Self::Q4_1(m) => {
                let ids = ids.to_vec1::<u32>()?;
                Tensor::from_vec(m.embedding(&ids)?, (ids.len(), m.cols()), &Device::Cpu)
            }
        }
    }
}
