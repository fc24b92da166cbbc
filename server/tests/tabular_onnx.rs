//! ONNX tabular models (the `onnx` feature): a scikit-learn pipeline exported by skl2onnx
//! gives onnxruntime's own outputs, which are also scikit-learn's to 1e-6, in process and
//! over the Open Inference Protocol.
#![cfg(feature = "onnx")]
mod common;

use common::Server;
use kandle_server::tabular;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tabular/sklearn-onnx")
}

/// The ONNX Runtime library the `onnxruntime` wheel installed into the test virtualenv.
fn onnxruntime() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    std::fs::read_dir(&lib)
        .expect("the test virtualenv (scripts/test makes it)")
        .filter_map(|e| Some(e.ok()?.path().join("site-packages/onnxruntime/capi")))
        .filter_map(|capi| std::fs::read_dir(capi).ok())
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .expect("onnxruntime in .venv (requirements-test.txt)")
}

fn expected(key: &str) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let flat = |key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN))
            })
            .collect()
    };
    (flat("inputs"), flat(key))
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6,
            "{what}: output {i} is {g}, expected {w}"
        );
    }
}

#[test]
fn a_scikit_learn_pipeline_predicts_as_onnxruntime_and_scikit_learn_do() {
    let file = tabular::find(&fixture()).unwrap().unwrap();
    let model = tabular::load(&file, Some(&onnxruntime())).unwrap();
    assert_eq!(model.schema.format, "onnx");
    assert_eq!(model.schema.kind, tabular::Kind::Classifier { classes: 3 });
    let (rows, onnxruntime_says) = expected("probabilities");
    let got = model.predict(&rows).unwrap();
    assert_close(&got, &onnxruntime_says, "onnxruntime");
    assert_close(&got, &expected("sklearn_probabilities").1, "scikit-learn");
    // Many rows: chunks across threads share the one session.
    let many: Vec<f64> = rows.iter().copied().cycle().take(rows.len() * 10).collect();
    let want: Vec<f64> = onnxruntime_says
        .iter()
        .copied()
        .cycle()
        .take(onnxruntime_says.len() * 10)
        .collect();
    assert_close(&model.predict(&many).unwrap(), &want, "batch");
}

#[tokio::test]
async fn served_over_the_open_inference_protocol() {
    let library = onnxruntime();
    let server = Server::start(
        &fixture(),
        &[
            "--served-model-name",
            "pipeline",
            "--onnxruntime",
            library.to_str().unwrap(),
        ],
    );
    let (rows, want) = expected("probabilities");
    let data: Vec<Option<f64>> = rows[..8]
        .iter()
        .map(|v| (!v.is_nan()).then_some(*v))
        .collect();
    let body =
        json!({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": data}]});
    let (status, answer) = common::post(&server, "/v2/models/pipeline/infer", body).await;
    assert_eq!(status, 200, "{answer}");
    let probabilities: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(answer["outputs"][0]["shape"], json!([2, 3]), "{answer}");
    assert_close(&probabilities, &want[..6], "http");
    let meta = common::get_json(&server, "/v2/models/pipeline").await;
    assert_eq!(meta["platform"], "onnx");
}
