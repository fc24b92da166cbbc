//! Credentials for the pull: read from a folder of files (a Kubernetes Secret mounted as a
//! volume, one file per key, so they never sit in the process environment where `/proc`
//! shows them), else from the environment. Values never reach logs or `Debug` output.
use super::error::PullError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a folder still waiting for its Secret is looked at again.
const POLL: Duration = Duration::from_secs(2);

/// Where the credentials come from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// A folder of credential files, read before the environment.
    pub dir: Option<PathBuf>,
    /// The Secret `dir` mounts. A Secret that does not exist mounts (`optional: true`) as an
    /// empty folder that the kubelet fills once it is created, so an empty folder is looked
    /// at again for `wait` before the pull reports the Secret missing.
    pub secret: Option<String>,
    pub wait: Duration,
}

impl Source {
    pub async fn load(&self) -> Result<Credentials, PullError> {
        let (Some(dir), Some(secret)) = (&self.dir, &self.secret) else {
            return Credentials::load(self.dir.as_deref());
        };
        let deadline = Instant::now() + self.wait;
        loop {
            if dir.exists() {
                let found = Credentials::load(Some(dir))?;
                if !found.files.is_empty() {
                    return Ok(found);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PullError::MissingSecret {
                    name: secret.clone(),
                    waited: self.wait.as_secs(),
                });
            }
            tokio::time::sleep(POLL.min(left)).await;
        }
    }
}

/// A Secret's value is at most 1 MiB; a credential far less.
const MAX_VALUE_BYTES: u64 = 64 << 10;
/// More keys than any credentials Secret holds: the folder is not one.
const MAX_KEYS: usize = 64;

