//! The gateway (`kandle-operator gateway`) against the emulated API server, with only the
//! chart's gateway RBAC, in front of real `kandle-server` processes on loopback serving
//! SmolLM2 and MiniLM. The tests write the EndpointSlices themselves, standing in for
//! Kubernetes' EndpointSlice controller; scale from zero runs the real operator too.
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use kandle_operator::crd::Phase;
use kandle_tests::apiserver::ApiServer;
use kandle_tests::apiserver::rbac::Policy;
use kandle_tests::emulated::Emulated;
use kandle_tests::serving::{ServerProcess, endpoints, minilm_dir, model, smollm2_gguf};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway serving on loopback until dropped.
struct Gateway {
    base: String,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_gateway(server: &ApiServer, flags: &[&str]) -> Gateway {
    start_gateway_until(server, flags, std::future::pending()).await
}

/// A gateway that drains and stops once `shutdown` resolves (SIGTERM, in the binary).
async fn start_gateway_until(
    server: &ApiServer,
    flags: &[&str],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Gateway {
    let argv = ["kandle-operator", "gateway"].iter().chain(flags);
    let kandle_operator::cli::Command::Gateway(args) =
        kandle_operator::cli::Cli::try_parse_from(argv)
            .unwrap()
            .command
    else {
        unreachable!("parsed as the gateway command")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = server
        .as_user(Policy::chart_gateway("kandle-system"))
        .client();
    let task = tokio::spawn(async move {
        kandle_operator::gateway::run(client, &args, listener, shutdown)
            .await
            .unwrap();
    });
    let base = format!("http://{addr}");
    let http = http();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Gateway { base, addr, task }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// One SmolLM2 pod serving `smol`, its ModelDeployment and the gateway in front, routing.
async fn smol_behind_gateway(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (ServerProcess, Gateway) {
    let pod = ServerProcess::start(smollm2_gguf(), "smol").await;
    let api = ApiServer::default();
    let spec = json!({"model": {"uri": "hf://org/m", "servedName": "smol"}});
    model(&api, "chat", spec, json!({}), Phase::Ready).await;
    endpoints(&api, "ml", "chat", &[pod.addr]).await;
    let gateway = start_gateway_until(&api, &[], shutdown).await;
    wait_listed(&gateway, &["smol"], None).await;
    (pod, gateway)
}

/// An address where nothing listens, a pod that died: a socket bound but not listening,
/// which refuses connections and, while it lives, keeps the port from another test's server
/// (a port bound and let go could be handed to one).
fn dead_pod() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

async fn wait_listed(gateway: &Gateway, names: &[&str], key: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut request = http().get(format!("{}/v1/models", gateway.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let list: Value = request.send().await.unwrap().json().await.unwrap();
        // Until the watches (or a reloaded keys file) catch up: an error, or fewer models.
        let ids: Vec<&str> = list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        if list["object"] == "list" && names.iter().all(|n| ids.contains(n)) {
            return list;
        }
        assert!(Instant::now() < deadline, "{names:?} never listed: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(gateway: &Gateway, path: &str, body: Value, key: Option<&str>) -> reqwest::Response {
    let mut request = http().post(format!("{}{path}", gateway.base)).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

/// A short chat request for `model` with this API key.
async fn ask(gateway: &Gateway, model: &str, key: Option<&str>) -> reqwest::Response {
    post(gateway, "/v1/chat/completions", chat(model, 4), key).await
}

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": "Name three colours."}]})
}

/// A request whose answer must be at least 4,000 characters long (the JSON schema says so),
/// so it is still being generated seconds later.
fn long_chat(model: &str) -> Value {
    let schema = json!({"type": "object", "required": ["story"],
                        "properties": {"story": {"type": "string", "minLength": 4000}}});
    json!({"model": model, "max_tokens": 4000, "stream": true,
           "messages": [{"role": "user", "content": "Tell a long story."}],
           "response_format": {"type": "json_schema",
                               "json_schema": {"name": "story", "schema": schema}}})
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"].is_string(),
        "OpenAI's error shape: {body}"
    );
    (status, body["error"].clone())
}

/// A gauge or counter of a `/metrics` page: the sum of the samples whose labels contain
/// every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn gateway_metrics(gateway: &Gateway) -> String {
    let url = format!("{}/metrics", gateway.base);
    http().get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn routes_each_model_to_its_pods_and_refuses_bad_requests_in_openai_shape() {
    let (chat_pod, embed_pod) = tokio::join!(
        ServerProcess::start(smollm2_gguf(), "smol"),
        ServerProcess::start(minilm_dir(), "minilm"),
    );
    let api = ApiServer::default();
    let spec = |served: &str| json!({"model": {"uri": "hf://org/m", "servedName": served}});
    model(&api, "chat", spec("smol"), json!({}), Phase::Ready).await;
    model(&api, "embed", spec("minilm"), json!({}), Phase::Ready).await;
    endpoints(&api, "ml", "chat", &[chat_pod.addr]).await;
    endpoints(&api, "ml", "embed", &[embed_pod.addr]).await;
    let gateway = start_gateway(&api, &[]).await;
    let list = wait_listed(&gateway, &["smol", "minilm"], None).await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["object"], "model");

    let answer: Value = post(&gateway, "/v1/chat/completions", chat("smol", 8), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "smol", "{answer}");
    assert!(answer["choices"][0]["message"]["content"].is_string());
    let body = json!({"model": "minilm", "input": ["a cat", "a dog"]});
    let embedded: Value = post(&gateway, "/v1/embeddings", body, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        embedded["data"][1]["embedding"].as_array().unwrap().len(),
        384
    );

    // Streams pass through as events, each as the pod sent it.
    let mut body = chat("smol", 16);
    body["stream"] = json!(true);
    let response = post(&gateway, "/v1/chat/completions", body, None).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    assert!(events.len() > 3, "{text}");

    let (status, error) =
        error_of(post(&gateway, "/v1/chat/completions", chat("gpt-5", 8), None).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert_eq!(error["param"], "model");
    let no_model = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (status, error) =
        error_of(post(&gateway, "/v1/chat/completions", no_model, None).await).await;
    assert_eq!(status, 400);
    assert!(
        error["message"].as_str().unwrap().contains("no `model`"),
        "{error}"
    );
    let malformed = http()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .header("content-type", "application/json")
        .body("{\"model\": \"smol\", ")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(malformed).await;
    assert_eq!(status, 400);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{error}"
    );
    let (status, _) = error_of(
        http()
            .get(format!("{}/v1/nothing", gateway.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let wrong_method = http()
        .get(format!("{}/v1/chat/completions", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let (status, error) = error_of(wrong_method).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // A body over the limit is refused from its Content-Length, before a byte of it is read.
    let mut raw = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    raw.write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: g\r\ncontent-length: 999999999\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.contains("\"type\":\"invalid_request_error\""),
        "{answer}"
    );

    let metrics = gateway_metrics(&gateway).await;
    assert!(
        sample(
            &metrics,
            "kandle_gateway_requests_total",
            &["model=\"smol\"", "code=\"200\""]
        ) >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "kandle_gateway_requests_total",
            &["model=\"-\"", "code=\"400\""]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "kandle_gateway_requests_total",
            &["model=\"-\"", "code=\"413\""]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn spreads_requests_by_load_and_retries_pods_that_refuse() {
    let (a, b) = tokio::join!(
        ServerProcess::start(smollm2_gguf(), "smol"),
        ServerProcess::start(smollm2_gguf(), "smol"),
    );
    let api = ApiServer::default();
    let spec = json!({"model": {"uri": "hf://org/m", "servedName": "smol"}});
    model(&api, "chat", spec, json!({}), Phase::Ready).await;
    let (dead, _bound) = dead_pod();
    endpoints(&api, "ml", "chat", &[a.addr, b.addr, dead]).await;
    let gateway = start_gateway(&api, &[]).await;
    wait_listed(&gateway, &["smol"], None).await;

    let requests = (0..8).map(|_| post(&gateway, "/v1/chat/completions", chat("smol", 24), None));
    for response in futures::future::join_all(requests).await {
        assert_eq!(
            response.status(),
            200,
            "the dead pod's refusals were retried elsewhere"
        );
    }
    for pod in [&a, &b] {
        let served = sample(
            &pod.metrics().await,
            "kandle_requests_total",
            &["code=\"200\""],
        );
        assert!(served >= 3.0, "{served} of 8 requests on one of two pods");
    }
    let metrics = gateway_metrics(&gateway).await;
    assert!(
        sample(
            &metrics,
            "kandle_gateway_upstream_errors_total",
            &["reason=\"connect\""]
        ) >= 1.0,
        "{metrics}"
    );

    // A spec the operator rejects (phase Failed) leaves the earlier spec's pods serving.
    let mds: kube::Api<kandle_operator::crd::ModelDeployment> =
        kube::Api::namespaced(api.client(), "ml");
    let failed = json!({"status": {"phase": "Failed"}});
    let params = kube::api::PatchParams::default();
    mds.patch_status("chat", &params, &kube::api::Patch::Merge(&failed))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask(&gateway, "smol", None).await.status(), 200);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request_on_the_pod() {
    let (pod, gateway) = smol_behind_gateway(std::future::pending()).await;
    let mut response = post(&gateway, "/v1/chat/completions", long_chat("smol"), None).await;
    assert_eq!(response.status(), 200);
    // The first events arrive while the answer is still being written: nothing is buffered.
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let in_flight = |text: &str| sample(text, "kandle_requests_in_flight", &[]);
    assert_eq!(in_flight(&pod.metrics().await), 1.0);
    drop(response);
    // At least 4,000 characters were still to come: seconds of work the pod must not do.
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight(&pod.metrics().await) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the pod still generates for a client that left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated = sample(&pod.metrics().await, "kandle_tokens_generated_total", &[]);
    assert!(
        generated < 800.0,
        "{generated} tokens generated for a client that left"
    );
}

#[tokio::test]
async fn on_shutdown_the_gateway_turns_unready_and_lets_streams_finish() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let (_pod, gateway) = smol_behind_gateway(shutdown).await;

    let mut body = chat("smol", 48);
    body["stream"] = json!(true);
    let mut streaming = post(&gateway, "/v1/chat/completions", body, None).await;
    let mut text = String::from_utf8(streaming.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    stop.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = http()
            .get(format!("{}/readyz", gateway.base))
            .send()
            .await
            .unwrap();
        if ready.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, error) = error_of(ask(&gateway, "smol", None).await).await;
    assert_eq!((status, error["code"].as_str()), (503, Some("unavailable")));
    // The stream already running ends whole, then the gateway stops.
    while let Some(chunk) = streaming.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway.task.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not stop after draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_request_for_a_model_scaled_to_zero_is_held_until_a_pod_serves_it() {
    let env = Emulated::start();
    let t = env.target();
    let gateway = start_gateway(&env.server, &[]).await;
    env.load.read_gateway(gateway.addr);
    t.create(
        "sleepy",
        json!({"model": {"uri": "hf://org/m", "servedName": "smol"},
               "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetInFlight": 4,
                               "scaleDownDelaySeconds": 0}}),
    )
    .await;
    t.wait_phase("sleepy", Phase::ScaledToZero).await;
    wait_listed(&gateway, &["smol"], None).await;

    let sent = Instant::now();
    let held = tokio::spawn({
        let url = format!("{}/v1/chat/completions", gateway.base);
        async move {
            http()
                .post(url)
                .json(&chat("smol", 8))
                .send()
                .await
                .unwrap()
        }
    });
    // The operator reads the held request as load and starts a pod (simulated kubelet).
    let deployment = t
        .wait::<Deployment>("sleepy", "scaled up", |d| {
            d.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                >= 1
        })
        .await;
    let scheduled = sent.elapsed();
    assert_eq!(deployment.spec.replicas, Some(1));
    let metrics = gateway_metrics(&gateway).await;
    let held_now = sample(
        &metrics,
        "kandle_gateway_held_requests",
        &["name=\"sleepy\""],
    );
    assert_eq!(held_now, 1.0, "{metrics}");
    assert!(!held.is_finished());
    // The pod's server loads the model, and becomes the Service's endpoint.
    let pod = ServerProcess::start(smollm2_gguf(), "smol").await;
    let loaded = sent.elapsed();
    endpoints(&env.server, "default", "sleepy", &[pod.addr]).await;
    let response = held.await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    eprintln!(
        "scale from zero: pod ready (decision and simulated scheduling) after {scheduled:?}, \
         model loaded after {loaded:?}, answered after {:?}",
        sent.elapsed()
    );
    let metrics = gateway_metrics(&gateway).await;
    assert_eq!(
        sample(
            &metrics,
            "kandle_gateway_held_requests",
            &["name=\"sleepy\""]
        ),
        0.0
    );
}

#[tokio::test]
async fn held_requests_are_bounded_in_number_and_time() {
    let api = ApiServer::default();
    let spec = json!({"model": {"uri": "hf://org/m", "servedName": "idle"}});
    model(&api, "idle", spec, json!({}), Phase::ScaledToZero).await;
    let broken = json!({"model": {"uri": "hf://org/m", "servedName": "broken"}});
    model(&api, "broken", broken, json!({}), Phase::Failed).await;
    let flags = [
        "--hold-timeout-seconds",
        "1",
        "--hold-queue",
        "1",
        "--max-body-bytes",
        "4096",
    ];
    let gateway = start_gateway(&api, &flags).await;
    wait_listed(&gateway, &["idle"], None).await;

    let first = post(&gateway, "/v1/chat/completions", chat("idle", 8), None);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        post(&gateway, "/v1/chat/completions", chat("idle", 8), None).await
    };
    let started = Instant::now();
    let (first, second) = tokio::join!(first, second);
    // The queue holds one: the second is refused at once, the first after its hold.
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "1");
    assert_eq!(error_of(second).await.1["code"], "unavailable");
    assert_eq!(first.status(), 503);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(first.headers()["retry-after"], "30");
    let (_, error) = error_of(first).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no ready replica"),
        "{error}"
    );
    // A body past the limit is refused before anything is held.
    let mut large = chat("idle", 8);
    large["messages"][0]["content"] = json!("x".repeat(5000));
    let (status, _) = error_of(post(&gateway, "/v1/chat/completions", large, None).await).await;
    assert_eq!(status, 413);
    // A model that cannot start is not waited for.
    let (status, error) =
        error_of(post(&gateway, "/v1/chat/completions", chat("broken", 8), None).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (503, Some("model_failed"))
    );
}

#[tokio::test]
async fn api_keys_choose_the_models_and_limit_the_rate_and_concurrency() {
    let pod = ServerProcess::start(smollm2_gguf(), "smol").await;
    let api = ApiServer::default();
    let spec = |served: &str| json!({"model": {"uri": "hf://org/m", "servedName": served}});
    model(
        &api,
        "smol",
        spec("smol"),
        json!({"team": "a"}),
        Phase::Ready,
    )
    .await;
    model(
        &api,
        "other",
        spec("other"),
        json!({"team": "b"}),
        Phase::ScaledToZero,
    )
    .await;
    endpoints(&api, "ml", "smol", &[pod.addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        "keys:\n\
         - {name: team-a, key: sk-team-a-1, modelSelector: {matchLabels: {team: a}}, requestsPerMinute: 3}\n\
         - {name: team-b, key: sk-team-b-1, models: [other]}\n\
         - {name: single, key: sk-single-1, maxConcurrent: 1}\n",
    )
    .unwrap();
    let gateway = start_gateway(&api, &["--api-keys-file", keys.to_str().unwrap()]).await;
    wait_listed(&gateway, &["smol"], Some("sk-team-a-1")).await;

    let models = |list: Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        models(wait_listed(&gateway, &["other"], Some("sk-team-b-1")).await),
        ["other"]
    );
    assert_eq!(
        models(wait_listed(&gateway, &[], Some("sk-team-a-1")).await),
        ["smol"]
    );

    for key in [None, Some("sk-wrong-key")] {
        let (status, error) = error_of(ask(&gateway, "smol", key).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("invalid_api_key"))
        );
    }
    let listing = http()
        .get(format!("{}/v1/models", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 401);
    let (status, error) = error_of(ask(&gateway, "smol", Some("sk-team-b-1")).await).await;
    assert_eq!(
        (status, error["type"].as_str()),
        (403, Some("permission_error"))
    );
    let (status, _) = error_of(ask(&gateway, "nope", Some("sk-team-b-1")).await).await;
    assert_eq!(status, 404);

    // Three a minute: the fourth must wait for its turn.
    for _ in 0..3 {
        let response = ask(&gateway, "smol", Some("sk-team-a-1")).await;
        assert_eq!(response.status(), 200);
    }
    let limited = ask(&gateway, "smol", Some("sk-team-a-1")).await;
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Up to 20 s, less the time the three took to answer.
    assert!((1..=20).contains(&wait), "Retry-After: {wait}");
    assert_eq!(error_of(limited).await.0, 429);

    // One at a time: a second request while a long answer streams is refused, and once the
    // first is gone the next goes through.
    let mut streaming = post(
        &gateway,
        "/v1/chat/completions",
        long_chat("smol"),
        Some("sk-single-1"),
    )
    .await;
    assert_eq!(streaming.status(), 200);
    streaming.chunk().await.unwrap();
    let (status, _) = error_of(ask(&gateway, "smol", Some("sk-single-1")).await).await;
    assert_eq!(status, 429);
    drop(streaming);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = ask(&gateway, "smol", Some("sk-single-1")).await;
        if response.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the permit was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The Secret changes (the kubelet rewrites the mounted file): the new key works soon.
    std::fs::write(
        &keys,
        "keys:\n- {name: later, key: sk-later-01, models: [smol]}\n",
    )
    .unwrap();
    wait_listed(&gateway, &["smol"], Some("sk-later-01")).await;
    let (status, _) = error_of(ask(&gateway, "smol", Some("sk-team-a-1")).await).await;
    assert_eq!(status, 401, "a key taken out of the file no longer works");
    let metrics = gateway_metrics(&gateway).await;
    assert!(!metrics.contains("sk-"), "keys never shown: {metrics}");
    assert_eq!(
        sample(
            &metrics,
            "kandle_gateway_rate_limited_total",
            &["key=\"team-a\"", "reason=\"rate\""]
        ),
        1.0
    );
}

/// Every series the chart's Grafana dashboard queries is one that kandle-server or the
/// gateway exports, by the names Prometheus sees (`_total` counters, histogram `_bucket`).
#[test]
fn the_dashboard_queries_only_metrics_kandle_exports() {
    // Families print once they have a series: one of each, as after a first request.
    let server = kandle_server::metrics::Metrics::new();
    let route = || "chat".to_string();
    let code = kandle_server::metrics::RouteCode {
        route: route(),
        code: 200,
    };
    server.requests.get_or_create(&code).inc();
    let route = kandle_server::metrics::Route { route: route() };
    server.request_duration.get_or_create(&route).observe(0.1);
    let gateway = kandle_operator::gateway::metrics::Metrics::default();
    {
        use kandle_operator::gateway::metrics::*;
        let model = || ModelLabel { model: "m".into() };
        let code = ModelCode {
            model: "m".into(),
            code: 200,
        };
        gateway.requests.get_or_create(&code).inc();
        gateway.duration.get_or_create(&model()).observe(0.1);
        gateway.in_flight.get_or_create(&model()).set(0);
        gateway.hold_wait.get_or_create(&model()).observe(0.1);
        let error = UpstreamError {
            model: "m".into(),
            reason: "connect",
        };
        gateway.upstream_errors.get_or_create(&error).inc();
        let deployment = Deployment {
            namespace: "ml".into(),
            name: "m".into(),
        };
        gateway.held.get_or_create(&deployment).set(0);
        let key = KeyReason {
            key: "k".into(),
            reason: "rate",
        };
        gateway.limited.get_or_create(&key).inc();
    }
    let pages = [server.encode(), gateway.encode()];
    let mut exported = std::collections::HashSet::new();
    for line in pages.iter().flat_map(|p| p.lines()) {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        exported.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/kandle/files/dashboard.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            queried.extend(
                words
                    .filter(|w| w.starts_with("kandle_"))
                    .map(str::to_string),
            );
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<_> = queried.iter().filter(|q| !exported.contains(*q)).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}; exported: {exported:?}"
    );
}
