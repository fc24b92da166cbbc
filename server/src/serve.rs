//! `kandle-server serve`: load, warm, bind, serve, and drain on SIGTERM.
use crate::cli::{ServeArgs, TaskArg};
use crate::constrain::LazyLexicon;
use crate::engine::SamplingParams;
use crate::engine::embedding::{BatchLimits, EmbeddingEngine};
use crate::engine::generation::{Event, GenerationEngine, GenerationJob, Limits};
use crate::engine::{BLOCK_TOKENS, EncoderInput, LanguageModel};
use crate::http::{AppState, Edge, Engine, router};
use crate::metrics::{Metrics, ModelLabels};
use crate::model::{self, Backend, LoadOptions, ModelInfo};
use crate::pull::{self, uri::ModelUri};
use crate::tabular::{self, http::TabularState};
use crate::tokenize::PromptTokenizer;
use anyhow::{Context, bail};
use kandle_listen::ConnectionLimits;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let api_keys = match &args.api_key_file {
        Some(path) => read_api_keys(path)?,
        None => Vec::new(),
    };
    let model_path = resolve_model(&args).await?;
    let tabular_file = {
        let path = model_path.clone();
        tokio::task::spawn_blocking(move || tabular::find(&path)).await??
    };
    match (tabular_file, args.task) {
        (Some(file), None | Some(TaskArg::Tabular)) => {
            return serve_tabular(args, file, metrics, api_keys, started).await;
        }
        (Some(file), Some(task)) => bail!(
            "{} is a tabular model; it cannot serve the {task:?} task",
            file.display()
        ),
        (None, Some(TaskArg::Tabular)) => bail!(
            "{} holds no tabular model (an XGBoost `.json`/`.ubj` or a LightGBM `.txt` file)",
            model_path.display()
        ),
        (None, _) => {}
    }
    let opts = LoadOptions {
        path: model_path.clone(),
        task: args.task,
        dtype: args.dtype,
        device: args.device,
        kernels: args.kernels,
    };
    tracing::info!(model = %model_path.display(), "loading model");
    let loaded = tokio::task::spawn_blocking(move || model::load(&opts))
        .await?
        .with_context(|| format!("loading {}", model_path.display()))?;
    let mut info = loaded.info.clone();
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&args.model));
    let generation = match &loaded.backend {
        Backend::Generator(lm) => {
            let wanted = crate::memory::kv_cache_bytes(args.kv_cache_memory, lm.device())?;
            Some(generation_limits(
                &args,
                &mut info,
                wanted,
                lm.kv_bytes_per_block(),
            ))
        }
        Backend::Embedder(_) => None,
    };
    let max_input_tokens = match args.max_input_tokens {
        Some(n) if n > info.context_length => {
            bail!(
                "--max-input-tokens {n} exceeds the model's context of {} tokens",
                info.context_length
            )
        }
        Some(n) => n,
        None => info.context_length,
    };
    let tokenizer = Arc::new(loaded.tokenizer);
    let lexicon = LazyLexicon::new(match &loaded.backend {
        Backend::Generator(_) => Some((
            tokenizer.clone(),
            info.vocab_size,
            info.eos_token_ids.clone(),
        )),
        Backend::Embedder(_) => None,
    });
    let engine = match loaded.backend {
        Backend::Generator(lm) => Engine::Generation(
            GenerationEngine::start(
                lm,
                tokenizer.clone(),
                info.eos_token_ids.clone(),
                generation.expect("limits for a generator"),
                metrics.clone(),
            )
            .context("allocating the KV cache")?,
        ),
        Backend::Embedder(embedder) => Engine::Embedding(EmbeddingEngine::start(
            embedder,
            BatchLimits {
                max_batch_size: args.max_batch_size.max(1),
                max_batch_tokens: args.max_batch_tokens.max(1),
            },
            metrics.clone(),
        )),
    };
    warm_up(&engine).await.context("warming up the model")?;
    let load_seconds = started.elapsed().as_secs_f64();
    metrics.model_loaded(
        ModelLabels {
            model: model_name.clone(),
            task: info.task.as_str().into(),
            dtype: info.dtype.clone(),
            device: info.device.clone(),
        },
        load_seconds,
    );
    tracing::info!(
        model = %model_name, task = info.task.as_str(), dtype = %info.dtype, device = %info.device,
        context_length = info.context_length, load_seconds,
        cpu_kernels = %args.kernels.cpu_name(), "model ready"
    );

    let edge = Arc::new(Edge::new(&args, metrics, api_keys));
    let state = Arc::new(AppState {
        model_name,
        created: crate::http::unix_now(),
        info,
        prompts: Arc::new(PromptTokenizer::new(
            tokenizer.clone(),
            max_input_tokens,
            args.special_tokens_in_content,
        )),
        tokenizer,
        chat_template: loaded.chat_template.map(Arc::new),
        lexicon,
        engine,
        edge: edge.clone(),
        max_input_tokens,
    });
    let drained = drain_on_signal(edge, Duration::from_secs(args.shutdown_grace_seconds));
    tokio::spawn({
        let state = state.clone();
        async move { state.lexicon.get().await }
    });
    listen(&args, router(state), drained).await
}

