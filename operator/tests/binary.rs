//! The `kandle-operator run` binary against the emulated API server over loopback: it
//! converges, serves its own probes and metrics, leads on a Lease and hands it back on
//! SIGTERM.
use k8s_openapi::api::coordination::v1::Lease;
use kandle_tests::apiserver::ApiServer;
use kandle_tests::apiserver::loopback;
use kandle_tests::apiserver::rbac::Policy;
use kandle_tests::cluster::Cluster;
use kandle_tests::emulated::assert_nothing_forbidden;
use kandle_tests::scenarios::Target;
use kube::Api;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Operator(Child);

impl Operator {
    /// SIGTERM, as the kubelet stops a pod.
    fn terminate(&self) {
        let pid = self.0.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(kill.unwrap().success());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_converges_reports_and_hands_back_its_lease() {
    let server = ApiServer::default();
    let _cluster = Cluster::start(&server);
    let dir = tempfile::tempdir().unwrap();
    // The binary gets only what the Helm chart's RBAC grants it.
    let operator_view = server.as_user(Policy::chart("kandle-system"));
    let listening = loopback::serve(operator_view, dir.path()).await.unwrap();
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_kandle-operator"))
            .args([
                "run",
                "--metrics-addr",
                &metrics_addr,
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", &listening.kubeconfig)
            .env("POD_NAME", "kandle-operator-0")
            .env("POD_NAMESPACE", "kandle-system")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let t = Target {
        client: server.client(),
        namespace: "default".into(),
        timeout: Duration::from_secs(20),
        real: false,
    };
    t.create(
        "binary",
        serde_json::json!({"model": {"uri": "hf://org/m"}, "replicas": 2}),
    )
    .await;
    t.wait_phase("binary", kandle_operator::crd::Phase::Ready)
        .await;

    let (code, _) = loopback::get(&metrics_addr, "/healthz")
        .await
        .expect("healthz answers");
    assert_eq!(code, 200);
    let (code, _) = loopback::get(&metrics_addr, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = loopback::get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for line in [
        "kandle_operator_leader 1",
        "kandle_operator_reconcile_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kandle_operator_reconciles_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    let leases: Api<Lease> = Api::namespaced(server.client(), "kandle-system");
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get("kandle-operator").await.unwrap()).as_deref(),
        Some("kandle-operator-0")
    );

    operator.terminate();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the operator stops on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut operator.0.stdout.take().unwrap(), &mut logs).unwrap();
    assert!(status.success(), "{status}: {logs}");
    assert_eq!(
        holder(leases.get("kandle-operator").await.unwrap()),
        None,
        "the lease is handed back"
    );
    assert!(
        logs.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "JSON logs: {logs}"
    );
    assert_nothing_forbidden(&server);
}

/// A model folder of `bytes` in the node cache, last written `age` ago.
fn cached(root: &std::path::Path, name: &str, bytes: usize, age: Duration) {
    use kandle_contract::pull::{LOCK, MARKER};
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), vec![0u8; bytes]).unwrap();
    std::fs::write(dir.join(LOCK), b"").unwrap();
    std::fs::write(dir.join(MARKER), b"{}").unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.join(MARKER))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_cache_collector_removes_unused_models_past_its_limit_and_nothing_else() {
    let server = ApiServer::default();
    let dir = tempfile::tempdir().unwrap();
    // The collector gets only what the chart grants the node cache's DaemonSet.
    let listening = loopback::serve(
        server.as_user(Policy::chart_node_cache("kandle-system")),
        dir.path(),
    )
    .await
    .unwrap();
    let t = Target {
        client: server.client(),
        namespace: "default".into(),
        timeout: Duration::from_secs(20),
        real: false,
    };
    let used = t
        .create(
            "cached",
            serde_json::json!({"model": {"uri": "hf://org/m"}, "cache": {"volume": "node"}}),
        )
        .await;
    let used = kandle_operator::build::node_folder(&used).unwrap();
    let root = tempfile::tempdir().unwrap();
    let hour = Duration::from_secs(3600);
    let (locked, old, new) = (
        "0000000000000000000000000000000a",
        "0000000000000000000000000000000b",
        "0000000000000000000000000000000c",
    );
    // 11 kB against a 9.1 kB limit: the used model stays however old; the oldest unused
    // one is being pulled into; the next oldest goes, and that is enough.
    cached(root.path(), &used, 4000, 9 * hour);
    cached(root.path(), locked, 3000, 3 * hour);
    cached(root.path(), old, 2000, 2 * hour);
    cached(root.path(), new, 2000, hour);
    std::fs::create_dir(root.path().join("lost+found")).unwrap();
    let pulling =
        std::fs::File::open(root.path().join(locked).join(kandle_contract::pull::LOCK)).unwrap();
    pulling.lock().unwrap();

    let mut collector = Operator(
        Command::new(env!("CARGO_BIN_EXE_kandle-operator"))
            .args(["node-cache", "collect", "--max-size", "9100"])
            .arg("--root")
            .arg(root.path())
            .args(["--interval-seconds", "1", "--log-format", "json"])
            .env("KUBECONFIG", &listening.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let started = std::time::Instant::now();
    while root.path().join(old).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the unused model is removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More passes change nothing: the cache fits.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for kept in [used.as_str(), locked, new, "lost+found"] {
        assert!(root.path().join(kept).exists(), "{kept} was removed");
    }
    collector.terminate();
    let status = collector.0.wait().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut collector.0.stdout.take().unwrap(), &mut logs).unwrap();
    assert!(status.success(), "{status}: {logs}");
    assert!(
        logs.contains("removed an unused model from the node cache")
            && logs.contains("a pull holds this folder; kept"),
        "{logs}"
    );
    assert_nothing_forbidden(&server);
}
