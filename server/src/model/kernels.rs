//! Which code computes a model: kandle's own CPU kernels (the CPU in f32) or candle's portable
//! tensor operations, the path every other device and dtype takes. `--kernels portable` runs
//! the portable path on the CPU too: to check on a machine without a GPU the code a GPU runs,
//! or to rule kandle's kernels out when an output looks wrong.
use crate::cli::KernelsArg;
use candle_core::{DType, Device};

impl KernelsArg {
    /// Whether kandle's CPU kernels take tensors of this device and dtype.
    pub fn own_cpu(self, device: &Device, dtype: DType) -> bool {
        self == Self::Auto && device.is_cpu() && dtype == DType::F32
    }
}
