//! In-process timings of kandle's model paths, printed as JSON for scripts/bench, which
//! interleaves runs of this binary with the same work in the peers (sentence-transformers,
//! llama-cpp-python) and reports medians and ratios.
//!
//! embed MODEL_DIR ITERS BATCH...        seconds per batch (tokenize + forward + pool)
//! generate GGUF PROMPTS_JSON TOKENS     TTFT per prompt, decode tok/s, aggregate tok/s (all
//!                                       tokens over the whole time, prefill included) at 1,
//!                                       8 and 32 concurrent requests
//!                                       (KANDLE_BENCH_CONCURRENCY: other counts, such as `8`
//!                                       alone to profile it)
//! kernels                               memory read bandwidth, the Q4_1 matmul's weight
//!                                       bytes/s and multiply-adds/s at 1 to 256 rows, and a
//!                                       batched decode step's attention
//! tabular MODEL_DIR ROWS_JSON ITERS BATCH...
//!                                       seconds per predict of BATCH rows (tiled from the
//!                                       JSON rows, null for missing)
//!
//! `KANDLE_KERNELS` picks the kernels as for the server (`portable`, `avx2`, `vnni`).
use kandle_server::cli::{DeviceArg, DtypeArg, KernelsArg};
use kandle_server::engine::SamplingParams;
use kandle_server::engine::generation::{Event, GenerationEngine, GenerationJob, Limits};
use kandle_server::engine::{BLOCK_TOKENS, EmbeddingModel, EncoderInput};
use kandle_server::metrics::Metrics;
use kandle_server::model::{Backend, LoadOptions, load};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn model(path: &str) -> kandle_server::model::LoadedModel {
    load(&LoadOptions {
        path: path.into(),
        task: None,
        dtype: DtypeArg::Auto,
        device: DeviceArg::Cpu,
        kernels: kernels_arg(),
    })
    .unwrap()
}

