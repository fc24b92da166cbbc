//! `kandle-server push` and `pull` with OCI artifacts, against a real registry on loopback
//! (Debian's `docker-registry`, the CNCF distribution), with `skopeo` as an independent
//! client.
mod common;

use common::TinyLlama;
use sha2::{Digest as _, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The password of the `kandle` user in the registry's htpasswd file (bcrypt, cost 4).
const PASSWORD: &str = "kandle-test-password";
const HTPASSWD: &str = "kandle:$2b$04$RHa6Sq0BhAY.funZMitOduUV0gpmTu8AxoczC3SgT.7K03FprqcxW";

struct Registry {
    child: Child,
    storage: tempfile::TempDir,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// A registry on loopback; with `login`, only the `kandle` user may use it.
    fn start(login: bool) -> Self {
        let storage = tempfile::tempdir().unwrap();
        // Port 0, and the address read from the registry's own log: a port picked beforehand
        // can be taken by another test in between, and a bare connect to a port nobody
        // listens on yet can connect to itself (TCP simultaneous open on loopback).
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            storage.path().join("data").display()
        );
        if login {
            std::fs::write(storage.path().join("htpasswd"), HTPASSWD).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kandle\n    path: {}\n",
                storage.path().join("htpasswd").display()
            ));
        }
        std::fs::write(storage.path().join("config.yml"), config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(storage.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start docker-registry (scripts/test installs Debian's docker-registry)");
        let (found, address) = std::sync::mpsc::channel();
        let log = BufReader::new(child.stderr.take().unwrap());
        // Reads the log to its end, so that the registry never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in log.lines().map_while(Result::ok) {
                if let Some(rest) = line.split("msg=\"listening on ").nth(1) {
                    let _ = found.send(rest.split('"').next().unwrap_or_default().to_string());
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(30))
            .expect("docker-registry did not start listening");
        Self {
            child,
            storage,
            addr,
        }
    }

    fn uri(&self, reference: &str) -> String {
        format!("oci://{}/{reference}", self.addr)
    }

    /// Where the registry keeps a blob's bytes.
    fn blob(&self, sha256: &str) -> PathBuf {
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&sha256[..2])
            .join(sha256)
            .join("data")
    }
}

