//! What the gateway costs and what scale from zero takes, on loopback.
//!
//! 1. Added latency: MiniLM embeddings of one short sentence from one kandle-server, sent
//!    straight to it, through the gateway, and through nginx (Debian's, configured as a
//!    plain keep-alive reverse proxy), at 1 and 64 connections, each connection sending to
//!    the three in turn, in an order that changes every turn; p50 and p99 of each (the
//!    median over rounds), and what each proxy adds to the direct figures. Then the same
//!    in front of a backend that answers at once with the server's bytes: at 64
//!    connections the server's batcher sets most of the latency by where its batch
//!    boundaries fall, which blurs what the proxies add; a backend with a fixed service
//!    time leaves only the proxies to differ.
//! 2. Scale from zero: the real operator (emulated API server, simulated kubelet) and the
//!    gateway; from the first request for a model at zero replicas to its answer, split into
//!    the decision (the operator's autoscaler reads the held request and scales the
//!    Deployment), scheduling (simulated), the pull (simulated: the Job completes at once)
//!    and the load (a real kandle-server starting with SmolLM2).
//!
//! Needs release builds of kandle-server and kandle-operator (`cargo build --release -p
//! kandle-server -p kandle-operator`) and
//! nginx (`apt-get install nginx-light`); run with `cargo bench -p kandle-tests --bench
//! gateway`. `KANDLE_BENCH_ROUNDS` (default 5), `KANDLE_BENCH_REQUESTS` (per
//! connection and round, default 200) and `KANDLE_BENCH_CONNECTIONS` (default `1,64`) size
//! it; `KANDLE_BENCH_BACKENDS` (`minilm`, `fixed`, comma-separated; default both) picks the
//! backends, to profile one; `KANDLE_BENCH_GATEWAY` picks another `kandle-operator` to
//! measure (the images' build:
//! `cargo build --profile dist -p kandle-operator`, then `$PWD/target/dist/kandle-operator`:
//! absolute, as cargo runs benches from the package's folder), and
//! `KANDLE_BENCH_GATEWAY_BASE` adds a second one to the same run as `base` (a change against
//! its base, free of the drift between runs).
use k8s_openapi::api::apps::v1::Deployment;
use kandle_operator::crd::Phase;
use kandle_tests::apiserver::rbac::Policy;
use kandle_tests::apiserver::{ApiServer, loopback};
use kandle_tests::emulated::Emulated;
use kandle_tests::serving::{
    ServerProcess, endpoints, logged_address, minilm_dir, model, server_binary, smollm2_gguf,
};
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first argument that makes this binary the fixed backend.
const FIXED_BACKEND: &str = "fixed-backend";

/// A process of this benchmark's, listening on loopback, killed when dropped: the gateway
/// as the chart runs it (its own process, the release `kandle-operator`, with the chart's
/// RBAC), or the fixed backend. Run inside this benchmark instead, either would share the
/// load generator's threads and be charged for the client's work, which nginx is not.
struct Process {
    child: Child,
    addr: SocketAddr,
    /// The gateway's kubeconfig, or the backend's answer.
    _dir: tempfile::TempDir,
}

impl Process {
    /// The release build's gateway, or `KANDLE_BENCH_GATEWAY`'s (the images' `dist` build,
    /// say).
    async fn gateway(api: &ApiServer) -> Self {
        let binary = std::env::var_os("KANDLE_BENCH_GATEWAY").map_or_else(
            || server_binary().with_file_name("kandle-operator"),
            Into::into,
        );
        Self::gateway_binary(api, binary).await
    }