#[derive(Clone, Default)]
pub struct Credentials {
    /// From files, by key (the file's name).
    files: BTreeMap<String, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("keys", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// The keys of `dir` (none when `dir` is `None`). Kubernetes' own entries (`..data`,
    /// the timestamped folder) start with two dots and are skipped; a docker-registry
    /// Secret's one key is `.dockerconfigjson`.
    pub fn load(dir: Option<&Path>) -> Result<Self, PullError> {
        let Some(dir) = dir else {
            return Ok(Self::default());
        };
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(PullError::io(dir))? {
            let entry = entry.map_err(PullError::io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with("..") || !path.is_file() {
                continue;
            }
            if files.len() == MAX_KEYS {
                return Err(PullError::Unsupported(format!(
                    "{}: more than {MAX_KEYS} credential files",
                    dir.display()
                )));
            }
            let len = std::fs::metadata(&path)
                .map_err(PullError::io(&path))?
                .len();
            if len > MAX_VALUE_BYTES {
                return Err(PullError::Unsupported(format!(
                    "{}: a credential of {len} bytes; at most {MAX_VALUE_BYTES}",
                    path.display()
                )));
            }
            let value = std::fs::read_to_string(&path).map_err(PullError::io(&path))?;
            files.insert(name, value.trim().to_string());
        }
        Ok(Self { files })
    }

    /// `key`'s value: its file, else the environment variable of that name; empty is none.
    pub fn get(&self, key: &str) -> Option<String> {
        self.files
            .get(key)
            .cloned()
            .or_else(|| std::env::var(key).ok())
            .filter(|v| !v.is_empty())
    }

    /// The login for an OCI registry (`host[:port]`): `OCI_USERNAME` and `OCI_PASSWORD`, else
    /// the registry's entry in `.dockerconfigjson` (a `kubernetes.io/dockerconfigjson`
    /// Secret, the kind image pull secrets are).
    pub fn registry_login(&self, registry: &str) -> Result<Option<(String, String)>, PullError> {
        if let (Some(user), Some(password)) = (self.get("OCI_USERNAME"), self.get("OCI_PASSWORD")) {
            return Ok(Some((user, password)));
        }
        let Some(json) = self.files.get(DOCKER_CONFIG) else {
            return Ok(None);
        };
        docker_login(json, registry)
            .map_err(|e| PullError::Unsupported(format!("credentials: {DOCKER_CONFIG}: {e}")))
    }

    /// The `AWS_*` keys given as files (the environment's are read by object_store).
    pub fn aws_files(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

const DOCKER_CONFIG: &str = ".dockerconfigjson";

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    username: Option<String>,
    password: Option<String>,
    /// base64 of `user:password`
    auth: Option<String>,
}

/// `registry`'s login in a docker config, its keys matched by host (`https://` and paths,
/// as old Docker wrote them, ignored). Errors never quote the file: it holds passwords.
fn docker_login(json: &str, registry: &str) -> Result<Option<(String, String)>, String> {
    use base64::Engine as _;
    let config: DockerConfig = serde_json::from_str(json)
        .map_err(|e| format!("not a docker config (line {})", e.line()))?;
    let host = |key: &str| {
        let key = key.split_once("://").map_or(key, |(_, rest)| rest);
        key.split('/').next().unwrap_or(key).to_ascii_lowercase()
    };
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| host(k) == registry)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Some((user.clone(), password.clone())));
    }
    let Some(auth) = &entry.auth else {
        return Err(format!(
            "the entry for {registry} has neither auth nor username and password"
        ));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| format!("the auth of {registry} is not base64 of user:password"))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| format!("the auth of {registry} is not base64 of user:password"))?;
    Ok(Some((user.into(), password.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_win_over_the_environment_and_debug_shows_no_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("HF_TOKEN"), "hf_from_file\n").unwrap();
        std::fs::write(dir.path().join("AWS_ACCESS_KEY_ID"), "AKIA").unwrap();
        std::fs::create_dir(dir.path().join("..2026_12_01")).unwrap();
        let c = Credentials::load(Some(dir.path())).unwrap();
        assert_eq!(c.get("HF_TOKEN").as_deref(), Some("hf_from_file"));
        assert_eq!(
            c.aws_files().collect::<Vec<_>>(),
            [("AWS_ACCESS_KEY_ID", "AKIA")]
        );
        let debug = format!("{c:?}");
        assert!(
            debug.contains("HF_TOKEN") && !debug.contains("hf_from_file"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn a_named_secret_is_waited_for_then_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let source = Source {
            dir: Some(dir.path().join("credentials")),
            secret: Some("hf-token".into()),
            wait: Duration::from_millis(100),
        };
        let e = source.load().await.unwrap_err();
        assert!(matches!(e, PullError::MissingSecret { .. }));
        assert!(
            e.to_string().contains("secret \"hf-token\" not found"),
            "{e}"
        );
        assert_eq!(e.exit_code(), kandle_contract::pull::EXIT_MISSING_SECRET);

        // The kubelet fills the folder once the Secret exists.
        let filled = Source {
            wait: Duration::from_secs(30),
            ..source
        };
        let writer = tokio::spawn({
            let dir = dir.path().join("credentials");
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::create_dir(&dir).unwrap();
                std::fs::write(dir.join("HF_TOKEN"), "hf_late").unwrap();
            }
        });
        let c = filled.load().await.unwrap();
        writer.await.unwrap();
        assert_eq!(c.get("HF_TOKEN").as_deref(), Some("hf_late"));
    }

    #[test]
    fn registry_logins_come_from_a_docker_config_matched_by_host() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(".dockerconfigjson"),
            r#"{"auths": {
                "https://reg.example:5000/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                "other.example": {"username": "u2", "password": "p2"}
            }}"#,
        )
        .unwrap();
        let c = Credentials::load(Some(dir.path())).unwrap();
        assert_eq!(
            c.registry_login("reg.example:5000").unwrap(),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(
            c.registry_login("other.example").unwrap(),
            Some(("u2".into(), "p2".into()))
        );
        assert_eq!(c.registry_login("reg.example").unwrap(), None);

        std::fs::write(
            dir.path().join(".dockerconfigjson"),
            r#"{"auths": {"reg.example": {"auth": "not base64 secret"}}}"#,
        )
        .unwrap();
        let c = Credentials::load(Some(dir.path())).unwrap();
        let e = c.registry_login("reg.example").unwrap_err().to_string();
        assert!(e.contains("not base64") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn oversized_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("HF_TOKEN"), vec![b'a'; 70 << 10]).unwrap();
        assert!(Credentials::load(Some(dir.path())).is_err());
    }
}