fn kandle(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kandle-server"));
    cmd.args(args)
        .env_remove("OCI_USERNAME")
        .env_remove("OCI_PASSWORD");
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `kandle-server push SOURCE TARGET` with a cache of its own, and `extra` flags.
fn push_output(source: &Path, target: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    kandle(&["push"])
        .arg(source)
        .arg(target)
        .arg("--cache-dir")
        .arg(cache.path())
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A push that must succeed: the pinned URI it prints.
fn push(source: &Path, target: &str, extra: &[&str]) -> String {
    let out = push_output(source, target, extra, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn pull(uri: &str, dest: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    pull_with(uri, dest, extra, &[])
}

/// A pull with `env` set, and the report it wrote.
fn pull_with(
    uri: &str,
    dest: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Output, serde_json::Value) {
    let report = dest.with_extension("report");
    let out = kandle(&["pull", "--model", uri, "--dest"])
        .arg(dest)
        .arg("--report-file")
        .arg(&report)
        .args(["--retry-seconds", "20"])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (out, report)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The files of a folder a model is, by name (kandle's own dot files left out).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        let name = entry
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if !name.starts_with('.') {
            out.push((name, std::fs::read(&entry).unwrap()));
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A tiny Llama with a file in a subfolder, as sentence-transformers models have.
fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    TinyLlama::FAST.write(dir.path());
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(dir.path().join("1_Pooling/config.json"), "{}").unwrap();
    dir
}

fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo (scripts/test installs it)")
}

#[test]
fn a_pushed_model_is_an_artifact_other_clients_read_and_pulls_back_verified() {
    let registry = Registry::start(false);
    let model = tiny_model();
    let pinned = push(model.path(), &registry.uri("team/tiny:v1"), &[]);
    let digest = pinned
        .strip_prefix(&registry.uri("team/tiny@"))
        .unwrap_or_else(|| panic!("push printed {pinned}"));

    // skopeo reads the manifest kandle wrote: one layer per file, named by its title.
    let docker = format!("docker://{}/team/tiny:v1", registry.addr);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &docker]);
    assert!(raw.status.success(), "{}", stderr(&raw));
    assert_eq!(format!("sha256:{}", sha256_hex(&raw.stdout)), digest);
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.kandle.model.v1");
    let mut titles: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.kandle.model.file.v1");
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
        })
        .collect();
    titles.sort();
    let expected = files(model.path());
    assert_eq!(
        titles,
        expected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
    );
    // ...and copies every blob, checking each against its digest.
    let copy = tempfile::tempdir().unwrap();
    let dir = format!("dir:{}", copy.path().display());
    let out = skopeo(&["copy", "--src-tls-verify=false", &docker, &dir]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            copy.path().join(
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("sha256:")
                    .unwrap(),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["source"], model.path().to_str().unwrap());

    // Pulled by tag and by digest: the same files, the manifest digest as the revision.
    for uri in [registry.uri("team/tiny:v1"), pinned.clone()] {
        let dest = tempfile::tempdir().unwrap();
        let (out, report) = pull(&uri, &dest.path().join("m"), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(files(&dest.path().join("m")), expected);
        assert_eq!(report["revision"], digest);
        assert_eq!(report["files"], expected.len());
        assert!(report.get("unverifiedFiles").is_none(), "{report}");
    }

    // Pushing again sends no blob twice and names the same digest.
    assert_eq!(
        push(model.path(), &registry.uri("team/tiny:v2"), &[]),
        pinned
    );
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_published() {
    let registry = Registry::start(false);
    let model = tiny_model();
    push(model.path(), &registry.uri("team/tiny:v1"), &[]);
    let weights = std::fs::read(model.path().join("model.safetensors")).unwrap();
    let blob = registry.blob(&sha256_hex(&weights));
    let mut bad = weights.clone();
    bad[1000] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();

    let dest = tempfile::tempdir().unwrap();
    let (out, report) = pull(&registry.uri("team/tiny:v1"), &dest.path().join("m"), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("model.safetensors: checksum mismatch")
            && error.contains(&sha256_hex(&weights)),
        "{error}"
    );
    assert_eq!(report["transient"], false);
    assert!(!dest.path().join("m/model.safetensors").exists());
    assert!(!dest.path().join("m/.kandle-pull.json").exists());
}

#[test]
fn unknown_tags_missing_logins_and_wrong_passwords_fail_at_once_with_a_cause() {
    let open = Registry::start(false);
    let dest = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (out, report) = pull(&open.uri("team/nothing:v1"), &dest.path().join("a"), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("not found (404)"),
        "{report}"
    );

    let locked = Registry::start(true);
    let model = tiny_model();
    let target = locked.uri("team/tiny:v1");
    let out = push_output(model.path(), &target, &[], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("OCI_USERNAME"), "{}", stderr(&out));

    // A docker-registry Secret (.dockerconfigjson) as the credentials folder.
    let credentials = tempfile::tempdir().unwrap();
    let write_login = |password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("kandle:{password}"));
        let config = serde_json::json!({"auths": {&locked.addr: {"auth": auth}}});
        std::fs::write(
            credentials.path().join(".dockerconfigjson"),
            config.to_string(),
        )
        .unwrap();
    };
    let dir = credentials.path().to_str().unwrap().to_string();
    write_login(PASSWORD);
    push(model.path(), &target, &["--credentials-dir", &dir]);
    let (out, _) = pull(
        &target,
        &dest.path().join("b"),
        &["--credentials-dir", &dir],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dest.path().join("b")), files(model.path()));

    write_login("wrong");
    let (out, report) = pull(
        &target,
        &dest.path().join("c"),
        &["--credentials-dir", &dir],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("access denied (401)"), "{error}");
    assert!(!error.contains("wrong") && !stderr(&out).contains("wrong"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "permanent failures are not retried"
    );
}

/// A TCP proxy that cuts every connection after `limit` bytes from the registry.
struct Cutter {
    addr: String,
    connections: Arc<AtomicUsize>,
    bytes: Arc<AtomicU64>,
}

fn cutter(upstream: String, limit: u64) -> Cutter {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (connections, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, b) = (connections.clone(), bytes.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let (mut client_r, mut server_w) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut client_r, &mut server_w));
            let b = b.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                let mut sent = 0u64;
                while sent < limit {
                    let want = buf.len().min((limit - sent) as usize);
                    match server.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            sent += n as u64;
                            b.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    Cutter {
        addr,
        connections,
        bytes,
    }
}

#[test]
fn dropped_connections_resume_with_range_requests() {
    let registry = Registry::start(false);
    let model = tempfile::tempdir().unwrap();
    TinyLlama::SLOW.write(model.path());
    push(model.path(), &registry.uri("team/slow:v1"), &[]);
    let size = std::fs::metadata(model.path().join("model.safetensors"))
        .unwrap()
        .len();

    // Every connection dies after 4 MiB; the ~30 MiB of weights arrive all the same.
    let proxy = cutter(registry.addr.clone(), 4 << 20);
    let dest = tempfile::tempdir().unwrap();
    let (out, _) = pull(
        &format!("oci://{}/team/slow:v1", proxy.addr),
        &dest.path().join("m"),
        &["--concurrency", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dest.path().join("m")), files(model.path()));
    let connections = proxy.connections.load(Ordering::Relaxed) as u64;
    assert!(connections >= size / (4 << 20), "{connections} connections");
    // Resumed where each connection stopped, never started over.
    let sent = proxy.bytes.load(Ordering::Relaxed);
    assert!(sent < size + size / 4, "{sent} bytes sent for {size}");
}

/// Puts `registry`'s manifest `reference` back, changed by `edit`, as `tag`.
async fn edit_manifest(
    registry: &Registry,
    reference: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let client = reqwest::Client::new();
    let url = |r: &str| format!("http://{}/v2/team/tiny/manifests/{r}", registry.addr);
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let mut manifest: serde_json::Value = client
        .get(url(reference))
        .header("accept", accept)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    edit(&mut manifest);
    let media_type = manifest["mediaType"].as_str().unwrap().to_string();
    let response = client
        .put(url(tag))
        .header("content-type", media_type)
        .body(manifest.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

#[tokio::test]
async fn hostile_manifests_are_refused_before_any_file_is_written() {
    let registry = Registry::start(false);
    let model = tiny_model();
    let pinned = push(model.path(), &registry.uri("team/tiny:v1"), &[]);
    let digest = pinned.rsplit_once('@').unwrap().1.to_string();
    let retitle = |title: Option<&'static str>| {
        move |m: &mut serde_json::Value| {
            let annotations = &mut m["layers"][0]["annotations"];
            match title {
                Some(t) => annotations["org.opencontainers.image.title"] = t.into(),
                None => *annotations = serde_json::json!({}),
            }
        }
    };
    edit_manifest(&registry, "v1", "escape", retitle(Some("../escape"))).await;
    edit_manifest(&registry, "v1", "absolute", retitle(Some("/tmp/escape"))).await;
    edit_manifest(&registry, "v1", "image", retitle(None)).await;
    edit_manifest(&registry, "v1", "index", |m| {
        *m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest, "size": 1000,
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        });
    })
    .await;

    for (tag, cause) in [
        ("escape", "not a plain relative path"),
        ("absolute", "not a plain relative path"),
        ("image", "container image, not a model artifact"),
        ("index", "image index"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("m");
        let (out, report) = pull(&registry.uri(&format!("team/tiny:{tag}")), &dest, &[]);
        assert_eq!(out.status.code(), Some(3), "{tag}: {}", stderr(&out));
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains("refused") && error.contains(cause),
            "{tag}: {error}"
        );
        assert!(!root.path().join("escape").exists());
        let written: Vec<_> = walk(&dest)
            .into_iter()
            .filter(|p| {
                !p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".kandle")
            })
            .collect();
        assert!(written.is_empty(), "{tag}: {written:?}");
    }
}

