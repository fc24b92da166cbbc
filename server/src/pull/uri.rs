//! Model URIs: where a model comes from.
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelUri {
    /// `hf://ORG/NAME[@REVISION]`
    Hub { repo: String, revision: String },
    /// `https://…` or `http://…`: one file.
    Url(String),
    /// `file://PATH` or a plain path.
    Local(PathBuf),
    /// `s3://BUCKET/PREFIX`
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error(
        "`{0}` is not a model URI: use hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, https://…, file://PATH or a path"
    )]
    Unknown(String),
    #[error("`{0}`: a hub model is hf://ORG/NAME or hf://ORG/NAME@REVISION")]
    BadHub(String),
    #[error(
        "`{0}`: an S3 model is s3://BUCKET/PREFIX, with a bucket name of 3 to 63 letters, digits, `.`, `-` or `_`"
    )]
    BadS3(String),
    #[error("`{0}` is not a valid URL: {1}")]
    BadUrl(String, String),
}

/// Longest hub organisation or model name the hub allows.
const MAX_HUB_NAME: usize = 96;
/// Longest revision (a branch, tag or commit) accepted.
const MAX_REVISION: usize = 255;

/// An organisation or model name as the hub allows them, which also keeps them single,
/// plain URL path segments.
fn valid_hub_name(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= MAX_HUB_NAME
        && !part.starts_with('.')
        && !part.contains("..")
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A branch, tag or commit: git's ref rules, which leave no `.`/`..` segment to climb
/// the hub's URL path with (the revision is percent-encoded as one segment as well).
fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= MAX_REVISION
        && !rev.contains("..")
        && rev
            .split('/')
            .all(|seg| !seg.is_empty() && !seg.starts_with('.'))
        && rev
            .chars()
            .all(|c| c.is_ascii_graphic() && !"~^:?*[\\@{}".contains(c))
}

/// S3's naming rules, loosely (legacy buckets may hold capitals and underscores).
fn valid_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
}

impl ModelUri {
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if let Some(rest) = s.strip_prefix("hf://") {
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            return match repo.split_once('/') {
                Some((org, name))
                    if valid_hub_name(org) && valid_hub_name(name) && valid_revision(revision) =>
                {
                    Ok(Self::Hub {
                        repo: repo.to_string(),
                        revision: revision.to_string(),
                    })
                }
                _ => Err(UriError::BadHub(s.into())),
            };
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(UriError::BadS3(s.into()));
            }
            return Ok(Self::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_end_matches('/').into(),
            });
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            let url =
                reqwest::Url::parse(s).map_err(|e| UriError::BadUrl(s.into(), e.to_string()))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(UriError::BadUrl(s.into(), "no host".into()));
            }
            return Ok(Self::Url(url.into()));
        }
        if let Some(path) = s.strip_prefix("file://") {
            return Ok(Self::Local(path.into()));
        }
        if s.contains("://") || s.is_empty() {
            return Err(UriError::Unknown(s.into()));
        }
        Ok(Self::Local(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            ModelUri::parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            ModelUri::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelUri::parse("hf://org/name@v1.0").unwrap(),
            ModelUri::Hub {
                repo: "org/name".into(),
                revision: "v1.0".into()
            }
        );
        assert_eq!(
            ModelUri::parse("s3://bucket/models/x/").unwrap(),
            ModelUri::S3 {
                bucket: "bucket".into(),
                prefix: "models/x".into()
            }
        );
        assert_eq!(
            ModelUri::parse("hf://org/name@refs/pr/1").unwrap(),
            ModelUri::Hub {
                repo: "org/name".into(),
                revision: "refs/pr/1".into()
            }
        );
        assert_eq!(
            ModelUri::parse("https://h/m.gguf").unwrap(),
            ModelUri::Url("https://h/m.gguf".into())
        );
        assert_eq!(
            ModelUri::parse("file:///m").unwrap(),
            ModelUri::Local("/m".into())
        );
        assert_eq!(
            ModelUri::parse("./m").unwrap(),
            ModelUri::Local("./m".into())
        );
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "hf://justname",
            "hf://a/b@",
            "hf://../x/y",
            "hf://../..",
            "hf://a/..",
            "hf://a/b@../../x",
            "hf://a/b@main/../x",
            "hf://a/b@a b",
            "gs://b/p",
            "s3://",
            "s3://a b/x",
            "s3://ab/x",
            "s3://-bucket/x",
            "https://",
            "https://[::1",
            "https://h:99999/m.gguf",
            "",
        ] {
            assert!(ModelUri::parse(bad).is_err(), "{bad}");
        }
    }
}
