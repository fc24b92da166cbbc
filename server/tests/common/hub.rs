//! A hub-like HTTP server on loopback: the model-info and resolve routes of the Hugging Face
//! hub, with Range requests, ETag / X-Linked-Etag / X-Repo-Commit headers, a gated repo, and
//! faults to inject per file.
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Files above this size are served as LFS files (with a sha256), like the hub does.
const LFS_THRESHOLD: usize = 1024;

#[derive(Default)]
pub struct Repo {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Only `Authorization: Bearer TOKEN` may read it.
    pub token: Option<String>,
    /// A hostile hub's listing: these entries instead of the files' true ones.
    pub listing: Option<Vec<serde_json::Value>>,
}

impl Repo {
    /// The listing entry the hub publishes for `path`: size, git blob id, and for large
    /// files the LFS sha256.
    pub fn entry(path: &str, data: &[u8]) -> serde_json::Value {
        let mut s =
            serde_json::json!({"rfilename": path, "size": data.len(), "blobId": git_blob_id(data)});
        if data.len() > LFS_THRESHOLD {
            s["lfs"] = serde_json::json!({"sha256": sha256_hex(data), "size": data.len(), "pointerSize": 134});
        }
        s
    }
}

#[derive(Default, Clone)]
pub struct Faults {
    /// Answer 503 this many times.
    pub unavailable: u32,
    /// Close the connection after this many body bytes, this many times.
    pub drop_after: Option<(usize, u32)>,
    /// Flip a byte of the body this many times.
    pub corrupt: u32,
    /// Send the body in 16 KiB pieces with this pause between them.
    pub throttle: Option<Duration>,
    /// Answer every request with the whole file, as servers without range support do.
    pub ignore_ranges: bool,
    /// Send no Content-Length (a chunked body of unannounced size).
    pub no_length: bool,
}

impl Faults {
    pub fn unavailable(times: u32) -> Self {
        Self {
            unavailable: times,
            ..Self::default()
        }
    }

    pub fn corrupt(times: u32) -> Self {
        Self {
            corrupt: times,
            ..Self::default()
        }
    }

    pub fn drop_after(bytes: usize, times: u32) -> Self {
        Self {
            drop_after: Some((bytes, times)),
            ..Self::default()
        }
    }

    pub fn ignoring_ranges(self) -> Self {
        Self {
            ignore_ranges: true,
            ..self
        }
    }

    /// Paces the body: a pause before each 16 KiB piece.
    pub fn throttled(self, pause_ms: u64) -> Self {
        Self {
            throttle: Some(Duration::from_millis(pause_ms)),
            ..self
        }
    }
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Default)]
pub struct Hub {
    pub repos: Mutex<HashMap<String, Repo>>,
    pub faults: Mutex<HashMap<String, Faults>>,
    pub hits: Mutex<Vec<Hit>>,
}

impl Hub {
    pub fn add_repo(&self, name: &str, repo: Repo) {
        self.repos.lock().unwrap().insert(name.to_string(), repo);
    }

    pub fn fault(&self, file: &str, faults: Faults) {
        self.faults.lock().unwrap().insert(file.to_string(), faults);
    }

    /// Resolve requests for a file, in order.
    pub fn hits_for(&self, file: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == file)
            .cloned()
            .collect()
    }

    pub fn resolve_hits(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

/// Starts the hub on a loopback port, on its own runtime thread; returns its URL.
pub fn start(hub: Arc<Hub>) -> String {
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(info))
        .route("/{org}/{name}/resolve/{rev}/{*path}", get(resolve))
        .with_state(hub);
    format!("http://{}", serve(app))
}

/// Serves `app` on a loopback port, on a runtime thread of its own; returns the address.
pub fn serve(app: Router) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

fn authorized(repo: &Repo, headers: &HeaderMap) -> bool {
    repo.token.as_ref().is_none_or(|t| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {t}"))
    })
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn git_blob_id(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex::encode(h.finalize())
}