/// Loads a tabular model and serves it over the Open Inference Protocol.
async fn serve_tabular(
    args: ServeArgs,
    file: PathBuf,
    metrics: Arc<Metrics>,
    api_keys: Vec<String>,
    started: Instant,
) -> anyhow::Result<()> {
    tracing::info!(model = %file.display(), "loading tabular model");
    let (load, library) = (file.clone(), args.onnxruntime.clone());
    let model = tokio::task::spawn_blocking(move || tabular::load(&load, library.as_deref()))
        .await?
        .with_context(|| format!("loading {}", file.display()))?;
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&args.model));
    let load_seconds = started.elapsed().as_secs_f64();
    metrics.model_loaded(
        ModelLabels {
            model: model_name.clone(),
            task: "tabular".into(),
            // XGBoost and ONNX models compute in f32, LightGBM in f64.
            dtype: if model.schema.format == "lightgbm" {
                "f64"
            } else {
                "f32"
            }
            .into(),
            device: "cpu".into(),
        },
        load_seconds,
    );
    tracing::info!(
        model = %model_name, format = model.schema.format, features = model.schema.features.len(),
        outputs = model.schema.kind.outputs(), load_seconds, "model ready"
    );
    let edge = Arc::new(Edge::new(&args, metrics, api_keys));
    let state = Arc::new(TabularState {
        model_name,
        model,
        edge: edge.clone(),
        max_rows: args.max_rows as usize,
    });
    let drained = drain_on_signal(edge, Duration::from_secs(args.shutdown_grace_seconds));
    listen(&args, tabular::http::router(state), drained).await
}

/// Binds, serves `router` until `drained` completes, and stops.
async fn listen(
    args: &ServeArgs,
    router: axum::Router,
    drained: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    let limits = ConnectionLimits {
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_seconds.max(1)),
    };
    kandle_listen::serve(listener, router, limits, drained).await;
    tracing::info!("stopped");
    Ok(())
}

/// Sizes the KV-cache pool to `wanted` bytes. A pool too small for one sequence of the
/// model's whole context shortens the context served, as vLLM does, rather than let a
/// sequence fail halfway; more than every running sequence's whole context would be unused.
fn generation_limits(
    args: &ServeArgs,
    info: &mut ModelInfo,
    wanted: u64,
    block_bytes: usize,
) -> Limits {
    let per_context = info.context_length.div_ceil(BLOCK_TOKENS);
    let max_running = args.max_batch_size.max(1);
    let blocks = usize::try_from(wanted / block_bytes.max(1) as u64)
        .unwrap_or(usize::MAX)
        .clamp(1, per_context.saturating_mul(max_running));
    if blocks < per_context {
        let served = blocks * BLOCK_TOKENS;
        tracing::warn!(
            model_context = info.context_length,
            served_context = served,
            kv_cache_bytes = blocks * block_bytes,
            "the KV cache holds less than one whole context; serving a shorter one (raise --kv-cache-memory for more)"
        );
        info.context_length = served;
    }
    Limits {
        max_running,
        max_step_tokens: args.max_step_tokens as usize,
        kv_blocks: blocks,
        prefix_caching: args.prefix_caching,
    }
}

/// One real pass through the model so the first client does not pay for lazy setup.
async fn warm_up(engine: &Engine) -> anyhow::Result<()> {
    match engine {
        Engine::Embedding(e) => {
            e.embed(EncoderInput::single(vec![0, 1])).await?;
        }
        Engine::Generation(g) => {
            let mut events = g.submit(GenerationJob {
                prompt: vec![0, 1],
                sampling: SamplingParams::greedy(),
                max_new_tokens: 1,
                stop: Vec::new(),
                constraint: None,
                logprobs: None,
                prompt_logprobs: false,
                span: tracing::Span::none(),
            })?;
            while let Some(event) = events.recv().await {
                match event {
                    Event::Failed(e) => return Err(e.into()),
                    Event::Done { .. } => break,
                    Event::Text(..) | Event::Prompt(..) => {}
                }
            }
        }
    }
    Ok(())
}

/// Resolves once a SIGTERM (or Ctrl-C) arrived and the requests in flight finished or the
/// grace period ran out. Meanwhile `/readyz` and the API answer 503, so the Service stops
/// routing here while streams already running complete.
async fn drain_on_signal(edge: Arc<Edge>, grace: Duration) {
    shutdown_signal().await;
    edge.draining.store(true, Ordering::Release);
    tracing::info!(
        grace_seconds = grace.as_secs(),
        in_flight = edge.admission.holding(),
        "draining: refusing new requests"
    );
    let deadline = Instant::now() + grace;
    while edge.admission.holding() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!("grace period over with requests still in flight; stopping");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("drained");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn read_api_keys(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading API key file {}", path.display()))?;
    // Comments and blank lines are for people; a key is never either.
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        bail!("API key file {} holds no key", path.display());
    }
    Ok(keys)
}

/// A local model as it is; a remote one pulled into the cache first.
async fn resolve_model(args: &ServeArgs) -> anyhow::Result<PathBuf> {
    match ModelUri::parse(&args.model)? {
        ModelUri::Local(path) => Ok(path),
        _ => {
            let cache = args
                .cache_dir
                .clone()
                .unwrap_or_else(pull::default_cache_dir);
            let dest = pull::cache_folder(&cache, &args.model);
            pull::pull(&args.model, &dest, &args.fetch.options()).await?;
            Ok(dest)
        }
    }
}

/// The id users know the model by: the hub repository, or the folder's or file's name.
fn default_name(model: &str) -> String {
    match ModelUri::parse(model) {
        Ok(ModelUri::Hub { repo, .. }) => return repo,
        Ok(ModelUri::Oci(target)) => return target.repository,
        _ => {}
    }
    let path = Path::new(model.strip_prefix("file://").unwrap_or(model));
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").map(String::from).unwrap_or(name)
}
