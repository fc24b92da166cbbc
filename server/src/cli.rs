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
    /// Fetch a model into a folder that `serve --model DIR` loads.
    Pull(PullArgs),
    /// Publish a model (any source `pull` takes) to an OCI registry as an artifact, one
    /// layer per file, so clusters pull it from the registry they already run.
    Push(PushArgs),
}

/// Longest duration any `--*-seconds` flag takes: a day. Larger values are typos, and
/// the largest would overflow the deadlines computed from them.
const MAX_SECONDS: u64 = 86_400;

/// The model kandle serves when none is named: small, real, and public on the hub.
pub const DEFAULT_MODEL: &str = "hf://HuggingFaceTB/SmolLM2-135M-Instruct";

#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, oci://REGISTRY/REPOSITORY[:TAG],
    /// https://… (one file), file://PATH or a path.
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: String,
    /// Folder to fill; it is ready once `.kandle-pull.json` appears in it.
    #[arg(long, env = "KANDLE_DEST")]
    pub dest: PathBuf,
    #[command(flatten)]
    pub fetch: FetchArgs,
    /// Where to write a one-line JSON report of the outcome (Kubernetes reads the pull
    /// container's `/dev/termination-log` into its status, and the operator from there).
    #[arg(long, env = "KANDLE_PULL_REPORT_FILE")]
    pub report_file: Option<PathBuf>,
    #[arg(long, env = "KANDLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// The model: any source `pull` takes (hf://, s3://, oci://, https://, a folder).
    pub source: String,
    /// Where to publish it: oci://REGISTRY/REPOSITORY:TAG.
    pub target: String,
    /// Where the source is pulled first (default: $XDG_CACHE_HOME/kandle or ~/.cache/kandle).
    #[arg(long, env = "KANDLE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub fetch: FetchArgs,
    #[arg(long, env = "KANDLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How models are fetched, shared by `pull` and `serve --model URI`.
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// Only files matching these globs (replaces kandle's choice of files).
    #[arg(long, env = "KANDLE_INCLUDE", value_delimiter = ',')]
    pub include: Vec<String>,
    /// Leave out files matching these globs.
    #[arg(long, env = "KANDLE_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Expected sha256 of a single-file https:// download.
    #[arg(long, env = "KANDLE_SHA256")]
    pub sha256: Option<String>,
    /// Files downloaded at once, and connections one file may use.
    #[arg(long, env = "KANDLE_PULL_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// How long transient failures (network, 429, 5xx) are retried before giving up.
    #[arg(long, env = "KANDLE_PULL_RETRY_SECONDS", default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(..=MAX_SECONDS))]
    pub retry_seconds: u64,
    /// Files at least this large may take more connections, up to `--concurrency`: they
    /// start on one and double while that pays (a CDN caps each connection), which it does
    /// not where one connection fills the link.
    #[arg(long, env = "KANDLE_PULL_RANGE_MIN_BYTES", default_value_t = 16 << 20)]
    pub range_min_bytes: u64,
    /// A folder of credential files, one per key (`HF_TOKEN`, `AWS_ACCESS_KEY_ID`, ...), as
    /// a Kubernetes Secret mounted as a volume gives; each file wins over the environment
    /// variable of its name.
    #[arg(long, env = "KANDLE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// The Secret `--credentials-dir` mounts: an empty folder (a Secret mounted `optional`
    /// that does not exist yet) is waited for up to `--credentials-wait-seconds`, then the
    /// pull fails with exit code 5 and a report that names the Secret.
    #[arg(long, env = "KANDLE_CREDENTIALS_SECRET", requires = "credentials_dir")]
    pub credentials_secret: Option<String>,
    #[arg(long, env = "KANDLE_CREDENTIALS_WAIT_SECONDS", default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(..=MAX_SECONDS))]
    pub credentials_wait_seconds: u64,
    /// Reach OCI registries over plain HTTP, not TLS (those on localhost and 127.0.0.0/8
    /// always are, as Docker and containerd reach them).
    #[arg(long, env = "KANDLE_PLAIN_HTTP")]
    pub plain_http: bool,
}

