//! Which code computes a model: kandle's own CPU kernels (the CPU in f32) or candle's portable
//! tensor operations, the path every other device and dtype takes. `--kernels portable` runs
//! the portable path on the CPU too: to check on a machine without a GPU the code a GPU runs,
//! or to rule kandle's kernels out when an output looks wrong; `avx2` and `vnni` keep kandle's
//! kernels to an instruction set, to compare them.
use super::decoder::quant;
use crate::cli::KernelsArg;
use candle_core::{DType, Device};

impl KernelsArg {
    /// Whether kandle's CPU kernels take tensors of this device and dtype.
    pub fn own_cpu(self, device: &Device, dtype: DType) -> bool {
        self != Self::Portable && device.is_cpu() && dtype == DType::F32
    }

    /// Keeps kandle's CPU kernels, process-wide, to this choice's instruction set, if it
    /// names one.
    pub fn limit_instruction_set(self) -> Result<(), quant::KernelsChosen> {
        match self {
            Self::Auto | Self::Portable => Ok(()),
            Self::Avx2 => quant::cap_kernels("avx2"),
            Self::Vnni => quant::cap_kernels("vnni"),
        }
    }

    /// What computes on the CPU, for the logs: `candle`, or kandle's kernels by instruction set.
    pub fn cpu_name(self) -> &'static str {
        match self {
            Self::Portable => "candle",
            _ => quant::kernels_name(),
        }
    }
}