/// What a token service in front of a registry knows: the tokens it gave, each with the
/// requests it may still make (tokens expire, as Docker Hub's do after five minutes).
#[derive(Default)]
struct Tokens {
    left: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    issued: AtomicUsize,
}

/// A token service in front of a registry, as Docker Hub and GHCR work: `/v2/` answers 401
/// with a Bearer challenge, `/token` gives a token good for `uses` requests for the `kandle`
/// login (with push rights only when the scope asks for them), and every other request
/// reaches the registry only with a live token. Returns its address and its tokens.
fn token_front(upstream: String, uses: usize) -> (String, Arc<Tokens>) {
    use axum::body::Body;
    use axum::extract::{Query, Request, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;
    use std::collections::HashMap;

    type Front = (String, Arc<std::sync::OnceLock<String>>, Arc<Tokens>, usize);

    async fn token(
        State((_, _, tokens, uses)): State<Front>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let login = base64::engine::general_purpose::STANDARD.encode(format!("kandle:{PASSWORD}"));
        let authorized = headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.to_str().unwrap_or_default() == format!("Basic {login}"));
        let scope_ok = q.get("scope").map(String::as_str) == Some("repository:team/tiny:pull")
            || q.get("scope").map(String::as_str) == Some("repository:team/tiny:pull,push");
        if !(authorized && scope_ok && q.get("service").map(String::as_str) == Some("kandle-test"))
        {
            return (
                StatusCode::UNAUTHORIZED,
                "{\"errors\":[{\"code\":\"DENIED\"}]}",
            )
                .into_response();
        }
        let token = format!("token-{}", tokens.issued.fetch_add(1, Ordering::SeqCst));
        tokens.left.lock().unwrap().insert(token.clone(), uses);
        axum::Json(serde_json::json!({"token": token, "expires_in": 300})).into_response()
    }

    async fn forward(
        State((upstream, realm, tokens, _)): State<Front>,
        request: Request,
    ) -> Response {
        let realm = realm.get().unwrap();
        let challenge = format!("Bearer realm=\"{realm}\",service=\"kandle-test\"");
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "))
            .map(String::from);
        let live = token.is_some_and(|t| {
            let mut left = tokens.left.lock().unwrap();
            left.get_mut(&t).is_some_and(|n| {
                let live = *n > 0;
                *n = n.saturating_sub(1);
                live
            })
        });
        if !live {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, challenge)],
            )
                .into_response();
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let (parts, body) = request.into_parts();
        let url = format!("http://{upstream}{}", parts.uri);
        let mut upstream_request = client.request(parts.method, url);
        for (name, value) in &parts.headers {
            if name != header::HOST && name != header::AUTHORIZATION {
                upstream_request = upstream_request.header(name, value);
            }
        }
        let body = reqwest::Body::wrap_stream(body.into_data_stream());
        let answer = upstream_request.body(body).send().await.unwrap();
        let mut response = Response::builder().status(answer.status().as_u16());
        for (name, value) in answer.headers() {
            // The registry's Location names it; clients must come back through here.
            let value = if name == header::LOCATION {
                value
                    .to_str()
                    .unwrap()
                    .replace(
                        &upstream,
                        realm
                            .trim_start_matches("http://")
                            .trim_end_matches("/token"),
                    )
                    .parse()
                    .unwrap()
            } else {
                value.clone()
            };
            response = response.header(name, value);
        }
        response
            .body(Body::from_stream(answer.bytes_stream()))
            .unwrap()
    }

    // The realm names the front's own address, known once it listens: the state says it.
    let realm = Arc::new(std::sync::OnceLock::new());
    let tokens = Arc::new(Tokens::default());
    let app = axum::Router::new()
        .route("/token", axum::routing::get(token))
        .fallback(forward)
        .with_state((upstream, realm.clone(), tokens.clone(), uses));
    let addr = common::hub::serve(app).to_string();
    realm.set(format!("http://{addr}/token")).unwrap();
    (addr, tokens)
}

