//! The decoder's shape, read from a Hugging Face `config.json` or GGUF metadata. Every field
//! that changes the maths is read here or the model is refused by name: a model run with the
//! wrong rotary base, without its biases or with the wrong window generates fluent nonsense.
use serde_json::Value;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// First half with second half (Hugging Face's `rotate_half`; llama.cpp's NEOX).
    Halves,
    /// Adjacent pairs: llama.cpp's Llama GGUF files, whose q/k rows its converter permuted.
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by a factor.
    Linear(f64),
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Biases {
    pub qkv: bool,
    pub output: bool,
    pub mlp: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    /// Tokens each layer attends back over (itself included); None: the whole context.
    pub windows: Vec<Option<usize>>,
    pub biases: Biases,
    /// Qwen3's RMS norm over each query and key head before the rotation.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    pub context_length: usize,
}

/// Families this decoder implements, as `model_type` names them.
pub const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

impl DecoderConfig {
    /// A `config.json`; errors name the field that cannot be honoured.
    pub fn from_hf(config: &Value) -> Result<Self, String> {
        let family = str_field(config, "model_type")
            .unwrap_or_default()
            .to_string();
        if !FAMILIES.contains(&family.as_str()) {
            return Err(format!(
                "model_type `{family}` is not supported (supported: {}, bert)",
                FAMILIES.join(", ")
            ));
        }
        if let Some(act) = str_field(config, "hidden_act")
            && act != "silu"
        {
            return Err(format!(
                "hidden_act `{act}` is not supported (supported: silu)"
            ));
        }
        let hidden_size = usize_field(config, "hidden_size")?;
        let num_heads = usize_field(config, "num_attention_heads")?;
        let num_layers = usize_field(config, "num_hidden_layers")?;
        let num_kv_heads = opt_usize(config, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match opt_usize(config, "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let flag = |name: &str| config.get(name).and_then(Value::as_bool).unwrap_or(false);
        let biases = match family.as_str() {
            // Qwen2's q/k/v projections always carry biases; no config field says so.
            "qwen2" => Biases {
                qkv: true,
                output: false,
                mlp: false,
            },
            "mistral" => Biases::default(),
            _ => Biases {
                qkv: flag("attention_bias"),
                output: flag("attention_bias"),
                mlp: flag("mlp_bias"),
            },
        };
        // transformers 5 writes one `rope_parameters` object where earlier versions wrote
        // `rope_theta` and `rope_scaling`.
        let rope_parameters = config.get("rope_parameters").filter(|p| !p.is_null());
        let rope_theta = rope_parameters
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| config.get("rope_theta"))
            .filter(|v| !v.is_null())
            .map(|v| v.as_f64().ok_or("`rope_theta` is not a number"))
            .transpose()?
            .unwrap_or(10_000.0);
        let scaling =
            rope_parameters.or_else(|| config.get("rope_scaling").filter(|s| !s.is_null()));
        let context_length = usize_field(config, "max_position_embeddings")?;
        let cfg = Self {
            windows: windows(config, &family, num_layers)?,
            family,
            vocab_size: usize_field(config, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(config, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling: scaling.map_or(Ok(RopeScaling::None), rope_scaling)?,
            rope_style: RopeStyle::Halves,
            biases,
            qk_norm: config.get("model_type").and_then(Value::as_str) == Some("qwen3"),
            tie_word_embeddings: flag("tie_word_embeddings"),
            context_length,
        };
        cfg.check()
    }

    /// Shapes that would otherwise fail deep inside a forward pass, or divide by zero.
    pub fn check(self) -> Result<Self, String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.context_length),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` must be positive"));
        }
        // Far above any real model, and low enough that products of these never overflow.
        const LARGEST: usize = 1 << 24;
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v > LARGEST) {
            return Err(format!("`{name}` is {v}, more than {LARGEST}"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd; rotary embeddings need pairs",
                self.head_dim
            ));
        }
        Ok(self)
    }

    /// Bytes of keys and values one token holds across all layers, in `dtype_size` bytes each.
    pub fn kv_bytes_per_token(&self, dtype_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size
    }
}

/// Mistral slides one window over every layer; Qwen2 names sliding layers in `layer_types`,
/// or slides from `max_window_layers` on when `use_sliding_window` is set.
fn windows(config: &Value, family: &str, layers: usize) -> Result<Vec<Option<usize>>, String> {
    let window = opt_usize(config, "sliding_window")?;
    let all = |w: Option<usize>| vec![w; layers];
    match family {
        "mistral" => Ok(all(window)),
        "qwen2" | "qwen3" => {
            if let Some(types) = config.get("layer_types").and_then(Value::as_array) {
                if types.len() != layers {
                    return Err(format!(
                        "`layer_types` names {} layers, the model has {layers}",
                        types.len()
                    ));
                }
                return types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(None),
                        Some("sliding_attention") => window
                            .map(Some)
                            .ok_or_else(|| "sliding layers without `sliding_window`".to_string()),
                        other => Err(format!("layer type {other:?} is not supported")),
                    })
                    .collect();
            }
            if config.get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
                return Ok(all(None));
            }
            let first = opt_usize(config, "max_window_layers")?.unwrap_or(0);
            Ok((0..layers)
                .map(|i| if i >= first { window } else { None })
                .collect())
        }
        _ => Ok(all(None)),
    }
}

fn rope_scaling(s: &Value) -> Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |name: &str| {
        s.get(name)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a positive `{name}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear(number("factor")?)),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope scaling `{other}` is not supported (supported: default, linear, llama3)"
        )),
    }
}

