//! Where a decoder's tensors come from: memory-mapped safetensors (dense, in the chosen
//! dtype) or a memory-mapped GGUF file (quantized matrices kept quantized, copied once from
//! the mapping into candle's storage or, for Q4_1, Q5_0, Q5_1 and Q8_0 on the CPU, kandle's
//! interleaved layout). The decoder asks for tensors
//! by their Hugging Face names and shapes; a tensor of the wrong shape is a load error that
//! names it, never a panic in a later forward pass.
use super::matrix::Matrix;
use super::quant::{self, Format};
use crate::cli::KernelsArg;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;

pub trait Source {
    fn has(&self, name: &str) -> bool;
    /// A [rows, cols] matrix, as the right operand of a linear layer or an embedding table.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix>;
    /// A vector of `len` values (a norm's weight, a bias) in the activations' dtype.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor>;
    /// The dtype of activations and dense weights.
    fn dtype(&self) -> DType;
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        candle_core::bail!("tensor `{name}` has shape {got:?}, the config implies {want:?}");
    }
    Ok(())
}

pub struct Safetensors {
    files: MmapedSafetensors,
    dtype: DType,
    device: Device,
}

impl Safetensors {
    #[allow(unsafe_code)]
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        // SAFETY: the files are mapped read-only; like every server that maps weights we rely
        // on nothing rewriting them while the process runs (pulls publish by rename).
        let files = unsafe { MmapedSafetensors::multi(files)? };
        Ok(Self {
            files,
            dtype,
            device: device.clone(),
        })
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.files.load(name, &self.device)?;
        check_shape(name, t.dims(), shape)?;
        t.to_dtype(self.dtype)
    }
}

impl Source for Safetensors {
    fn has(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix::Candle(QMatMul::Tensor(
            self.load(name, &[rows, cols])?,
        )))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.load(name, &[len])
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

pub struct Gguf {
    content: Content,
    map: memmap2::Mmap,
    device: Device,
    kernels: KernelsArg,
}

impl Gguf {
    #[allow(unsafe_code)]
    pub fn open(
        content: Content,
        file: &File,
        device: &Device,
        kernels: KernelsArg,
    ) -> Result<Self> {
        // SAFETY: mapped read-only; as with safetensors, nothing rewrites a published model
        // file while the server runs (pulls publish by rename).
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Self {
            content,
            map,
            device: device.clone(),
            kernels,
        })
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The tensor's type, dims and where its bytes lie in the file, checked against the file's
    /// length: the offsets and shapes in a GGUF header are the file's word, not facts.
    fn locate(&self, name: &str) -> Result<(GgmlDType, Vec<usize>, Range<usize>)> {
        let gguf = gguf_name(name);
        let Some(info) = self.content.tensor_infos.get(&gguf) else {
            candle_core::bail!("the file has no tensor `{gguf}`");
        };
        let dims = info.shape.dims().to_vec();
        let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elems
            .filter(|e| e.is_multiple_of(block))
            .map(|e| e / block * size);
        let start =
            usize::try_from(self.content.tensor_data_offset.saturating_add(info.offset)).ok();
        let len = self.map.len();
        match (bytes, start) {
            (Some(bytes), Some(start)) if start.checked_add(bytes).is_some_and(|e| e <= len) => {
                Ok((info.ggml_dtype, dims, start..start + bytes))
            }
            _ => candle_core::bail!(
                "tensor `{gguf}` ({:?} {dims:?} at {}) does not fit in the file",
                info.ggml_dtype,
                info.offset
            ),
        }
    }

    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let (dtype, dims, range) = self.locate(name)?;
        ggml_file::qtensor_from_ggml(dtype, &self.map[range], dims, &self.device)
    }
}

/// llama.cpp's name for a tensor Hugging Face calls `name`.
fn gguf_name(name: &str) -> String {
    const TOP: &[(&str, &str)] = &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    const LAYER: &[(&str, &str)] = &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    if let Some((_, g)) = TOP.iter().find(|(hf, _)| *hf == name) {
        return g.to_string();
    }
    if let Some(rest) = name.strip_prefix("model.layers.")
        && let Some((index, rest)) = rest.split_once('.')
        && let Some((hf, g)) = LAYER.iter().find(|(hf, _)| rest.starts_with(hf))
    {
        return format!("blk.{index}.{g}{}", &rest[hf.len()..]);
    }
    name.to_string()
}

impl Source for Gguf {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&gguf_name(name))
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (dtype, dims, range) = self.locate(name)?;
        check_shape(name, &dims, &[rows, cols])?;
        if self.kernels.own_cpu(&self.device, DType::F32) {
            let bytes = &self.map[range];
            let own = |format| quant::Matrix::new(format, bytes, rows, cols);
            let matrix = match dtype {
                GgmlDType::Q4_1 => Some(own(Format::Q4_1)),
                GgmlDType::Q5_0 => Some(own(Format::Q5_0)),
                GgmlDType::Q5_1 => Some(own(Format::Q5_1)),
                GgmlDType::Q8_0 => Some(own(Format::Q8_0)),
                GgmlDType::Q4K => Some(quant::Matrix::from_q4_k(bytes, rows, cols)),
                _ => None,
            };
            if let Some(matrix) = matrix {
                return Ok(Matrix::Quantized(matrix?));
            }
        }
        Ok(Matrix::Candle(QMatMul::from_qtensor(self.tensor(name)?)?))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.tensor(name)?.dequantize(&self.device)?;
        check_shape(name, t.dims(), &[len])?;
        Ok(t)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.11.self_attn.q_proj.bias",
                "blk.11.attn_q.bias",
            ),
            (
                "model.layers.0.self_attn.k_norm.weight",
                "blk.0.attn_k_norm.weight",
            ),
            (
                "model.layers.3.mlp.down_proj.weight",
                "blk.3.ffn_down.weight",
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            ("lm_head.weight", "output.weight"),
        ] {
            assert_eq!(super::gguf_name(hf), gguf);
        }
    }
}
