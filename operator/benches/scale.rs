//! How the operator's cost grows with the number of ModelDeployments: the release binary
//! against the emulated API server over loopback, with the simulated cluster making pods
//! ready. For each N: time until all are Ready, API requests per ModelDeployment, writes
//! during a full re-list with nothing changed (goal 0), resident memory (goal < 100 MiB),
//! and the p99 reconcile time from the operator's own histogram.
//!
//! `cargo bench -p kandle-operator --bench scale -- 100 1000 5000` (default 100 1000).
use kandle_tests::apiserver::ApiServer;
use kandle_tests::apiserver::loopback;
use kandle_tests::apiserver::store::kind;
use kandle_tests::cluster::Cluster;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000]
    } else {
        sizes
    };
    println!(
        "| ModelDeployments | converged in | requests / MD | writes / MD | resync writes | resync requests | RSS MiB (peak) | reconcile p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in sizes {
        run(n).await;
    }
}

async fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = loopback::get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The 99th percentile from a Prometheus histogram: the first bucket bound holding 99 %.
async fn p99(addr: &str) -> String {
    let (_, text) = loopback::get(addr, "/metrics").await.unwrap_or_default();
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("kandle_operator_reconcile_duration_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_string(), count.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= 0.99 * total)
        .map(|(le, _)| format!("<= {le} s"))
        .unwrap_or_default()
}

fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    (kib("VmRSS:") / 1024, kib("VmHWM:") / 1024)
}

async fn run(n: usize) {
    let server = ApiServer::default();
    let _cluster = Cluster::start(&server);
    let dir = tempfile::tempdir().unwrap();
    let listening = loopback::serve(server.clone(), dir.path()).await.unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut operator = Command::new(env!("CARGO_BIN_EXE_kandle-operator"))
        .args(["run", "--leader-election", "false", "--metrics-addr", &addr])
        .env("KUBECONFIG", &listening.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while loopback::get(&addr, "/readyz").await.map(|r| r.0) != Some(200) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_rss = memory(operator.id()).0;
    let models = kind("modeldeployments").unwrap();
    let started = Instant::now();
    for i in 0..n {
        let md = json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": format!("m{i}")},
            "spec": {"model": {"uri": format!("hf://org/model-{i}")}, "replicas": 2}});
        server
            .store()
            .create(models, &format!("ns-{}", i / 10), md)
            .unwrap();
    }
    let ready = |o: &serde_json::Value| {
        o["status"]["phase"] == "Ready"
            && o["status"]["observedGeneration"] == o["metadata"]["generation"]
    };
    while server.store().list(models, None, ready).0.len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "not converged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let converged_rss = memory(operator.id()).0;
    let requests = server.requests();
    let writes: u64 = requests
        .iter()
        .filter(|((verb, _), _)| ["create", "update", "patch", "delete"].contains(&verb.as_str()))
        .map(|(_, c)| c)
        .sum();
    let total = server.total_requests();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_before = metric(&addr, "kandle_operator_writes_total").await;
    let reconciles_before = metric(&addr, "kandle_operator_reconciles_total").await;
    let requests_before = server.total_requests();
    server.interrupt_watches(|_| {});
    let resync = Instant::now();
    while metric(&addr, "kandle_operator_reconciles_total").await < reconciles_before + n as f64 {
        assert!(resync.elapsed() < Duration::from_secs(600), "no resync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resync_writes = metric(&addr, "kandle_operator_writes_total").await - writes_before;
    let resync_requests = server.total_requests() - requests_before;
    let (rss, peak) = memory(operator.id());
    println!(
        "| {n} | {:.1} s | {:.1} | {:.1} | {resync_writes} | {resync_requests} | {rss} ({peak}) | {} |",
        converged.as_secs_f64(),
        total as f64 / n as f64,
        writes as f64 / n as f64,
        p99(&addr).await,
    );
    let per_kind: Vec<String> = requests
        .iter()
        .map(|((verb, resource), count)| {
            format!("{verb} {resource} {:.2}", *count as f64 / n as f64)
        })
        .collect();
    eprintln!(
        "N={n} RSS MiB: empty {idle_rss}, converged {converged_rss}, after the re-list {rss}"
    );
    eprintln!(
        "N={n} requests per ModelDeployment until converged: {}",
        per_kind.join(", ")
    );
    let _ = operator.kill();
    let _ = operator.wait();
}
