//! kandle's decoder against Hugging Face transformers, one tiny random checkpoint per family
//! (written, with transformers' own logits and greedy tokens, by
//! scripts/reference/tiny_decoders.py): Llama with Llama 3 rope scaling, Mistral with a
//! sliding window shorter than the prompts, Qwen2 with q/k/v biases and tied embeddings,
//! Qwen3 with per-head q/k norms. In f32 every logit must be within 1e-4 of transformers' at
//! every step, and greedy decoding must give transformers' tokens: alone, among other
//! sequences of different lengths, and when a small KV cache forces preemption.
use kandle_server::cli::{DeviceArg, DtypeArg, KernelsArg};
use kandle_server::engine::SamplingParams;
use kandle_server::engine::generation::{
    Event, GenerationEngine, GenerationJob, Limits, TokenLogprob,
};
use kandle_server::metrics::Metrics;
use kandle_server::model::{Backend, LoadOptions, LoadedModel, load};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

const FAMILIES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];
const TOLERANCE: f32 = 1e-4;

fn dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny")
        .join(family)
}

/// kandle's CPU kernels, and candle's portable operations: the code a GPU runs.
const KERNELS: [KernelsArg; 2] = [KernelsArg::Auto, KernelsArg::Portable];

fn model(family: &str, kernels: KernelsArg) -> LoadedModel {
    load(&LoadOptions {
        path: dir(family),
        task: None,
        dtype: DtypeArg::F32,
        device: DeviceArg::Cpu,
        kernels,
    })
    .unwrap_or_else(|e| panic!("{family}: {e}"))
}

struct Case {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn cases(family: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(dir(family).join("reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect(),
        })
        .collect()
}

fn largest_difference(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
}

/// Prompt in one pass, then transformers' greedy tokens one at a time: every step's logits
/// match, and kandle's own argmax is transformers' token, on either kernels.
#[test]
fn logits_match_transformers_at_every_step() {
    for (family, kernels) in FAMILIES.iter().flat_map(|f| KERNELS.map(|k| (*f, k))) {
        let loaded = model(family, kernels);
        let cases = cases(family);
        let family = format!("{family} ({kernels:?})");
        let Backend::Generator(lm) = &loaded.backend else {
            panic!("{family} is a generator")
        };
        let mut worst = 0f32;
        for (n, case) in cases.iter().enumerate() {
            let mut seq = lm.sequence(case.prompt.len() + case.greedy.len()).unwrap();
            for (step, want) in case.logits.iter().enumerate() {
                let got: Vec<f32> = if step == 0 {
                    seq.forward(&case.prompt, 0)
                } else {
                    seq.forward(&case.greedy[step - 1..step], case.prompt.len() + step - 1)
                }
                .unwrap()
                .to_vec1()
                .unwrap();
                let diff = largest_difference(&got, want);
                worst = worst.max(diff);
                assert!(
                    diff <= TOLERANCE,
                    "{family} case {n} step {step}: a logit is {diff} off"
                );
                assert_eq!(
                    argmax(&got),
                    case.greedy[step],
                    "{family} case {n} step {step}"
                );
            }
        }
        eprintln!("{family}: largest logit difference {worst:e}");
    }
}

/// The whole sequence read as one prompt gives the same last logits as reading it token by
/// token: the prefill path (many rows, causal mask, window) agrees with the decode path.
#[test]
fn one_long_chunk_equals_many_steps() {
    for (family, kernels) in FAMILIES.iter().flat_map(|f| KERNELS.map(|k| (*f, k))) {
        let loaded = model(family, kernels);
        let Backend::Generator(lm) = &loaded.backend else {
            panic!()
        };
        for case in cases(family) {
            let steps = case.greedy.len();
            let tokens: Vec<u32> = case
                .prompt
                .iter()
                .chain(&case.greedy[..steps - 1])
                .copied()
                .collect();
            let got: Vec<f32> = lm
                .sequence(tokens.len())
                .unwrap()
                .forward(&tokens, 0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let diff = largest_difference(&got, &case.logits[steps - 1]);
            assert!(diff <= TOLERANCE, "{family} ({kernels:?}): {diff}");
        }
    }
}

async fn generate(engine: &GenerationEngine, prompt: Vec<u32>, max_new_tokens: usize) -> String {
    generate_with_logprobs(engine, prompt, max_new_tokens, None)
        .await
        .0
}

async fn generate_with_logprobs(
    engine: &GenerationEngine,
    prompt: Vec<u32>,
    max_new_tokens: usize,
    logprobs: Option<usize>,
) -> (String, Vec<TokenLogprob>) {
    let mut rx = engine
        .submit(GenerationJob {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens,
            stop: Vec::new(),
            constraint: None,
            logprobs,
            prompt_logprobs: false,
            span: tracing::Span::none(),
        })
        .unwrap();
    let (mut text, mut all) = (String::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t, l) => {
                text.push_str(&t);
                all.extend(l);
            }
            Event::Done {
                completion_tokens, ..
            } => {
                assert_eq!(completion_tokens, max_new_tokens);
                return (text, all);
            }
            Event::Failed(e) => panic!("{e}"),
            Event::Prompt(..) => unreachable!("not asked for"),
        }
    }
    panic!("no Done event")
}

