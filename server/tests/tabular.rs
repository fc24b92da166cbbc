//! Tabular models: predictions equal the training libraries' own (golden outputs recorded
//! by `data/make_tabular.py`), and the Open Inference Protocol answers as KServe's does,
//! with a clear 400 for each kind of bad input.
mod common;

use common::{Server, client, venv_python};
use kandle_server::tabular;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 5] = [
    "xgboost-binary",
    "xgboost-binary-ubj",
    "xgboost-multiclass",
    "lightgbm-binary",
    "lightgbm-multiclass",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tabular")
        .join(name)
}

struct Expected {
    inputs: Vec<Vec<Option<f64>>>,
    probabilities: Vec<Vec<f64>>,
}

fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let rows = |key: &str| -> Vec<Vec<Value>> { serde_json::from_value(v[key].clone()).unwrap() };
    Expected {
        inputs: rows("inputs")
            .into_iter()
            .map(|r| r.iter().map(Value::as_f64).collect())
            .collect(),
        probabilities: rows("probabilities")
            .into_iter()
            .map(|r| r.iter().map(|p| p.as_f64().unwrap()).collect())
            .collect(),
    }
}

fn load(name: &str) -> tabular::Tabular {
    let file = tabular::find(&fixture(name))
        .unwrap()
        .expect("a model file");
    tabular::load(&file, None).unwrap()
}

fn assert_close(got: &[f64], want: &[Vec<f64>], what: &str) {
    let want: Vec<f64> = want.iter().flatten().copied().collect();
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6,
            "{what}: output {i} is {g}, the library gave {w}"
        );
    }
}

#[test]
fn predictions_equal_the_training_libraries_own() {
    for name in FIXTURES {
        let model = load(name);
        let expected = expected(name);
        let rows: Vec<f64> = expected
            .inputs
            .iter()
            .flatten()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect();
        assert_close(
            &model.predict(&rows).unwrap(),
            &expected.probabilities,
            name,
        );
        // The batch path (chunks across threads) gives the same as one row at a time.
        let many: Vec<f64> = rows.iter().copied().cycle().take(rows.len() * 20).collect();
        let batch = model.predict(&many).unwrap();
        let probabilities: Vec<Vec<f64>> = expected
            .probabilities
            .iter()
            .cycle()
            .take(expected.probabilities.len() * 20)
            .cloned()
            .collect();
        assert_close(&batch, &probabilities, name);
    }
}

#[test]
fn xgboost_json_and_ubjson_load_the_same_model() {
    let (json, ubj) = (load("xgboost-binary"), load("xgboost-binary-ubj"));
    let rows: Vec<f64> = expected("xgboost-binary")
        .inputs
        .iter()
        .flatten()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect();
    assert_eq!(json.predict(&rows).unwrap(), ubj.predict(&rows).unwrap());
    assert_eq!(json.schema.features, ubj.schema.features);
}

#[test]
fn pickles_are_refused_with_a_way_out_and_corrupt_models_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pkl"), b"\x80\x04cos\nsystem\n").unwrap();
    let message = tabular::find(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("pickle") && message.contains("save_model"),
        "{message}"
    );

    let truncated = dir.path().join("model.txt");
    let text = std::fs::read_to_string(fixture("lightgbm-binary").join("model.txt")).unwrap();
    std::fs::write(&truncated, &text[..text.len() / 2]).unwrap();
    std::fs::remove_file(dir.path().join("model.pkl")).unwrap();
    let found = tabular::find(dir.path()).unwrap().unwrap();
    let message = tabular::load(&found, None)
        .err()
        .expect("a truncated model fails")
        .to_string();
    assert!(message.contains("end of trees"), "{message}");

    let ubj = dir.path().join("model.ubj");
    let bytes = std::fs::read(fixture("xgboost-binary-ubj").join("model.ubj")).unwrap();
    std::fs::remove_file(&truncated).unwrap();
    std::fs::write(&ubj, &bytes[..bytes.len() - 10]).unwrap();
    let message = tabular::load(&ubj, None)
        .err()
        .expect("a truncated model fails")
        .to_string();
    assert!(message.contains("truncated"), "{message}");
}

#[test]
fn a_manifest_names_features_labels_and_categories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("lightgbm-binary").join("model.txt"),
        dir.path().join("model.txt"),
    )
    .unwrap();
    let manifest = json!({
        "labels": ["repaid", "defaulted"],
        "categories": {"region": ["north", "south", "east", "west", "centre", "islands"]},
    });
    std::fs::write(dir.path().join(tabular::MANIFEST), manifest.to_string()).unwrap();
    let model = tabular::load(&tabular::find(dir.path()).unwrap().unwrap(), None).unwrap();
    assert_eq!(model.labels.as_deref().unwrap(), ["repaid", "defaulted"]);
    assert_eq!(model.categories[3].len(), 6);

    std::fs::write(
        dir.path().join(tabular::MANIFEST),
        r#"{"labels": ["only one"]}"#,
    )
    .unwrap();
    let message = tabular::load(&dir.path().join("model.txt"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("2 classes"), "{message}");
}

