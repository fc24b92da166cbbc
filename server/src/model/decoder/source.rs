//! Where a decoder's tensors come from: memory-mapped safetensors (dense, in the chosen
//! dtype) or a GGUF file (quantized matrices kept quantized). The decoder asks for tensors
//! by their Hugging Face names and shapes; a tensor of the wrong shape is a load error that
//! names it, never a panic in a later forward pass.
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use std::fs::File;
use std::path::PathBuf;

pub trait Source {
    fn has(&self, name: &str) -> bool;
    /// A [rows, cols] matrix, as the right operand of a linear layer or an embedding table.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatMul>;
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

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.load(name, &[rows, cols])?))
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
    file: File,
    device: Device,
}

impl Gguf {
    pub fn new(content: Content, file: File, device: &Device) -> Self {
        Self {
            content,
            file,
            device: device.clone(),
        }
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, &gguf_name(name), &self.device)
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

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatMul> {
        let t = self.tensor(name)?;
        check_shape(name, t.shape().dims(), &[rows, cols])?;
        QMatMul::from_qtensor(t)
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
