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

/// A listing is a few KiB per file; a larger answer is not a hub's.
const MAX_LISTING_BYTES: usize = 16 << 20;

pub struct Listing {
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

/// What to do about a 401 or 403 from the hub.
pub fn denied_hint(has_token: bool) -> &'static str {
    if has_token {
        "; the token in HF_TOKEN cannot read this model"
    } else {
        "; the model may be gated or private: set HF_TOKEN"
    }
}

pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").map_or_else(
        |_| "https://huggingface.co".into(),
        |e| e.trim_end_matches('/').to_string(),
    )
}

/// `endpoint` with `segments` appended, each percent-encoded as one path segment.
fn url(endpoint: &str, uri: &str, segments: &[&str]) -> Result<reqwest::Url, PullError> {
    let mut url = reqwest::Url::parse(endpoint).map_err(|e| PullError::Refused {
        uri: uri.into(),
        reason: format!("HF_ENDPOINT `{endpoint}` is not a URL: {e}"),
    })?;
    url.path_segments_mut()
        .map_err(|()| PullError::Refused {
            uri: uri.into(),
            reason: format!("HF_ENDPOINT `{endpoint}` cannot take a path"),
        })?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

pub async fn list(
    client: &reqwest::Client,
    token: Option<&str>,
    repo: &str,
    revision: &str,
) -> Result<Listing, PullError> {
    let endpoint = endpoint();
    let uri = format!("hf://{repo}@{revision}");
    let (org, name) = repo.split_once('/').unwrap_or((repo, ""));
    let mut listing = url(
        &endpoint,
        &uri,
        &["api", "models", org, name, "revision", revision],
    )?;
    listing.set_query(Some("blobs=true"));
    let mut request = client.get(listing);
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
            denied_hint(token.is_some()),
        ));
    }
    let body = super::fetch::bounded_body(&uri, response, MAX_LISTING_BYTES).await?;
    let info = parse_listing(&uri, &body)?;
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let (size, digest) = match s.lfs {
                Some(lfs) => (Some(lfs.size), Some(Digest::Sha256(lfs.sha256))),
                None => (s.size, s.blob_id.map(Digest::GitBlobSha1)),
            };
            let mut segments = vec![org, name, "resolve", info.sha.as_str()];
            segments.extend(s.rfilename.split('/'));
            Ok(RemoteFile {
                object: None,
                url: url(&endpoint, &uri, &segments)?.into(),
                path: s.rfilename,
                size,
                digest,
            })
        })
        .collect::<Result<_, PullError>>()?;
    Ok(Listing {
        commit: info.sha,
        files,
    })
}

/// A listing's bytes as the hub's JSON, its commit a real git id (it goes into URLs and
/// the marker).
fn parse_listing(uri: &str, body: &[u8]) -> Result<RepoInfo, PullError> {
    let info: RepoInfo = serde_json::from_slice(body).map_err(|e| PullError::Protocol {
        uri: uri.into(),
        message: e.to_string(),
    })?;
    if !(info.sha.len() == 40 && info.sha.chars().all(|c| c.is_ascii_hexdigit())) {
        return Err(PullError::Protocol {
            uri: uri.into(),
            message: format!(
                "the commit `{}` is not a git commit id",
                info.sha.escape_debug()
            ),
        });
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn file_names_are_encoded_as_path_segments() {
        let u = url(
            "http://h:1/",
            "u",
            &["o", "n", "resolve", "c", "a b", "x?y#z"],
        )
        .unwrap();
        assert_eq!(u.as_str(), "http://h:1/o/n/resolve/c/a%20b/x%3Fy%23z");
        let u = url("http://h:1/mirror", "u", &["api", "refs/pr/1"]).unwrap();
        assert_eq!(u.as_str(), "http://h:1/mirror/api/refs%2Fpr%2F1");
    }

    proptest! {
        /// Any bytes a hub sends give a listing or an error, never a panic.
        #[test]
        fn any_listing_parses_or_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_listing("hf://o/n", &body);
        }

        #[test]
        fn listings_shaped_like_the_hubs_parse_or_fail_cleanly(
            sha in "[0-9a-f]{0,41}",
            name in "\\PC{0,40}",
            size in proptest::option::of(any::<u64>()),
        ) {
            let body = serde_json::json!({
                "sha": sha,
                "siblings": [{"rfilename": name, "size": size, "blobId": "ab"}],
            });
            let parsed = parse_listing("hf://o/n", body.to_string().as_bytes());
            prop_assert_eq!(parsed.is_ok(), sha.len() == 40);
        }
    }
}