fn str_field<'a>(config: &'a Value, name: &str) -> Option<&'a str> {
    config.get(name).and_then(Value::as_str)
}

fn opt_usize(config: &Value, name: &str) -> Result<Option<usize>, String> {
    match config.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("`{name}` is not a non-negative integer: {v}")),
    }
}

fn usize_field(config: &Value, name: &str) -> Result<usize, String> {
    opt_usize(config, name)?.ok_or_else(|| format!("`{name}` is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(extra: Value) -> Value {
        let mut c = json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    #[test]
    fn each_family_reads_what_changes_its_maths() {
        let qwen2 = DecoderConfig::from_hf(&base(json!({"model_type": "qwen2",
            "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1})))
        .unwrap();
        assert_eq!(
            qwen2.biases,
            Biases {
                qkv: true,
                output: false,
                mlp: false
            }
        );
        assert_eq!(qwen2.windows, vec![None, Some(8)]);
        let qwen3 = DecoderConfig::from_hf(&base(json!({"model_type": "qwen3", "head_dim": 8,
            "attention_bias": true})))
        .unwrap();
        assert!(qwen3.qk_norm);
        assert_eq!((qwen3.head_dim, qwen3.biases.output), (8, true));
        let mistral =
            DecoderConfig::from_hf(&base(json!({"model_type": "mistral", "sliding_window": 4})))
                .unwrap();
        assert_eq!(mistral.windows, vec![Some(4), Some(4)]);
        let v5 = DecoderConfig::from_hf(&base(json!({"rope_parameters":
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}})))
        .unwrap();
        assert_eq!(
            (v5.rope_theta, v5.rope_scaling),
            (500000.0, RopeScaling::Linear(2.0))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (extra, named) in [
            (json!({"model_type": "gpt2"}), "gpt2"),
            (json!({"hidden_act": "gelu"}), "gelu"),
            (
                json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "yarn",
            ),
            (
                json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "low_freq_factor",
            ),
            (json!({"num_key_value_heads": 3}), "num_key_value_heads"),
            (json!({"head_dim": 7}), "head_dim"),
            (json!({"num_attention_heads": 0}), "num_attention_heads"),
            (json!({"vocab_size": -1}), "vocab_size"),
            (
                json!({"intermediate_size": 1u64 << 40}),
                "intermediate_size",
            ),
        ] {
            let err = DecoderConfig::from_hf(&base(extra.clone())).unwrap_err();
            assert!(err.contains(named), "{extra}: {err}");
        }
    }
}