#[test]
fn bearer_tokens_are_fetched_from_the_realm_with_the_login_and_sent_with_every_request() {
    let registry = Registry::start(false);
    let (front, _) = token_front(registry.addr.clone(), usize::MAX);
    let model = tiny_model();
    let target = format!("oci://{front}/team/tiny:v1");
    let login = [("OCI_USERNAME", "kandle"), ("OCI_PASSWORD", PASSWORD)];

    let out = push_output(model.path(), &target, &[], &login);
    assert!(out.status.success(), "{}", stderr(&out));

    let dest = tempfile::tempdir().unwrap();
    let (out, _) = pull_with(&target, &dest.path().join("m"), &[], &login);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dest.path().join("m")), files(model.path()));

    for (i, (env, hint)) in [
        (vec![], "OCI_USERNAME"),
        (
            vec![("OCI_USERNAME", "kandle"), ("OCI_PASSWORD", "wrong")],
            "cannot do this",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (out, report) = pull_with(&target, &dest.path().join(format!("n{i}")), &[], &env);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains("access denied (401)") && error.contains(hint),
            "{error}"
        );
    }
}

#[test]
fn an_expired_token_mid_pull_is_renewed_and_the_pull_goes_on() {
    let registry = Registry::start(false);
    let model = tiny_model();
    let login = [("OCI_USERNAME", "kandle"), ("OCI_PASSWORD", PASSWORD)];
    push(model.path(), &registry.uri("team/tiny:v1"), &[]);
    // Each token is good for two requests: the manifest and one blob, then one blob each.
    let (front, tokens) = token_front(registry.addr.clone(), 2);
    let dest = tempfile::tempdir().unwrap();
    let (out, report) = pull_with(
        &format!("oci://{front}/team/tiny:v1"),
        &dest.path().join("m"),
        &["--concurrency", "1"],
        &login,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files(&dest.path().join("m")), files(model.path()));
    let blobs = files(model.path()).len();
    let issued = tokens.issued.load(Ordering::SeqCst);
    assert!(
        issued >= blobs / 2 && issued <= blobs + 1,
        "{issued} tokens for {blobs} blobs: {report}"
    );
}
