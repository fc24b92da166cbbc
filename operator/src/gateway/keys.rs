//! API keys: a file (a Secret's key mounted into the gateway) mapping each key to the models
//! it may call and its limits. Keys are kept only as SHA-256 digests and never logged; a
//! key is known to logs and metrics by its `name`.
//!
//! ```yaml
//! keys:
//!   - name: team-a            # shown in logs and metrics
//!     key: sk-team-a-secret   # what clients send as `Authorization: Bearer …`
//!     models: [llama-3-8b]    # served names it may call …
//!     modelSelector:          # … and/or ModelDeployments with these labels
//!       matchLabels: {team: a}
//!     requestsPerMinute: 600  # 429 past this (a minute's worth may come at once)
//!     maxConcurrent: 16       # 429 past this many at once
//! ```
//! A key with neither `models` nor `modelSelector` may call every model.
use super::table::Model;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A keys file is a few KiB; past this it is not one.
const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    keys: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    key: String,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    model_selector: Option<Selector>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    max_concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// One key's rights and its live limits.
pub struct Tenant {
    pub name: String,
    models: Option<Vec<String>>,
    selector: Option<BTreeMap<String, String>>,
    rate: Option<Mutex<Bucket>>,
    max_concurrent: Option<usize>,
    in_flight: Arc<AtomicUsize>,
}

/// Why a tenant's request may not go now: come back after this long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limited {
    Rate(Duration),
    Concurrency,
}

/// A request counted against its tenant's concurrency until dropped.
pub struct Permit(Option<Arc<AtomicUsize>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Tenant {
    /// Whether this key may call `model` (and see it in `/v1/models`).
    pub fn may_call(&self, model: &Model) -> bool {
        if self.models.is_none() && self.selector.is_none() {
            return true;
        }
        let named = self
            .models
            .as_ref()
            .is_some_and(|m| m.contains(&model.served));
        let selected = self
            .selector
            .as_ref()
            .is_some_and(|s| s.iter().all(|(k, v)| model.labels.get(k) == Some(v)));
        named || selected
    }

    /// Takes one request's share of the limits, or says when to come back.
    pub fn admit(&self, now: Instant) -> Result<Permit, Limited> {
        let permit = match self.max_concurrent {
            Some(max) => {
                let previous = self.in_flight.fetch_add(1, Ordering::AcqRel);
                let permit = Permit(Some(self.in_flight.clone()));
                if previous >= max {
                    return Err(Limited::Concurrency);
                }
                permit
            }
            None => Permit(None),
        };
        if let Some(bucket) = &self.rate {
            bucket.lock().expect("not poisoned").take(now)?;
        }
        Ok(permit)
    }
}

/// A token bucket of a minute's worth of requests, refilled evenly.
struct Bucket {
    per_minute: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Self {
            per_minute,
            tokens: per_minute,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> Result<(), Limited> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) * 60.0 / self.per_minute;
            Err(Limited::Rate(Duration::from_secs_f64(wait)))
        }
    }
}

/// Every key, by the SHA-256 of the key.
#[derive(Default)]
pub struct Keys {
    by_digest: HashMap<[u8; 32], Arc<Tenant>>,
}

