//! The Hugging Face hub: a revision resolved to its commit, and its files with the sizes
//! and hashes the hub publishes (sha256 for LFS files, git blob ids for the rest).
use super::error::PullError;
use super::fetch::{Digest, RemoteFile};
use reqwest::header::AUTHORIZATION;
use serde::Deserialize;

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

pub struct Listing {
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").map_or_else(
        |_| "https://huggingface.co".into(),
        |e| e.trim_end_matches('/').to_string(),
    )
}

pub async fn list(
    client: &reqwest::Client,
    token: Option<&str>,
    repo: &str,
    revision: &str,
) -> Result<Listing, PullError> {
    let endpoint = endpoint();
    let uri = format!("hf://{repo}@{revision}");
    let url = format!("{endpoint}/api/models/{repo}/revision/{revision}?blobs=true");
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = request.send().await.map_err(|e| PullError::Network {
        uri: uri.clone(),
        message: e.to_string(),
    })?;
    if !response.status().is_success() {
        return Err(PullError::from_status(
            &uri,
            response.status().as_u16(),
            token.is_some(),
        ));
    }
    let info: RepoInfo = response.json().await.map_err(|e| PullError::Protocol {
        uri: uri.clone(),
        message: e.to_string(),
    })?;
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let (size, digest) = match s.lfs {
                Some(lfs) => (Some(lfs.size), Some(Digest::Sha256(lfs.sha256))),
                None => (s.size, s.blob_id.map(Digest::GitBlobSha1)),
            };
            RemoteFile {
                object: None,
                url: format!("{endpoint}/{repo}/resolve/{}/{}", info.sha, s.rfilename),
                path: s.rfilename,
                size,
                digest,
            }
        })
        .collect();
    Ok(Listing {
        commit: info.sha,
        files,
    })
}
