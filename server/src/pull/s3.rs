//! S3 and S3-compatible stores, configured by the usual AWS variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
use super::credentials::Credentials;
use super::error::PullError;
use super::fetch::{Digest, RemoteFile, s3_error};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ObjectStore, RetryConfig};
use std::collections::HashSet;
use std::sync::Arc;

/// More objects than any model folder holds: the listing is bounded like the hub's.
const MAX_OBJECTS: usize = 10_000;

pub async fn list(
    bucket: &str,
    prefix: &str,
    credentials: &Credentials,
) -> Result<Vec<RemoteFile>, PullError> {
    let uri = format!("s3://{bucket}/{prefix}");
    let endpoint = credentials.get("AWS_ENDPOINT_URL").unwrap_or_default();
    let mut builder = AmazonS3Builder::from_env();
    // Keys given as files, read the way object_store reads the environment's.
    for (key, value) in credentials.aws_files() {
        if let Ok(key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(key, value);
        }
    }
    let store = builder
        .with_bucket_name(bucket)
        .with_allow_http(endpoint.starts_with("http://"))
        // The pull's own retry policy applies; one policy, one budget.
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .build()
        .map_err(|e| PullError::Unsupported(format!("{uri}: {e}")))?;
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let base = object_store::path::Path::from(prefix);
    let objects: Vec<_> = store
        .list(Some(&base))
        .take(MAX_OBJECTS + 1)
        .try_collect()
        .await
        .map_err(|e| s3_error(&uri, e))?;
    if objects.len() > MAX_OBJECTS {
        return Err(PullError::Refused {
            uri,
            reason: format!(
                "more than {MAX_OBJECTS} objects under the prefix; name the model's own folder"
            ),
        });
    }
    let strip = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    if let Some(meta) = objects.iter().find(|m| m.e_tag.is_none()) {
        return Err(PullError::Refused {
            uri,
            reason: format!("object `{}` has no ETag to check it by", meta.location),
        });
    }
    // Consoles create zero-byte `folder/` markers, which object_store lists as `folder`:
    // they are not files, and one would stand where the folder must go.
    let folders: HashSet<&str> = objects
        .iter()
        .flat_map(|m| {
            let key = m.location.as_ref();
            key.match_indices('/').map(move |(i, _)| &key[..i])
        })
        .collect();
    let markers: HashSet<String> = objects
        .iter()
        .filter(|m| m.size == 0 && folders.contains(m.location.as_ref()))
        .map(|m| m.location.to_string())
        .collect();
    Ok(objects
        .into_iter()
        .filter(|meta| !markers.contains(meta.location.as_ref()))
        .filter_map(|meta| {
            let key = meta.location.to_string();
            let path = key.strip_prefix(&strip)?.to_string();
            // A single-part upload's ETag is the MD5 of the content; a multipart one's is
            // not, so such files are checked by size alone and reported unverified.
            let digest = meta
                .e_tag
                .as_deref()
                .map(|t| t.trim_matches('"'))
                .filter(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
                .map(|t| Digest::Md5(t.to_lowercase()));
            Some(RemoteFile {
                url: format!("s3://{bucket}/{key}"),
                object: Some((store.clone(), meta.location)),
                path,
                size: Some(meta.size),
                digest,
            })
        })
        .collect())
}