    async fn gateway_binary(api: &ApiServer, binary: std::path::PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let view = api.as_user(Policy::chart_gateway("kandle-system"));
        let listening = loopback::serve(view, dir.path()).await.unwrap();
        let mut child = Command::new(&binary)
            .args(["gateway", "--addr", "127.0.0.1:0", "--log-format", "json"])
            .env("KUBECONFIG", &listening.kubeconfig)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (cargo build --release -p kandle-operator)",
                    binary.display()
                )
            });
        // The operator's binary logs to stdout.
        let addr = logged_address(child.stdout.take().unwrap(), "the gateway").await;
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// This binary as a backend that answers every request with `answer`, at once.
    async fn fixed_backend(answer: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("answer.json");
        std::fs::write(&file, answer).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg(FIXED_BACKEND)
            .arg(&file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let addr = logged_address(child.stdout.take().unwrap(), "the fixed backend").await;
        Self {
            child,
            addr,
            _dir: dir,
        }
    }
}

/// Serves the fixed backend: the file's bytes as JSON for every request, after reading its
/// body, and where it listens logged as kandle's processes log it.
async fn fixed_backend(answer: std::path::PathBuf) {
    let answer = bytes::Bytes::from(std::fs::read(answer).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    println!("{}", json!({"fields": {"address": address}}));
    let app = axum::Router::new().fallback(move |_: bytes::Bytes| {
        let answer = answer.clone();
        async move { ([(http::header::CONTENT_TYPE, "application/json")], answer) }
    });
    axum::serve(listener, app).await.unwrap();
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx as a plain reverse proxy with keep-alive to the backend, killed when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    /// Its configuration and logs, removed after it stops.
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(backend: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = dir.path().display();
        let conf = format!(
            "worker_processes auto;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {root};\n  proxy_temp_path {root};\n\
               upstream backend {{ server {backend}; keepalive 128; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass http://backend;\n      proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Self::command(&dir)
            .args(["-g", "daemon off;"])
            .spawn()
            .expect("nginx: apt-get install nginx-light");
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    fn command(dir: &tempfile::TempDir) -> Command {
        let mut nginx = Command::new("/usr/sbin/nginx");
        nginx
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-p")
            .arg(dir.path())
            .args(["-c", "nginx.conf"]);
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Killing the master would leave its workers running: it stops them itself.
        let _ = Self::command(&self.dir).args(["-s", "stop"]).status();
        let _ = self.child.wait();
    }
}

/// Latencies, per target, of `per_connection` requests to each of `targets` on each of
/// `connections` connections at once. Each connection sends to the targets in turn, one
/// request at a time, so all of them meet the same backend: the model's own time drifts
/// by more than a proxy adds, and a proxy measured minutes apart from the others would
/// carry that drift as its own.
async fn load(
    targets: &[SocketAddr],
    body: &bytes::Bytes,
    connections: usize,
    per_connection: usize,
) -> Vec<Vec<Duration>> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let urls: Vec<String> = targets
        .iter()
        .map(|addr| format!("http://{addr}/v1/embeddings"))
        .collect();
    let tasks = (0..connections).map(|c| {
        let (client, urls, body) = (client.clone(), urls.clone(), body.clone());
        tokio::spawn(async move {
            let mut times = vec![Vec::with_capacity(per_connection); urls.len()];
            // Connections take different orders at any moment, so each target always has its
            // share, and change order every turn, so no target always follows the same one.
            for target in (0..per_connection).flat_map(|turn| order(urls.len(), c + turn)) {
                let start = Instant::now();
                let response = client
                    .post(&urls[target])
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                times[target].push(start.elapsed());
            }
            times
        })
    });
    let mut all = vec![Vec::new(); targets.len()];
    for times in futures::future::join_all(tasks).await {
        for (target, times) in times.unwrap().into_iter().enumerate() {
            all[target].extend(times);
        }
    }
    for times in &mut all {
        times.sort();
    }
    all
}

/// CPU time that the processes `pids` have used so far, in seconds: every thread's run time
/// from `/proc/<pid>/task/<tid>/schedstat`, in nanoseconds (`/proc/<pid>/stat` counts ticks
/// of 10 ms, which over a thousand requests is a resolution of 10 us a request).
fn cpu_seconds(pids: &[u32]) -> f64 {
    let nanos: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split(' ').next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

/// `parent` and its children.
fn with_children(parent: u32) -> Vec<u32> {
    let mut pids = vec![parent];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent's pid is the 2nd field after the name.
        if stat_fields(pid).is_some_and(|fields| fields[1] == parent.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces), state
/// first; None once the process is gone.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split(' ').map(str::to_owned).collect())
}

/// `KANDLE_BENCH_CONNECTIONS` (comma-separated), by default 1 and 64.
fn connection_counts() -> Vec<usize> {
    std::env::var("KANDLE_BENCH_CONNECTIONS")
        .ok()
        .map(|list| {
            list.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![1, 64])
}

/// The `k`th of the orders of `n` targets (`k`'s digits in the factorial number system
/// pick each next one). With one fixed order the target after the direct requests was
/// measured behind the others in front of kandle-server at 64 connections, whichever
/// binary it was: its requests met the embedding batcher at the same phase every time.
fn order(n: usize, mut k: usize) -> Vec<usize> {
    let mut left: Vec<usize> = (0..n).collect();
    let mut order = Vec::with_capacity(n);
    for radix in (1..=n).rev() {
        order.push(left.remove(k % radix));
        k /= radix;
    }
    order
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The request every connection sends for `model`.
fn embedding_request(model: &str) -> bytes::Bytes {
    let body = json!({"model": model, "input": "a short sentence about serving models"});
    serde_json::to_vec(&body).unwrap().into()
}

async fn added_latency() {
    let server = ServerProcess::start(minilm_dir(), "minilm").await;
    let answer = reqwest::Client::new()
        .post(format!("http://{}/v1/embeddings", server.addr))
        .header("content-type", "application/json")
        .body(embedding_request("minilm"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let fixed = Process::fixed_backend(&answer).await;
    let api = ApiServer::default();
    for (name, addr) in [("minilm", server.addr), ("fixed", fixed.addr)] {
        let spec = json!({"model": {"uri": "hf://org/m", "servedName": name}});
        model(&api, name, spec, json!({}), Phase::Ready).await;
        endpoints(&api, "ml", name, &[addr]).await;
    }
    let gateway = Process::gateway(&api).await;
    // A second gateway binary (a change's base, say), measured in the same interleaved run.
    let base = match std::env::var_os("KANDLE_BENCH_GATEWAY_BASE") {
        Some(binary) => Some(Process::gateway_binary(&api, binary.into()).await),
        None => None,
    };
    let gateways: Vec<(&str, &Process)> = std::iter::once(("gateway", &gateway))
        .chain(base.iter().map(|base| ("base", base)))
        .collect();
    let backends = [
        ("MiniLM embeddings of one sentence", "minilm", server.addr),
        (
            "a backend answering the same bytes at once",
            "fixed",
            fixed.addr,
        ),
    ];
    let only = std::env::var("KANDLE_BENCH_BACKENDS").unwrap_or_default();
    for (what, model, backend) in backends {
        if !only.is_empty() && !only.split(',').any(|name| name.trim() == model) {
            continue;
        }
        measure_proxies(what, &embedding_request(model), backend, &gateways).await;
    }
}

/// What the gateways and an nginx in front of `backend` add to its latency for `body`.
async fn measure_proxies(
    what: &str,
    body: &bytes::Bytes,
    backend: SocketAddr,
    gateways: &[(&str, &Process)],
) {
    let rounds = env_or("KANDLE_BENCH_ROUNDS", 5);
    let per_connection = env_or("KANDLE_BENCH_REQUESTS", 200);
    let nginx = Nginx::start(backend);
    // The proxies' processes (nginx's workers are its master's children), for the CPU each
    // spends per request.
    let mut targets = vec![("direct", backend, None)];
    targets.extend(
        gateways
            .iter()
            .map(|(name, gateway)| (*name, gateway.addr, Some(gateway.child.id()))),
    );
    targets.push(("nginx", nginx.addr, Some(nginx.child.id())));
    // Each proxy answers before measuring: nginx once it listens, the gateways once they
    // have synced their watches.
    for (name, addr, _) in &targets {
        let warm = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = reqwest::Client::new()
                .post(format!("http://{addr}/v1/embeddings"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(Instant::now() < warm, "{name} did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "added latency, {what}, {rounds} rounds x {per_connection} requests per connection and \
         target (above one connection an eighth of that, at least 10)"
    );
    for connections in connection_counts() {
        let per = if connections == 1 {
            per_connection
        } else {
            (per_connection / 8).max(10)
        };
        let mut p50 = vec![Vec::new(); targets.len()];
        let mut p99 = vec![Vec::new(); targets.len()];
        let pids: Vec<Vec<u32>> = targets
            .iter()
            .map(|(_, _, proxy)| proxy.map(with_children).unwrap_or_default())
            .collect();
        let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(p)).collect();
        let addrs: Vec<SocketAddr> = targets.iter().map(|(_, addr, _)| *addr).collect();
        for _ in 0..rounds {
            for (i, times) in load(&addrs, body, connections, per)
                .await
                .iter()
                .enumerate()
            {
                p50[i].push(percentile(times, 0.5));
                p99[i].push(percentile(times, 0.99));
            }
        }
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(p, before)| cpu_seconds(p) - before)
            .collect();
        let p50: Vec<f64> = p50.iter_mut().map(|v| median(v)).collect();
        let p99: Vec<f64> = p99.iter_mut().map(|v| median(v)).collect();
        let requests = (rounds * connections * per) as f64;
        for (i, (name, _, proxy)) in targets.iter().enumerate() {
            let cpu = match proxy {
                None => String::new(),
                Some(_) => format!("  proxy CPU {:.0} us/request", cpu[i] / requests * 1e6),
            };
            println!(
                "  {connections:>2} connections {name:>8}: p50 {:7.3} ms  p99 {:7.3} ms  added p50 {:+.3} ms  added p99 {:+.3} ms{cpu}",
                p50[i],
                p99[i],
                p50[i] - p50[0],
                p99[i] - p99[0]
            );
        }
    }
}

async fn scale_from_zero() {
    let env = Emulated::start();
    let t = env.target();
    let gateway = Process::gateway(&env.server).await;
    env.load.read_gateway(gateway.addr);
    t.create(
        "sleepy",
        json!({"model": {"uri": "hf://org/m", "servedName": "smol"},
               "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 0}}),
    )
    .await;
    t.wait_phase("sleepy", Phase::ScaledToZero).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = Instant::now();
    let answer = tokio::spawn(async move {
        let body = json!({"model": "smol", "max_tokens": 8,
                          "messages": [{"role": "user", "content": "Hi"}]});
        let url = format!("http://{}/v1/chat/completions", gateway.addr);
        let response = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    });
    t.wait::<Deployment>("sleepy", "scaled up", |d| d.spec.replicas == Some(1))
        .await;
    let decided = sent.elapsed();
    t.wait::<Deployment>("sleepy", "ready", |d| {
        d.status.as_ref().and_then(|s| s.ready_replicas) == Some(1)
    })
    .await;
    let scheduled = sent.elapsed();
    let pod = ServerProcess::start(smollm2_gguf(), "smol").await;
    let loaded = sent.elapsed();
    endpoints(&env.server, "default", "sleepy", &[pod.addr]).await;
    answer.await.unwrap();
    let answered = sent.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "scale from zero (autoscaler tick 25 ms as in the tests; 2 s by default): decision {:.0} ms, \
         scheduling and pull (simulated) {:.0} ms, load (kandle-server, SmolLM2) {:.0} ms, \
         routing and answer {:.0} ms; total {:.0} ms",
        ms(decided),
        ms(scheduled - decided),
        ms(loaded - scheduled),
        ms(answered - loaded),
        ms(answered)
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(FIXED_BACKEND) {
        return fixed_backend(args.next().unwrap().into()).await;
    }
    added_latency().await;
    scale_from_zero().await;
}
