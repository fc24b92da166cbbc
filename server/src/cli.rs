//! Command line: every flag is also an environment variable, so pods can set either.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kandle-server",
    version,
    about = "OpenAI-compatible inference server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a model and serve it over the OpenAI HTTP API.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    Chat,
    Completion,
    Embedding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model to serve: a folder (safetensors or GGUF) or a `.gguf` file.
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: PathBuf,
    /// Model id clients send and `/v1/models` lists (default: the model folder's name).
    #[arg(long, env = "KANDLE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "KANDLE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    #[arg(long, env = "KANDLE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// What the model serves (default: read from config.json or GGUF metadata).
    #[arg(long, env = "KANDLE_TASK", value_enum)]
    pub task: Option<TaskArg>,
    /// Weight precision for safetensors models (`auto`: f32 on CPU, bf16 on CUDA).
    #[arg(long, env = "KANDLE_DTYPE", value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    #[arg(long, env = "KANDLE_DEVICE", value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Requests executed at once; more wait in the queue.
    #[arg(long, env = "KANDLE_MAX_CONCURRENT_REQUESTS", default_value_t = 64)]
    pub max_concurrent_requests: usize,
    /// Requests allowed to wait; past concurrent + queue a request gets 429.
    #[arg(long, env = "KANDLE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Most sequences in one embedding batch.
    #[arg(long, env = "KANDLE_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Token budget of one embedding batch (padded tokens).
    #[arg(long, env = "KANDLE_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Longest prompt accepted, in tokens (default and ceiling: the model's context).
    #[arg(long, env = "KANDLE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long, env = "KANDLE_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// File holding the API key(s), one per line; clients then send `Authorization: Bearer KEY`.
    #[arg(long, env = "KANDLE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// After SIGTERM, how long requests in flight may take to finish.
    #[arg(long, env = "KANDLE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    #[arg(long, env = "KANDLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