impl FetchArgs {
    pub fn options(&self) -> crate::pull::PullOptions {
        crate::pull::PullOptions {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            sha256: self.sha256.clone(),
            concurrency: self.concurrency,
            retry_budget: std::time::Duration::from_secs(self.retry_seconds),
            range_min_bytes: self.range_min_bytes,
            credentials: crate::pull::credentials::Source {
                dir: self.credentials_dir.clone(),
                secret: self.credentials_secret.clone(),
                wait: std::time::Duration::from_secs(self.credentials_wait_seconds),
            },
            plain_http: self.plain_http,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    Chat,
    Completion,
    Embedding,
    /// A cross-encoder's relevance of documents to a query.
    Rerank,
    /// A sequence classifier's labels.
    Classify,
    /// An XGBoost or LightGBM model, over the Open Inference Protocol (`/v2`).
    Tabular,
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
    /// CUDA when this build has it and a GPU answers, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelsArg {
    /// kandle's own kernels on the CPU in f32, with the best instruction set the CPU has;
    /// candle's operations elsewhere.
    Auto,
    /// candle's device-independent operations everywhere: on the CPU, the code a GPU runs.
    Portable,
    /// kandle's kernels with AVX2, FMA and F16C at most (no AVX-512), to compare.
    Avx2,
    /// kandle's kernels with AVX-512 VNNI on 256-bit vectors at most, to compare.
    Vnni,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// An amount of memory: absolute, or a share of what the container may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Memory {
    /// A quarter of the container's memory limit on the CPU; on a GPU, 80% of what is free
    /// once the weights are loaded (the rest for activations and cuBLAS workspaces).
    Auto,
    Bytes(u64),
    /// Of the container's memory limit on the CPU, of the free GPU memory on a GPU.
    Fraction(f64),
}

fn parse_memory(s: &str) -> Result<Memory, String> {
    let s = s.trim();
    if s == "auto" {
        return Ok(Memory::Auto);
    }
    if s.contains('.') {
        return match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(Memory::Fraction(f)),
            _ => Err(format!("`{s}`: a fraction must be in (0, 1]")),
        };
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let scale: u64 = match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown unit `{other}` (use KiB, MiB, GiB or TiB)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .map(Memory::Bytes)
        .ok_or_else(|| format!("`{s}` is not a positive amount of memory"))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model to serve: a folder (safetensors or GGUF), a `.gguf` file, or a URI to pull
    /// first (hf://ORG/NAME[@REVISION], https://…, file://…).
    #[arg(long, env = "KANDLE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Where pulled models are kept (default: $XDG_CACHE_HOME/kandle or ~/.cache/kandle).
    #[arg(long, env = "KANDLE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub fetch: FetchArgs,
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
    /// Where the model runs (`auto`: the first GPU when this is a CUDA build and one
    /// answers, else the CPU).
    #[arg(long, env = "KANDLE_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// `portable` runs the CPU on candle's device-independent operations, the code a GPU
    /// runs, instead of kandle's own kernels: slower; for checking GPU code paths on a
    /// machine without one, or ruling kandle's kernels out when an output looks wrong.
    /// `avx2` and `vnni` keep kandle's kernels to that instruction set (or the best below
    /// it the CPU has).
    #[arg(long, env = "KANDLE_KERNELS", value_enum, default_value = "auto")]
    pub kernels: KernelsArg,
    /// Requests executed at once; more wait in the queue.
    #[arg(long, env = "KANDLE_MAX_CONCURRENT_REQUESTS", default_value_t = 64)]
    pub max_concurrent_requests: usize,
    /// Requests allowed to wait; past concurrent + queue a request gets 429.
    #[arg(long, env = "KANDLE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Most sequences in one embedding batch, or generated side by side.
    #[arg(long, env = "KANDLE_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Tokens one generation step feeds the model: a token for each sequence being
    /// generated plus chunks of prompts being read. Larger reads prompts faster and makes
    /// the other sequences' next tokens wait longer.
    #[arg(long, env = "KANDLE_MAX_STEP_TOKENS", default_value_t = 512,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_step_tokens: u64,
    /// Memory for the KV cache of generative models: bytes (`2GiB`, `512MiB`, `1000000`),
    /// a fraction (`0.25`) of the container's memory limit on the CPU or of the GPU memory
    /// free once the weights are loaded, or `auto` (0.25 of the limit on the CPU, 0.8 of the
    /// free GPU memory). A pool smaller than one sequence of the model's whole context
    /// shortens the context served.
    #[arg(long, env = "KANDLE_KV_CACHE_MEMORY", default_value = "auto", value_parser = parse_memory)]
    pub kv_cache_memory: Memory,
    /// Reuse the KV cache of a prompt prefix that earlier sequences computed (a shared system
    /// prompt, the earlier turns of a chat): `true` or `false`.
    #[arg(long, env = "KANDLE_PREFIX_CACHING", default_value_t = true,
        action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Token budget of one embedding batch (padded tokens).
    #[arg(long, env = "KANDLE_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// ONNX Runtime's shared library, for ONNX tabular models (a build with the `onnx`
    /// feature): for example the `libonnxruntime.so.*` in the onnxruntime wheel's
    /// `onnxruntime/capi` folder. Default: `libonnxruntime.so` on the library path.
    #[arg(long, env = "KANDLE_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
    /// Most rows one tabular inference request may carry.
    #[arg(long, env = "KANDLE_MAX_ROWS", default_value_t = 100_000,
        value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub max_rows: u64,
    /// Longest prompt accepted, in tokens (default and ceiling: the model's context).
    #[arg(long, env = "KANDLE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long, env = "KANDLE_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Let special tokens typed into chat messages act as control tokens. Off: they are
    /// read as plain text, so a user cannot close their turn or forge a system message.
    #[arg(long, env = "KANDLE_SPECIAL_TOKENS_IN_CONTENT")]
    pub special_tokens_in_content: bool,
    /// Connections open at once; more wait in the kernel's backlog until one closes.
    #[arg(long, env = "KANDLE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from when it
    /// opens or finished its last request: closes half-sent, silent and idle keep-alive
    /// connections.
    #[arg(long, env = "KANDLE_HEADER_TIMEOUT_SECONDS", default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(..=MAX_SECONDS))]
    pub header_timeout_seconds: u64,
    /// Seconds a request's whole body may take to arrive; slower is a 408.
    #[arg(long, env = "KANDLE_BODY_TIMEOUT_SECONDS", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(..=MAX_SECONDS))]
    pub body_timeout_seconds: u64,
    /// File holding the API key(s), one per line (blank lines and lines starting with `#`
    /// are ignored); clients then send `Authorization: Bearer KEY`.
    #[arg(long, env = "KANDLE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// After SIGTERM, how long requests in flight may take to finish.
    #[arg(long, env = "KANDLE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(..=MAX_SECONDS))]
    pub shutdown_grace_seconds: u64,
    #[arg(long, env = "KANDLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_bytes_with_a_binary_unit_or_a_fraction() {
        assert_eq!(parse_memory("512MiB"), Ok(Memory::Bytes(512 << 20)));
        assert_eq!(parse_memory("4096"), Ok(Memory::Bytes(4096)));
        assert_eq!(parse_memory("0.25"), Ok(Memory::Fraction(0.25)));
        assert_eq!(parse_memory("auto"), Ok(Memory::Auto));
        for bad in [
            "0",
            "1.5",
            "0.0",
            "2GB",
            "-1",
            "99999999999999TiB",
            "",
            "NaN.",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_beyond_a_day_are_refused_at_the_command_line() {
        for flag in [
            "--retry-seconds",
            "--credentials-wait-seconds",
            "--header-timeout-seconds",
            "--body-timeout-seconds",
            "--shutdown-grace-seconds",
        ] {
            let parse = |v: &str| Cli::try_parse_from(["kandle-server", "serve", flag, v]);
            assert!(parse("18446744073709551615").is_err(), "{flag}");
            assert!(parse("86401").is_err(), "{flag}");
            assert!(parse("86400").is_ok(), "{flag}");
        }
    }
}