async fn info(
    State(hub): State<Arc<Hub>>,
    Path((org, name, _rev)): Path<(String, String, String)>,
    Query(_q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let repos = hub.repos.lock().unwrap();
    let Some(repo) = repos.get(&format!("{org}/{name}")) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if !authorized(repo, &headers) {
        return (StatusCode::UNAUTHORIZED, "gated").into_response();
    }
    let siblings: Vec<serde_json::Value> = repo.listing.clone().unwrap_or_else(|| {
        repo.files
            .iter()
            .map(|(path, data)| Repo::entry(path, data))
            .collect()
    });
    axum::Json(serde_json::json!({"id": format!("{org}/{name}"), "sha": repo.commit, "siblings": siblings})).into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((org, name, _rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (status, response) = answer(
        &hub,
        &format!("{org}/{name}"),
        &path,
        range.as_deref(),
        &headers,
    );
    hub.hits.lock().unwrap().push(Hit {
        path,
        range,
        status,
    });
    response
}

fn answer(
    hub: &Hub,
    repo_name: &str,
    path: &str,
    range: Option<&str>,
    headers: &HeaderMap,
) -> (u16, Response) {
    let repos = hub.repos.lock().unwrap();
    let Some(repo) = repos.get(repo_name) else {
        return (404, StatusCode::NOT_FOUND.into_response());
    };
    if !authorized(repo, headers) {
        return (401, StatusCode::UNAUTHORIZED.into_response());
    }
    let Some(data) = repo.files.get(path) else {
        return (404, StatusCode::NOT_FOUND.into_response());
    };
    let mut faults = hub.faults.lock().unwrap();
    let fault = faults.entry(path.to_string()).or_default();
    if fault.unavailable > 0 {
        fault.unavailable -= 1;
        return (503, StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    let range = range.filter(|_| !fault.ignore_ranges);
    // `bytes=START-` or `bytes=START-END` (inclusive).
    let (start, end) = match range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
    {
        Some((a, b)) => (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>()
                .map_or(data.len(), |e| (e + 1).min(data.len())),
        ),
        None => (0, data.len()),
    };
    if start > data.len() || start > end {
        return (416, StatusCode::RANGE_NOT_SATISFIABLE.into_response());
    }
    let mut body = data[start..end].to_vec();
    if fault.corrupt > 0 && !body.is_empty() {
        fault.corrupt -= 1;
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let drop_after = match &mut fault.drop_after {
        Some((bytes, times)) if *times > 0 => {
            *times -= 1;
            Some(*bytes)
        }
        _ => None,
    };
    let throttle = fault.throttle;
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let total = data.len();
    let etag = if total > LFS_THRESHOLD {
        sha256_hex(data)
    } else {
        git_blob_id(data)
    };
    let stream = async_stream::stream! {
        let mut sent = 0;
        for piece in body.chunks(16 * 1024) {
            if let Some(limit) = drop_after
                && sent + piece.len() > limit
            {
                yield Ok(Bytes::copy_from_slice(&piece[..limit - sent]));
                yield Err(std::io::Error::other("connection dropped by fault injection"));
                return;
            }
            if let Some(pause) = throttle {
                tokio::time::sleep(pause).await;
            }
            sent += piece.len();
            yield Ok::<_, std::io::Error>(Bytes::copy_from_slice(piece));
        }
    };
    let mut response = Response::builder().status(status);
    if !fault.no_length {
        response = response.header(header::CONTENT_LENGTH, end - start);
    }
    response = response
        .header(header::ETAG, format!("\"{etag}\""))
        .header("x-linked-etag", format!("\"{etag}\""))
        .header("x-linked-size", total)
        .header("x-repo-commit", &repo.commit)
        .header(header::ACCEPT_RANGES, "bytes");
    if range.is_some() {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", end - 1),
        );
    }
    (
        status.as_u16(),
        response.body(Body::from_stream(stream)).unwrap(),
    )
}
