//! In-process timings of kandle's model paths, printed as JSON for scripts/bench, which
//! interleaves runs of this binary with the same work in the peers (sentence-transformers,
//! llama-cpp-python) and reports medians and ratios.
//!
//! embed MODEL_DIR ITERS BATCH...        seconds per batch (tokenize + forward + pool)
//! generate GGUF PROMPTS_JSON TOKENS     TTFT per prompt, decode tok/s, aggregate tok/s at 8
use kandle_server::cli::{DeviceArg, DtypeArg};
use kandle_server::engine::generation::{Event, GenerationEngine, GenerationJob, Limits};
use kandle_server::engine::{BLOCK_TOKENS, EmbeddingModel};
use kandle_server::metrics::Metrics;
use kandle_server::model::{Backend, LoadOptions, load};
use kandle_server::validation::SamplingParams;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn model(path: &str) -> kandle_server::model::LoadedModel {
    load(&LoadOptions {
        path: path.into(),
        task: None,
        dtype: DtypeArg::Auto,
        device: DeviceArg::Cpu,
    })
    .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn embed(args: &[String]) {
    let loaded = model(&args[0]);
    let iters: usize = args[1].parse().unwrap();
    let Backend::Embedder(embedder) = loaded.backend else {
        panic!("not an embedding model")
    };
    let sentences: Vec<String> = (0..64)
        .map(|i| {
            format!("Sentence number {i} talks about kubernetes, gpus and serving models quickly.")
        })
        .collect();
    let mut out = serde_json::Map::new();
    for batch in &args[2..] {
        let n: usize = batch.parse().unwrap();
        let texts = &sentences[..n];
        let run = || {
            let ids: Vec<Vec<u32>> = texts
                .iter()
                .map(|t| {
                    loaded
                        .tokenizer
                        .encode(t.as_str(), true)
                        .unwrap()
                        .get_ids()
                        .to_vec()
                })
                .collect();
            embedder.embed(&ids).unwrap()
        };
        run();
        let times = (0..iters)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .collect();
        out.insert(n.to_string(), json!(median(times)));
    }
    println!("{}", serde_json::Value::Object(out));
}

async fn generate(args: &[String]) {
    let loaded = model(&args[0]);
    let prompts: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let tokens: usize = args[2].parse().unwrap();
    let Backend::Generator(lm) = loaded.backend else {
        panic!("not a generative model")
    };
    // Room for every concurrent sequence: the benchmark measures batching, not preemption.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + tokens;
    let limits = Limits {
        max_running: 64,
        max_step_tokens: 512,
        kv_blocks: 64 * longest.div_ceil(BLOCK_TOKENS),
    };
    let engine = GenerationEngine::start(
        lm,
        Arc::new(loaded.tokenizer),
        Vec::new(),
        limits,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let greedy = SamplingParams::greedy();
    // Returns (time to the first token, time for all of them).
    let run = |prompt: Vec<u32>, max_new_tokens: usize| {
        let job = GenerationJob {
            prompt,
            sampling: greedy.clone(),
            max_new_tokens,
            stop: Vec::new(),
            span: tracing::Span::none(),
        };
        let mut rx = engine.submit(job).unwrap();
        async move {
            let start = Instant::now();
            let mut first = None;
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Text(_) => {
                        first.get_or_insert(start.elapsed().as_secs_f64());
                    }
                    Event::Done {
                        completion_tokens, ..
                    } => {
                        return (
                            first.unwrap_or_default(),
                            start.elapsed().as_secs_f64(),
                            completion_tokens,
                        );
                    }
                    Event::Failed(e) => panic!("{e}"),
                }
            }
            unreachable!()
        }
    };
    run(prompts[0].clone(), 2).await;
    let mut out = serde_json::Map::new();
    for prompt in &prompts {
        let ttft = median(futures_ttft(&run, prompt, 3).await);
        out.insert(format!("ttft_{}", prompt.len()), json!(ttft));
    }
    let (ttft, total, n) = run(prompts[0].clone(), tokens).await;
    out.insert(
        "decode_tokens_per_s_c1".into(),
        json!((n - 1) as f64 / (total - ttft)),
    );
    for concurrency in [8, 32] {
        let start = Instant::now();
        let all =
            futures::future::join_all((0..concurrency).map(|_| run(prompts[0].clone(), tokens)))
                .await;
        let generated: usize = all.iter().map(|r| r.2).sum();
        out.insert(
            format!("aggregate_tokens_per_s_c{concurrency}"),
            json!(generated as f64 / start.elapsed().as_secs_f64()),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}

async fn futures_ttft<F, Fut>(run: &F, prompt: &[u32], times: usize) -> Vec<f64>
where
    F: Fn(Vec<u32>, usize) -> Fut,
    Fut: std::future::Future<Output = (f64, f64, usize)>,
{
    let mut out = Vec::new();
    for _ in 0..times {
        // A one-token generation ends at its first token.
        out.push(run(prompt.to_vec(), 1).await.1);
    }
    out
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("embed") => embed(&args[1..]),
        Some("generate") => generate(&args[1..]).await,
        _ => eprintln!(
            "usage: inprocess embed MODEL ITERS BATCH... | generate GGUF PROMPTS_JSON TOKENS"
        ),
    }
}
