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
    /// `oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]`: an OCI artifact, one file a layer.
    Oci(OciRef),
}

/// An artifact in a registry, every part checked against the distribution spec's grammar
/// (they go into URLs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host[:port]`
    pub registry: String,
    pub repository: String,
    /// A tag, or a digest (`sha256:…`).
    pub reference: String,
}

impl OciRef {
    pub fn is_digest(&self) -> bool {
        self.reference.starts_with("sha256:")
    }

    /// Registries on this machine speak plain HTTP, as Docker and containerd assume.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.is_digest() { '@' } else { ':' };
        write!(
            f,
            "oci://{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error(
        "`{0}` is not a model URI: use hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, oci://REGISTRY/REPOSITORY[:TAG], https://…, file://PATH or a path"
    )]
    Unknown(String),
    #[error("`{0}`: a hub model is hf://ORG/NAME or hf://ORG/NAME@REVISION")]
    BadHub(String),
    #[error(
        "`{0}`: an S3 model is s3://BUCKET/PREFIX, with a bucket name of 3 to 63 letters, digits, `.`, `-` or `_`"
    )]
    BadS3(String),
    #[error(
        "`{0}`: an OCI artifact is oci://REGISTRY/REPOSITORY[:TAG] or oci://REGISTRY/REPOSITORY@sha256:DIGEST, the repository in lower case"
    )]
    BadOci(String),
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

/// `host[:port]`: letters, digits, `.`, `-`, or a bracketed IPv6 address.
fn valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !registry.ends_with(']') => {
            (host, Some(port))
        }
        _ => (registry, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'))
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
    };
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// The distribution spec's repository name: lower-case components joined by `/`, each
/// alphanumeric runs separated by `.`, `_`, `__` or dashes.
fn valid_repository(repository: &str) -> bool {
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
            && !c.contains("..")
            && !c.contains("._")
            && !c.contains("_.")
            && !c.contains("___")
            && !c.contains(".-")
            && !c.contains("-.")
            && !c.contains("_-")
            && !c.contains("-_")
    };
    repository.len() <= 255 && repository.split('/').all(component)
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

pub(super) fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    })
}

fn parse_oci(s: &str, rest: &str) -> Result<OciRef, UriError> {
    let bad = || UriError::BadOci(s.into());
    let (registry, path) = rest.split_once('/').ok_or_else(bad)?;
    let (repository, reference) = if let Some((repo, digest)) = path.split_once('@') {
        (repo, digest.to_string())
    } else {
        // A colon after the last slash starts the tag.
        match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_string()),
            _ => (path, "latest".to_string()),
        }
    };
    let reference_ok = if reference.contains(':') {
        valid_digest(&reference)
    } else {
        valid_tag(&reference)
    };
    if !(valid_registry(registry) && valid_repository(repository) && reference_ok) {
        return Err(bad());
    }
    Ok(OciRef {
        registry: registry.to_ascii_lowercase(),
        repository: repository.into(),
        reference,
    })
}

impl ModelUri {
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if let Some(rest) = s.strip_prefix("oci://") {
            return parse_oci(s, rest).map(Self::Oci);
        }
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
        let oci = |registry: &str, repository: &str, reference: &str| {
            ModelUri::Oci(OciRef {
                registry: registry.into(),
                repository: repository.into(),
                reference: reference.into(),
            })
        };
        assert_eq!(
            ModelUri::parse("oci://localhost:5000/models/tiny:v1").unwrap(),
            oci("localhost:5000", "models/tiny", "v1")
        );
        assert_eq!(
            ModelUri::parse("oci://ghcr.io/org/m").unwrap(),
            oci("ghcr.io", "org/m", "latest")
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        let uri = format!("oci://[::1]:5000/a/b_c@{digest}");
        let ModelUri::Oci(parsed) = ModelUri::parse(&uri).unwrap() else {
            panic!("{uri}")
        };
        assert_eq!(
            parsed,
            OciRef {
                registry: "[::1]:5000".into(),
                repository: "a/b_c".into(),
                reference: digest,
            }
        );
        assert_eq!(parsed.to_string(), uri);
        assert!(parsed.is_loopback());
        for (registry, loopback) in [
            ("localhost", true),
            ("127.0.0.2:80", true),
            ("reg.example:5000", false),
            ("10.0.0.1", false),
        ] {
            let r = OciRef {
                registry: registry.into(),
                repository: "m".into(),
                reference: "latest".into(),
            };
            assert_eq!(r.is_loopback(), loopback, "{registry}");
        }
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
            "oci://",
            "oci://reg",
            "oci://reg/",
            "oci://reg/Upper",
            "oci://reg/a//b",
            "oci://reg/../x",
            "oci://reg/a/..",
            "oci://reg/a:",
            "oci://reg/a:.tag",
            "oci://reg/a@sha256:short",
            "oci://reg/a@md5:00",
            "oci://reg:0/a",
            "oci://reg:99999/a",
            "oci://re g/a",
            "oci://user@reg/a",
            "oci://reg/a?x=1",
            "oci://reg/a#f",
            "https://",
            "https://[::1",
            "https://h:99999/m.gguf",
            "",
        ] {
            assert!(ModelUri::parse(bad).is_err(), "{bad}");
        }
    }
}