/// Greedy text of the reference prompts, each alone, then all of them at once beside six
/// other sequences of different lengths (so each step mixes prefill chunks and decoding
/// rows), with prefix caching off and on, then with a KV cache so small that sequences are
/// preempted and recomputed: always transformers' tokens. A prompt that shares three full
/// blocks with another gives the same text whether those blocks come from the cache or not.
/// On either kernels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_do_not_depend_on_the_batch() {
    for (family, kernels) in FAMILIES.iter().flat_map(|f| KERNELS.map(|k| (*f, k))) {
        let cases = cases(family);
        let loaded = model(family, kernels);
        let tokenizer = loaded.tokenizer.clone();
        let expected: Vec<String> = cases
            .iter()
            .map(|c| tokenizer.decode(&c.greedy, false).unwrap())
            .collect();
        let others: Vec<Vec<u32>> = (0..6)
            .map(|i| (0..4 + 9 * i).map(|t| (t * 7 + i) as u32 % 96).collect())
            .collect();
        let steps = cases[0].greedy.len();
        let long: Vec<u32> = others[5].iter().chain(&cases[0].prompt).copied().collect();
        let mut long_text = None;
        let name = family;
        let family = format!("{family} ({kernels:?})");
        for (kv_blocks, prefix_caching) in [(64, false), (64, true), (4, true)] {
            let loaded = model(name, kernels);
            let Backend::Generator(lm) = loaded.backend else {
                panic!()
            };
            let metrics = Arc::new(Metrics::new());
            let limits = Limits {
                max_running: 16,
                max_step_tokens: 40,
                kv_blocks,
                prefix_caching,
            };
            let engine = GenerationEngine::start(
                lm,
                Arc::new(tokenizer.clone()),
                vec![],
                limits,
                metrics.clone(),
            )
            .unwrap();
            let first = generate(&engine, long.clone(), steps).await;
            let again = generate(&engine, long.clone(), steps).await;
            assert_eq!(
                again, first,
                "{family}: {kv_blocks} blocks, caching {prefix_caching}"
            );
            assert_eq!(&first, long_text.get_or_insert(first.clone()), "{family}");
            assert_eq!(
                metrics.prefix_cache_hits.get() > 0,
                prefix_caching,
                "{family}: the second run reused the first's blocks"
            );
            let alone = generate(&engine, cases[1].prompt.clone(), steps).await;
            assert_eq!(alone.trim(), expected[1], "{family}: alone");
            let all = cases.iter().map(|c| c.prompt.clone()).chain(others.clone());
            let texts = futures::future::join_all(all.map(|p| generate(&engine, p, steps))).await;
            for (n, want) in expected.iter().enumerate() {
                assert_eq!(
                    texts[n].trim(),
                    want,
                    "{family}: case {n} among others, {kv_blocks} blocks, caching {prefix_caching}"
                );
            }
            if kv_blocks == 4 {
                assert!(
                    metrics.preemptions.get() > 0,
                    "{family}: 4 blocks forced no preemption"
                );
            }
        }
    }
}

/// Log-probabilities are the log-softmax of transformers' logits at each step, and the
/// alternatives its most likely tokens, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_follow_transformers() {
    for family in FAMILIES {
        let loaded = model(family, KernelsArg::Auto);
        let tokenizer = Arc::new(loaded.tokenizer);
        let Backend::Generator(lm) = loaded.backend else {
            panic!()
        };
        let limits = Limits {
            max_running: 4,
            max_step_tokens: 64,
            kv_blocks: 32,
            prefix_caching: false,
        };
        let engine =
            GenerationEngine::start(lm, tokenizer, vec![], limits, Arc::new(Metrics::new()))
                .unwrap();
        for case in cases(family) {
            let steps = case.greedy.len();
            let (_, logprobs) = generate_with_logprobs(&engine, case.prompt, steps, Some(3)).await;
            assert_eq!(logprobs.len(), steps, "{family}");
            for (step, (got, want)) in logprobs.iter().zip(&case.logits).enumerate() {
                let max = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let total = max + want.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
                assert_eq!(got.token, case.greedy[step], "{family} step {step}");
                let expected = want[got.token as usize] - total;
                assert!(
                    (got.logprob - expected).abs() < 1e-3,
                    "{family} step {step}: {} vs {expected}",
                    got.logprob
                );
                let mut order: Vec<usize> = (0..want.len()).collect();
                order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                let top: Vec<u32> = got.top.iter().map(|t| t.0).collect();
                let top_want: Vec<u32> = order[..3].iter().map(|&i| i as u32).collect();
                assert_eq!(top, top_want, "{family} step {step}");
                assert_eq!(
                    got.top[0].1, got.logprob,
                    "{family}: greedy picks the most likely"
                );
            }
        }
    }
}