/// POSTs a v2 inference request: the status and the body.
async fn infer(server: &Server, model: &str, body: Value) -> (u16, Value) {
    common::post(server, &format!("/v2/models/{model}/infer"), body).await
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {body}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test]
async fn v2_answers_rows_by_matrix_or_by_feature() {
    let server = Server::start(
        &fixture("lightgbm-binary"),
        &["--served-model-name", "credit"],
    );
    let expected = expected("lightgbm-binary");
    let rows = &expected.inputs[..8];
    let matrix = json!({"id": "r1", "inputs": [{"name": "x", "shape": [8, 5], "datatype": "FP64", "data": rows}]});
    let (status, body) = infer(&server, "credit", matrix).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["model_name"], "credit");
    let probabilities = output(&body, "probabilities");
    assert_eq!(probabilities["shape"], json!([8, 2]));
    assert_close(
        &floats(&probabilities["data"]),
        &expected.probabilities[..8],
        "matrix",
    );
    let labels = output(&body, "label");
    assert_eq!(labels["datatype"], "INT64");
    for (label, p) in labels["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&expected.probabilities)
    {
        assert_eq!(label.as_u64().unwrap(), u64::from(p[1] > p[0]));
    }

    let names = ["income", "debt_ratio", "age", "region", "tenure"];
    let inputs: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(f, n)| {
            let column: Vec<Option<f64>> = rows.iter().map(|r| r[f]).collect();
            json!({"name": n, "shape": [8], "datatype": "FP64", "data": column})
        })
        .collect();
    let body = json!({"inputs": inputs, "outputs": [{"name": "probabilities"}]});
    let (status, body) = infer(&server, "credit", body).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert_close(
        &floats(&output(&body, "probabilities")["data"]),
        &expected.probabilities[..8],
        "by feature",
    );

    let meta = common::get_json(&server, "/v2/models/credit").await;
    assert_eq!(meta["platform"], "lightgbm");
    assert_eq!(meta["inputs"][3]["name"], "region");
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 2]));
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/credit/ready",
        "/v2/models/credit/versions/1/ready",
    ] {
        assert_eq!(
            client()
                .get(server.url(path))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let metrics = common::get_text(&server, "/metrics").await;
    assert!(
        metrics.contains("kandle_rows_predicted_total 16"),
        "{metrics}"
    );
}

#[tokio::test]
async fn each_kind_of_bad_input_is_a_400_that_names_it() {
    let server = Server::start(
        &fixture("xgboost-binary"),
        &[
            "--served-model-name",
            "risk",
            "--max-rows",
            "4",
            "--max-body-bytes",
            "4096",
        ],
    );
    let one = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]});
    let row = json!([0.1, 0.2, null, 0.4, 0.5, 0.6]);
    let cases = [
        (
            one(json!([1, 5]), "FP64", json!([0.1, 0.2, 0.3, 0.4, 0.5])),
            "5 columns",
        ),
        (one(json!([2, 6]), "FP64", row.clone()), "carries 6"),
        (one(json!([1, 6]), "FP128", row.clone()), "datatype `FP128`"),
        (
            one(json!([1, 6]), "FP64", json!([0.1, "a", 0.3, 0.4, 0.5, 0.6])),
            "\"a\"",
        ),
        (
            one(json!([1, 6]), "INT64", json!([1, 2.5, 3, 4, 5, 6])),
            "2.5",
        ),
        (
            one(json!([5, 6]), "FP64", json!([row, row, row, row, row])),
            "limit of 4",
        ),
        (one(json!([0, 6]), "FP64", json!([])), "no rows"),
        (one(json!([-1, 6]), "FP64", row.clone()), "negative"),
        (
            json!({"inputs": [{"name": "f0", "shape": [1], "datatype": "FP64", "data": [1.0]},
                           {"name": "colour", "shape": [1], "datatype": "FP64", "data": [1.0]}]}),
            "Unknown feature `colour`",
        ),
        (
            json!({"inputs": [{"name": "f0", "shape": [1], "datatype": "FP64", "data": [1.0]}]}),
            "Feature `f1` is missing",
        ),
        (json!({"inputs": []}), "no inputs"),
        (json!({"inputs": "x"}), "not a valid inference request"),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP64", "data": row}], "outputs": [{"name": "logits"}]}),
            "Unknown output `logits`",
        ),
    ];
    for (body, wanted) in cases {
        let (status, answer) = infer(&server, "risk", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let message = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("v2 error shape: {answer}"));
        assert!(
            message.contains(wanted),
            "{body}: `{message}` should name `{wanted}`"
        );
    }

    // Infinity cannot be written in JSON; binary tensors carry it.
    let header = json!({"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP64", "parameters": {"binary_data_size": 48}}]}).to_string();
    let mut body = header.clone().into_bytes();
    for v in [0.1, f64::INFINITY, 0.3, 0.4, 0.5, 0.6] {
        body.extend(f64::to_le_bytes(v));
    }
    let response = client()
        .post(server.url("/v2/models/risk/infer"))
        .header("inference-header-content-length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("infinite value in row 0"),
        "{answer}"
    );

    let (status, answer) = infer(&server, "other", one(json!([1, 6]), "FP64", row)).await;
    assert_eq!(status, 404);
    assert!(
        answer["error"].as_str().unwrap().contains("`other`"),
        "{answer}"
    );
    let response = client()
        .post(server.url("/v2/models/risk/infer"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let huge = vec![b' '; 64 * 1024];
    let response = client()
        .post(server.url("/v2/models/risk/infer"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("4096 bytes"),
        "{answer}"
    );
}

#[tokio::test]
async fn category_names_and_labels_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("lightgbm-binary").join("model.txt"),
        dir.path().join("model.txt"),
    )
    .unwrap();
    let regions = ["north", "south", "east", "west", "centre", "islands"];
    let manifest = json!({"labels": ["repaid", "defaulted"], "categories": {"region": regions}});
    std::fs::write(dir.path().join(tabular::MANIFEST), manifest.to_string()).unwrap();
    let server = Server::start(dir.path(), &["--served-model-name", "credit"]);
    let expected = expected("lightgbm-binary");
    // Rows whose region is a known code, sent by name.
    let rows: Vec<&Vec<Option<f64>>> = expected
        .inputs
        .iter()
        .filter(|r| r[3].is_some_and(|c| (0.0..6.0).contains(&c)))
        .take(6)
        .collect();
    let names = ["income", "debt_ratio", "age", "region", "tenure"];
    let inputs: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(f, n)| {
            if f == 3 {
                let column: Vec<&str> = rows
                    .iter()
                    .map(|r| regions[r[3].unwrap() as usize])
                    .collect();
                json!({"name": n, "shape": [rows.len()], "datatype": "BYTES", "data": column})
            } else {
                let column: Vec<Option<f64>> = rows.iter().map(|r| r[f]).collect();
                json!({"name": n, "shape": [rows.len()], "datatype": "FP64", "data": column})
            }
        })
        .collect();
    let (status, body) = infer(&server, "credit", json!({"inputs": inputs})).await;
    assert_eq!(status, 200, "{body}");
    let want: Vec<Vec<f64>> = expected
        .inputs
        .iter()
        .zip(&expected.probabilities)
        .filter(|(r, _)| rows.contains(r))
        .map(|(_, p)| p.clone())
        .collect();
    assert_close(
        &floats(&output(&body, "probabilities")["data"]),
        &want,
        "by name",
    );
    let labels = output(&body, "label");
    assert_eq!(labels["datatype"], "BYTES");
    for (label, p) in labels["data"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(label, if p[1] > p[0] { "defaulted" } else { "repaid" });
    }

    let mut bad = inputs.clone();
    bad[3]["data"][0] = json!("atlantis");
    let (status, body) = infer(&server, "credit", json!({"inputs": bad})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no category `atlantis`"),
        "{body}"
    );
}

