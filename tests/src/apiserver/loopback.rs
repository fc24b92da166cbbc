//! The emulated API server on a loopback port, with a kubeconfig pointing at it, so the
//! real `kandle-operator` binary (or kubectl-free tooling) can run against it.
use super::ApiServer;
use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub struct Listening {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
}

/// Serves `server` on 127.0.0.1 and writes a kubeconfig for it into `dir`.
pub async fn serve(server: ApiServer, dir: &Path) -> std::io::Result<Listening> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let server = server.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let request = Request::from_parts(parts, kube::client::Body::from(bytes));
            server.handle(request).await.map(Body::new)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulated\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: emulated\n  context:\n    cluster: emulated\n    user: nobody\n    namespace: default\ncurrent-context: emulated\nusers:\n- name: nobody\n  user: {{}}\n"
        ),
    )?;
    Ok(Listening { addr, kubeconfig })
}

/// A plain HTTP/1.1 GET on loopback: the status code and the body.
pub async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}
