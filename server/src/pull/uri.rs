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
    #[error("`{0}`: an S3 model is s3://BUCKET/PREFIX")]
    BadS3(String),
}

impl ModelUri {
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if let Some(rest) = s.strip_prefix("hf://") {
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let valid = |part: &str| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            return match repo.split_once('/') {
                Some((org, name)) if valid(org) && valid(name) && !revision.is_empty() => {
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
            if bucket.is_empty() {
                return Err(UriError::BadS3(s.into()));
            }
            return Ok(Self::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_end_matches('/').into(),
            });
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return Ok(Self::Url(s.into()));
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
            "gs://b/p",
            "s3://",
            "",
        ] {
            assert!(ModelUri::parse(bad).is_err(), "{bad}");
        }
    }
}