/// `KANDLE_KERNELS`, as the server reads it: `portable` for candle's operations, `avx2` or
/// `vnni` to keep kandle's kernels to that instruction set, to compare them.
fn kernels_arg() -> KernelsArg {
    use clap::ValueEnum;
    std::env::var("KANDLE_KERNELS").map_or(KernelsArg::Auto, |v| {
        KernelsArg::from_str(&v, true).expect("KANDLE_KERNELS: auto, portable, avx2 or vnni")
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tabular(args: &[String]) {
    use kandle_server::tabular;
    let file = tabular::find(args[0].as_ref())
        .unwrap()
        .expect("a tabular model");
    let model = tabular::load(&file, None).unwrap();
    let rows: Vec<Vec<Option<f64>>> =
        serde_json::from_str(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let iters: usize = args[2].parse().unwrap();
    let mut out = serde_json::Map::new();
    for batch in &args[3..] {
        let n: usize = batch.parse().unwrap();
        let data: Vec<f64> = rows
            .iter()
            .cycle()
            .take(n)
            .flatten()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect();
        std::hint::black_box(model.predict(&data).unwrap());
        let times = (0..iters)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(model.predict(std::hint::black_box(&data)).unwrap());
                t.elapsed().as_secs_f64()
            })
            .collect();
        out.insert(n.to_string(), json!(median(times)));
    }
    println!("{}", serde_json::Value::Object(out));
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
            let ids: Vec<EncoderInput> = texts
                .iter()
                .map(|t| {
                    let ids = loaded.tokenizer.encode(t.as_str(), true).unwrap();
                    EncoderInput::single(ids.get_ids().to_vec())
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
        // Off: the same prompts run again and again here, and llama.cpp is timed without it.
        prefix_caching: false,
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
            constraint: None,
            logprobs: None,
            prompt_logprobs: false,
            span: tracing::Span::none(),
        };
        let mut rx = engine.submit(job).unwrap();
        async move {
            let start = Instant::now();
            let mut first = None;
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Text(..) => {
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
                    Event::Prompt(..) => unreachable!("not asked for"),
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
    let levels: Vec<usize> = std::env::var("KANDLE_BENCH_CONCURRENCY")
        .map(|v| v.split(',').map(|c| c.parse().unwrap()).collect())
        .unwrap_or(vec![1, 8, 32]);
    for concurrency in levels {
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

/// Best of `times` runs of `f`, in seconds.
fn best(times: usize, mut f: impl FnMut()) -> f64 {
    (0..times)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn kernels() {
    use kandle_server::model::decoder::quant::{BLOCK, Format, Matrix};
    kernels_arg().limit_instruction_set().unwrap();
    let pool = candle_core::utils::barrier_pool();
    // Bigger than any last-level cache, as a model's weights are.
    let words = vec![1u64; 32 << 20];
    let sum = std::sync::atomic::AtomicU64::new(0);
    let read = best(5, || {
        pool.execute_chunked(words.len() / 4096, |range| {
            let s: u64 = words[range.start * 4096..range.end * 4096].iter().sum();
            sum.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        })
    });
    let mut out = serde_json::Map::new();
    out.insert(
        "read_gb_per_s".into(),
        json!(words.len() as f64 * 8.0 / read / 1e9),
    );
    // SmolLM2-135M's Q4_1 layers hold 66 MB; a matrix of that size, in fixed random bytes.
    let (rows, cols) = (102_400, 1024);
    let mut state = 1u64;
    let bytes: Vec<u8> = (0..rows * cols / BLOCK * Format::Q4_1.block_bytes())
        .enumerate()
        .map(|(i, _)| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            // Keep the f16 scale and minimum small and finite.
            if i % Format::Q4_1.block_bytes() < 4 {
                0x20
            } else {
                (state >> 56) as u8
            }
        })
        .collect();
    let weight_bytes = bytes.len() as f64;
    let w = Matrix::new(Format::Q4_1, &bytes, rows, cols).unwrap();
    for m in [1usize, 8, 32, 256] {
        let x = candle_core::Tensor::ones(
            (m, cols),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let t = best(if m > 32 { 2 } else { 5 }, || {
            w.forward(&x).unwrap();
        });
        out.insert(
            format!("q4_1_rows{m}_weight_gb_per_s"),
            json!(weight_bytes / t / 1e9),
        );
        out.insert(
            format!("q4_1_rows{m}_gmac_per_s"),
            json!((m * rows * cols) as f64 / t / 1e9),
        );
    }
    out.insert(
        "attention_decode_ms".into(),
        json!(attention_decode() * 1e3),
    );
    println!("{}", serde_json::Value::Object(out));
}

/// Seconds for one batched decode step's attention in SmolLM2-135M's shape (30 layers, 9
/// query heads over 3 KV heads of 64, f16 cache): 8 sequences of 127 cached tokens (written
/// by a prefill first: a pool never written reads the kernel's one zero page from cache), one
/// new row each.
fn attention_decode() -> f64 {
    use candle_core::{DType, Device, Tensor};
    use kandle_server::engine::Chunk;
    use kandle_server::model::decoder::attention::{KvCache, Layout, attend};
    let (layers, heads, kv_heads, dim, seqs, cached) = (30, 9, 3, 64, 8, 127usize);
    let blocks_each = (cached + 1).div_ceil(BLOCK_TOKENS);
    let dev = Device::Cpu;
    let cache = KvCache::new(layers, seqs * blocks_each, kv_heads, dim, DType::F16, &dev).unwrap();
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (0..blocks_each as u32)
                .map(|b| b * seqs as u32 + s as u32)
                .collect()
        })
        .collect();
    let tokens = vec![1u32; cached];
    // Every sequence's `len` tokens from `start`, and random q, k and v for their rows.
    let step = |len: usize, start: usize| {
        let chunks: Vec<Chunk<'_>> = tables
            .iter()
            .map(|blocks| Chunk {
                tokens: &tokens[..len],
                start,
                blocks,
                every_row: false,
            })
            .collect();
        let layout = Layout::new(&chunks, &cache, kv_heads, dim, &dev, KernelsArg::Auto).unwrap();
        let rand = |h| Tensor::randn(0f32, 1.0, (seqs * len, h, dim), &dev).unwrap();
        (layout, [rand(heads), rand(kv_heads), rand(kv_heads)])
    };
    let run = |(layout, [q, k, v]): &(Layout, [Tensor; 3])| {
        for layer in 0..layers {
            attend(q, k, v, &cache, layer, layout, None, 0.125).unwrap();
        }
    };
    run(&step(cached, 0));
    let decode = step(1, cached);
    best(10, || run(&decode))
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
    // As kandle-server sets its allocator up.
    kandle_server::heap::keep_freed_buffers();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("embed") => embed(&args[1..]),
        Some("generate") => generate(&args[1..]).await,
        Some("kernels") => kernels(),
        Some("tabular") => tabular(&args[1..]),
        _ => eprintln!(
            "usage: inprocess embed MODEL ITERS BATCH... | generate GGUF PROMPTS_JSON TOKENS | kernels | tabular MODEL_DIR ROWS_JSON ITERS BATCH..."
        ),
    }
}
