//! Correctness on real models that PyPI packages ship, against references computed once
//! with the peers (scripts/reference/): sentence-transformers on PyTorch, and llama.cpp.
mod common;

use base64::Engine as _;
use common::{Server, minilm_dir, post, smollm2_gguf};
use kandle_server::cli::{DeviceArg, DtypeArg};
use kandle_server::model::{LoadOptions, load};
use kandle_server::validation::TemplateMessage;
use serde_json::{Value, json};

fn reference(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn minilm_matches_sentence_transformers() {
    let reference = reference("minilm_reference.json");
    let sentences: Vec<&str> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(sentences.len() >= 32);
    let server = Server::start(&minilm_dir(), &["--served-model-name", "minilm"]);

    // One request with every sentence (batched together) and one request per sentence at
    // once (batched across requests) must both match.
    let (status, whole) = post(
        &server,
        "/v1/embeddings",
        json!({"model": "minilm", "input": sentences}),
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    let singles = futures::future::join_all(sentences.iter().map(|s| {
        post(
            &server,
            "/v1/embeddings",
            json!({"model": "minilm", "input": s}),
        )
    }))
    .await;
    for (i, expected) in reference["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let expected = floats(expected);
        let batched = floats(&whole["data"][i]["embedding"]);
        let single = floats(&singles[i].1["data"][0]["embedding"]);
        assert_eq!(batched.len(), 384);
        for (how, got) in [("batched", &batched), ("alone", &single)] {
            let c = cosine(got, &expected);
            assert!(
                c >= 0.9999,
                "sentence {i} {:?} ({how}): cosine {c}",
                sentences[i]
            );
        }
        let norm: f32 = batched.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "modules.json asks for normalised vectors"
        );
    }
    assert_eq!(whole["data"][1]["index"], 1);
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > sentences.len() as u64);

    let (_, float) = post(
        &server,
        "/v1/embeddings",
        json!({"model": "minilm", "input": sentences[0]}),
    )
    .await;
    let (_, b64) = post(
        &server,
        "/v1/embeddings",
        json!({"model": "minilm", "input": sentences[0], "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats(&float["data"][0]["embedding"]));

    let long = "word ".repeat(400);
    let (status, err) = post(
        &server,
        "/v1/embeddings",
        json!({"model": "minilm", "input": long}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"].as_str().unwrap().contains("256"),
        "{err}"
    );
}

#[test]
fn smollm2_prompt_ids_match_llama_cpp() {
    let model = load(&LoadOptions {
        path: smollm2_gguf(),
        task: None,
        dtype: DtypeArg::Auto,
        device: DeviceArg::Cpu,
    })
    .unwrap();
    let reference = reference("smollm2_reference.json");
    for case in reference["cases"].as_array().unwrap() {
        let expected: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = if case["kind"] == "chat" {
            let messages: Vec<TemplateMessage> =
                serde_json::from_value::<Vec<Value>>(case["messages"].clone())
                    .unwrap()
                    .into_iter()
                    .map(|m| TemplateMessage {
                        role: m["role"].as_str().unwrap().into(),
                        content: m["content"].as_str().unwrap().into(),
                        name: None,
                    })
                    .collect();
            let rendered = model
                .chat_template
                .as_ref()
                .unwrap()
                .render(&messages)
                .unwrap();
            assert_eq!(
                rendered,
                case["prompt"].as_str().unwrap(),
                "chat template renders as jinja2 does"
            );
            model
                .tokenizer
                .encode(rendered, false)
                .unwrap()
                .get_ids()
                .to_vec()
        } else {
            model
                .tokenizer
                .encode(case["prompt"].as_str().unwrap(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        assert_eq!(ids, expected, "prompt {:?}", case["prompt"]);
    }
}

/// A step where llama.cpp's best logit led the runner-up by less than this is a near-tie:
/// another correct kernel (candle's Q4_1 x Q8_1 dot products accumulate in another order)
/// may pick the runner-up there, and the texts part from then on.
const NEAR_TIE: f64 = 0.25;

#[tokio::test]
async fn smollm2_greedy_output_matches_llama_cpp() {
    let reference = reference("smollm2_reference.json");
    let tokenizer = load(&LoadOptions {
        path: smollm2_gguf(),
        task: None,
        dtype: DtypeArg::Auto,
        device: DeviceArg::Cpu,
    })
    .unwrap()
    .tokenizer;
    let server = Server::start(&smollm2_gguf(), &["--served-model-name", "smollm2"]);
    let max_tokens = reference["max_tokens"].as_u64().unwrap();
    let mut identical = 0;
    for case in reference["cases"].as_array().unwrap() {
        let (path, body) = if case["kind"] == "chat" {
            (
                "/v1/chat/completions",
                json!({"model": "smollm2", "messages": case["messages"], "temperature": 0, "max_tokens": max_tokens}),
            )
        } else {
            (
                "/v1/completions",
                json!({"model": "smollm2", "prompt": case["prompt"], "temperature": 0, "max_tokens": max_tokens}),
            )
        };
        let (status, r) = post(&server, path, body).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["usage"]["prompt_tokens"],
            case["prompt_ids"].as_array().unwrap().len()
        );
        let choice = &r["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["message"]["content"].as_str())
            .unwrap();
        if text == case["greedy_text"].as_str().unwrap() {
            identical += 1;
            continue;
        }
        // Find the reference token where the texts part, and require it to be a near-tie.
        let ids: Vec<u32> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let step = (1..=ids.len())
            .find(|&k| !text.starts_with(&tokenizer.decode(&ids[..k], true).unwrap()))
            .expect("texts differ within the reference's tokens")
            - 1;
        let margin = case["greedy_margins"][step].as_f64().unwrap();
        eprintln!(
            "{:?}: parted at token {step} where llama.cpp led by {margin}",
            case["prompt"]
        );
        assert!(
            margin < NEAR_TIE,
            "prompt {:?}: kandle parts from llama.cpp at token {step}, where llama.cpp's lead was {margin}\n kandle: {text:?}\n llama.cpp: {:?}",
            case["prompt"],
            case["greedy_text"]
        );
    }
    let cases = reference["cases"].as_array().unwrap().len();
    eprintln!("{identical} of {cases} greedy continuations identical to llama.cpp's");
}
