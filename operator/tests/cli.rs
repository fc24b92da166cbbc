//! `kandle-operator crd` and `render`, as users and CI run them.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn operator(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kandle-operator"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
fn the_checked_in_crds_are_current() {
    let out = operator(&["crd"], None);
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    // The chart installs its own copy (Helm reads CRDs only from the chart's folder).
    for copy in [
        "crds/modeldeployment.yaml",
        "charts/kandle/crds/modeldeployment.yaml",
    ] {
        let checked_in = std::fs::read_to_string(root().join(copy)).unwrap();
        assert!(
            generated == checked_in,
            "{copy} is stale: run `cargo run -p kandle-operator -- crd > {copy}`"
        );
    }
}

#[test]
fn the_reference_is_current() {
    let out = operator(&["reference"], None);
    assert!(out.status.success());
    let checked_in = std::fs::read_to_string(root().join("docs/modeldeployment.md")).unwrap();
    assert!(
        String::from_utf8(out.stdout).unwrap() == checked_in,
        "docs/modeldeployment.md is stale: run `cargo run -p kandle-operator -- reference > docs/modeldeployment.md`"
    );
}

#[test]
fn every_example_is_valid_and_renders_the_same_twice() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        seen += 1;
        let file = path.to_str().unwrap();
        let first = operator(&["render", "-f", file], None);
        assert!(
            first.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let second = operator(&["render", "-f", file], None);
        assert_eq!(
            first.stdout, second.stdout,
            "{file}: render is deterministic"
        );
        let yaml = String::from_utf8(first.stdout).unwrap();
        assert!(
            yaml.contains("kind: Deployment") && yaml.contains("kind: Service"),
            "{file}"
        );
    }
    assert!(seen >= 4, "the examples are there");
}

#[test]
fn render_refuses_what_a_strict_api_server_would_naming_field_and_rule() {
    let input = r#"
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata: {name: fine}
spec:
  model: {uri: hf://org/m}
---
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata: {name: typo}
spec:
  model: {uri: hf://org/m, revison: main}
---
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata: {name: both}
spec:
  model: {uri: hf://org/m}
  replicas: 2
  autoscaling: {minReplicas: 1, maxReplicas: 3}
"#;
    let out = operator(&["render", "-f", "-"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "nothing is printed for a file with errors"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(r#"document 2 (typo): unknown field "spec.model.revison""#),
        "{err}"
    );
    assert!(
        err.contains("document 3 (both)") && err.contains("set either replicas or autoscaling"),
        "{err}"
    );
    assert!(
        err.contains("rule: !(has(self.replicas) && has(self.autoscaling))"),
        "{err}"
    );
    assert!(!err.contains("fine"), "{err}");
}

#[test]
fn render_fills_the_namespace_and_prints_children_in_apply_order() {
    let input = "apiVersion: kandle.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: m}\nspec:\n  model: {uri: hf://org/m}\n  replicas: 2\n";
    let out = operator(
        &[
            "render",
            "-f",
            "-",
            "--namespace",
            "team-a",
            "--server-image",
            "registry.local/kandle-server:dev",
        ],
        Some(input),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(kinds, ["Deployment", "Service", "PodDisruptionBudget"]);
    assert_eq!(yaml.matches("namespace: team-a").count(), 3);
    assert!(yaml.contains("image: registry.local/kandle-server:dev"));
}

/// `render --observed` goes through the reconcile's plan step: a ModelDeployment as
/// `kubectl get -o yaml` shows it mid-canary renders both Deployments, split by the step's
/// weight, and a pvc cache whose pull Job has not finished holds its Deployment back.
#[test]
fn render_with_what_the_cluster_holds_shows_what_the_operator_would_apply_now() {
    let dir = std::env::temp_dir().join(format!("kandle-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nothing = dir.join("observed.yaml");
    std::fs::write(&nothing, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let observed = nothing.to_str().unwrap();
    let render = |input: &str, observed: Option<&str>| {
        let mut args = vec!["render", "-f", "-", "-n", "ml"];
        args.extend(observed.map(|o| ["--observed", o]).into_iter().flatten());
        let out = operator(&args, Some(input));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let deployments = |yaml: &str| -> Vec<(String, String)> {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
        docs.iter()
            .filter(|d| d["kind"] == "Deployment")
            .map(|d| {
                let name = d["metadata"]["name"].as_str().unwrap().to_string();
                (name, d["spec"]["replicas"].to_string())
            })
            .collect()
    };

    let canary = r#"
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata: {name: m, generation: 3}
spec:
  model: {uri: hf://org/new}
  replicas: 4
  rollout: {canary: {steps: [{weight: 25, pauseSeconds: 600}]}}
status:
  currentRevision: old
  readySpec:
    model: {uri: hf://org/old}
    replicas: 4
"#;
    let pair = [
        ("m".to_string(), "3".to_string()),
        ("m-canary".to_string(), "1".to_string()),
    ];
    assert_eq!(deployments(&render(canary, Some(observed))), pair);
    assert_eq!(
        deployments(&render(canary, None)),
        [("m".to_string(), "4".to_string())],
        "without --observed, the spec alone"
    );

    let pvc = r#"
apiVersion: kandle.dev/v1alpha1
kind: ModelDeployment
metadata: {name: m}
spec:
  model: {uri: hf://org/m}
  cache: {volume: pvc, pvc: {size: 2Gi}}
"#;
    assert!(
        deployments(&render(pvc, Some(observed))).is_empty(),
        "held until pulled"
    );
    assert_eq!(deployments(&render(pvc, None)).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kubectl explain` shows the descriptions: every field of the spec and status has one.
#[test]
fn every_field_is_described() {
    fn walk(path: &str, node: &serde_json::Value, missing: &mut Vec<String>) {
        for (name, child) in node["properties"].as_object().into_iter().flatten() {
            let here = format!("{path}.{name}");
            if child["description"]
                .as_str()
                .is_none_or(|d| d.trim().is_empty())
            {
                missing.push(here.clone());
            }
            walk(&here, child, missing);
            walk(&format!("{here}[]"), &child["items"], missing);
        }
    }
    let crd: serde_json::Value = serde_json::to_value(kandle_operator::crd::definition()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("", schema, &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}