impl Keys {
    pub fn parse(text: &str, path: &str) -> Result<Self, KeysError> {
        let invalid = |message: String| KeysError::Invalid {
            path: path.to_string(),
            message,
        };
        let file: File = serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let now = Instant::now();
        let mut by_digest = HashMap::new();
        for entry in file.keys {
            if entry.key.len() < 8 {
                return Err(invalid(format!(
                    "the key of {} is shorter than 8 characters",
                    entry.name
                )));
            }
            let tenant = Tenant {
                models: entry.models,
                selector: entry.model_selector.map(|s| s.match_labels),
                rate: entry
                    .requests_per_minute
                    .map(|r| Mutex::new(Bucket::new(r, now))),
                max_concurrent: entry.max_concurrent.map(|m| m as usize),
                in_flight: Arc::default(),
                name: entry.name,
            };
            let name = tenant.name.clone();
            if by_digest
                .insert(digest(&entry.key), Arc::new(tenant))
                .is_some()
            {
                return Err(invalid(format!("{name}'s key is also another entry's")));
            }
        }
        Ok(Self { by_digest })
    }

    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let bytes = read_limited(path).map_err(|source| KeysError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// The keys of a file's contents, read elsewhere.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, KeysError> {
        let shown = path.display().to_string();
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(KeysError::TooLarge { path: shown });
        }
        Self::parse(&String::from_utf8_lossy(bytes), &shown)
    }

    /// The tenant of an `Authorization` header's value.
    pub fn find(&self, authorization: Option<&str>) -> Option<&Arc<Tenant>> {
        let key = authorization?.strip_prefix("Bearer ")?.trim();
        self.by_digest.get(&digest(key))
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A keys file's bytes, at most one past the limit (which [`Keys::from_bytes`] refuses): a
/// file swapped for a huge one is never read whole.
pub fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_past_the_limit_is_refused_without_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let mut text = FILE.to_string();
        text.push_str(&"#".repeat(MAX_FILE_BYTES as usize));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            read_limited(&path).unwrap().len() as u64,
            MAX_FILE_BYTES + 1
        );
        assert!(matches!(Keys::load(&path), Err(KeysError::TooLarge { .. })));
        std::fs::write(&path, FILE).unwrap();
        assert_eq!(Keys::load(&path).unwrap().len(), 3);
    }

    const FILE: &str = "keys:\n\
        - {name: all, key: sk-all-000}\n\
        - {name: named, key: sk-named-00, models: [llama]}\n\
        - name: labelled\n  key: sk-labelled\n  modelSelector: {matchLabels: {team: a}}\n  requestsPerMinute: 2\n  maxConcurrent: 1\n";

    fn model(served: &str, team: &str) -> Model {
        Model {
            namespace: "ml".into(),
            name: served.into(),
            served: served.into(),
            labels: BTreeMap::from([("team".into(), team.into())]),
            created: 0,
            endpoints: vec![],
            failed: None,
            scaled_to_zero: false,
        }
    }

    #[test]
    fn keys_grant_the_models_they_name_or_select() {
        let keys = Keys::parse(FILE, "keys.yaml").unwrap();
        let (llama, bert) = (model("llama", "b"), model("bert", "a"));
        let find = |k: &str| keys.find(Some(&format!("Bearer {k}"))).unwrap();
        assert!(find("sk-all-000").may_call(&llama) && find("sk-all-000").may_call(&bert));
        assert!(find("sk-named-00").may_call(&llama) && !find("sk-named-00").may_call(&bert));
        assert!(!find("sk-labelled").may_call(&llama) && find("sk-labelled").may_call(&bert));
        assert!(keys.find(Some("Bearer sk-unknown")).is_none());
        assert!(
            keys.find(Some("sk-all-000")).is_none(),
            "not a bearer token"
        );
        assert!(keys.find(None).is_none());
    }

    #[test]
    fn limits_refuse_past_the_rate_and_the_concurrency() {
        let keys = Keys::parse(FILE, "keys.yaml").unwrap();
        let tenant = keys.find(Some("Bearer sk-labelled")).unwrap();
        let t0 = Instant::now();
        let first = tenant.admit(t0).unwrap();
        assert_eq!(tenant.admit(t0).err(), Some(Limited::Concurrency));
        drop(first);
        drop(tenant.admit(t0).unwrap());
        // Two a minute: the third waits 30 s for its token.
        match tenant.admit(t0) {
            Err(Limited::Rate(wait)) => assert_eq!(wait.as_secs(), 30),
            other => panic!("{:?}", other.err()),
        }
        assert!(tenant.admit(t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let error = |text: &str| Keys::parse(text, "k.yaml").err().unwrap().to_string();
        assert!(error("keys:\n- {name: a, key: short}\n").contains("shorter than 8"));
        assert!(
            error("keys:\n- {name: a, key: sk-aaaaaa}\n- {name: b, key: sk-aaaaaa}\n")
                .contains("b's key is also")
        );
        assert!(error("keys:\n- {name: a, key: sk-aaaaaa, model: x}\n").contains("model"));
    }
}
