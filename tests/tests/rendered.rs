//! Every example, rendered by `kandle-operator render` for clusters with and without image
//! volumes, is what the Kubernetes API accepts: checked by `kubernetes-validate` (strict,
//! the schemas of Kubernetes 1.35) from the test virtual environment.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn render(example: &Path, image_volumes: bool) -> String {
    let settings = kandle_operator::build::Settings {
        server_image: "ghcr.io/kandle/kandle-server:test".into(),
        server_image_cuda: "ghcr.io/kandle/kandle-server:test-cuda".into(),
        cluster_domain: "cluster.local".into(),
        operator_namespace: "kandle-system".into(),
        image_volumes,
        node_cache_root: "/var/lib/kandle/models".into(),
    };
    let input = std::fs::read_to_string(example).unwrap();
    kandle_operator::render::render(&input, &settings, "default", None)
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()))
}

#[test]
fn every_rendered_example_is_valid_kubernetes_with_and_without_image_volumes() {
    let examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(examples.len() >= 5, "{examples:?}");
    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for example in &examples {
        for image_volumes in [false, true] {
            let yaml = render(example, image_volumes);
            let name = format!(
                "{}-{image_volumes}.yaml",
                example.file_stem().unwrap().to_string_lossy()
            );
            std::fs::write(out.path().join(&name), yaml).unwrap();
            files.push(out.path().join(name));
        }
    }
    // The OCI example is an image volume even where the operator would not choose one:
    // its spec asks for it.
    let oci = render(&root().join("examples/oci-model.yaml"), false);
    assert!(
        oci.contains("reference: registry.example.com/models/all-minilm-l6-v2:v1"),
        "{oci}"
    );
    let venv =
        std::env::var_os("KANDLE_TEST_VENV").map_or_else(|| root().join(".venv"), PathBuf::from);
    let result = Command::new(venv.join("bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", "1.35.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate from the test virtualenv (scripts/test installs it)");
    assert!(
        result.status.success(),
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}