#[test]
fn official_triton_client_works_unchanged() {
    let xgb = Server::start(
        &fixture("xgboost-multiclass"),
        &["--served-model-name", "xgb"],
    );
    let lgb = Server::start(&fixture("lightgbm-binary"), &["--served-model-name", "lgb"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/triton_client.py");
    let output = std::process::Command::new(venv_python())
        .arg(script)
        .args([
            &xgb.base,
            "xgb",
            fixture("xgboost-multiclass").to_str().unwrap(),
        ])
        .args([
            &lgb.base,
            "lgb",
            fixture("lightgbm-binary").to_str().unwrap(),
        ])
        .output()
        .expect("run the triton client script with the test virtualenv's python");
    assert!(
        output.status.success(),
        "triton client script failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_credit_scoring_example_serves_as_the_readme_shows() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/credit-scoring");
    let server = Server::start(&example, &["--served-model-name", "credit-risk"]);
    let applicant = |region: Value| {
        json!({"inputs": [
            {"name": "income", "shape": [2], "datatype": "FP64", "data": [42000.0, 18000.0]},
            {"name": "debt_ratio", "shape": [2], "datatype": "FP64", "data": [0.15, 0.9]},
            {"name": "age", "shape": [2], "datatype": "FP64", "data": [45, 23]},
            {"name": "years_employed", "shape": [2], "datatype": "FP64", "data": [12.0, null]},
            {"name": "region", "shape": [2], "datatype": region["datatype"], "data": region["data"]}
        ]})
    };
    let (status, by_name) = infer(
        &server,
        "credit-risk",
        applicant(json!({"datatype": "BYTES", "data": ["north", "east"]})),
    )
    .await;
    assert_eq!(status, 200, "{by_name}");
    assert_eq!(
        output(&by_name, "label")["data"],
        json!(["repaid", "defaulted"])
    );
    let (status, by_code) = infer(
        &server,
        "credit-risk",
        applicant(json!({"datatype": "INT64", "data": [0, 2]})),
    )
    .await;
    assert_eq!(status, 200, "{by_code}");
    assert_eq!(
        output(&by_name, "probabilities"),
        output(&by_code, "probabilities")
    );
}
