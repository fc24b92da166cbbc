//! `kandle-server pull`: a model from the hub, a URL or a path into a folder that
//! `serve --model DIR` loads. Verified, resumable, atomic, and safe when several
//! processes share the folder.
pub mod credentials;
pub mod error;
pub mod fetch;
pub mod hub;
pub mod names;
pub mod oci;
mod pace;
pub mod progress;
mod report;
pub mod s3;
mod segments;
pub mod select;
mod sink;
pub mod uri;

use error::PullError;
pub use fetch::Authorization;
use fetch::{Digest, Fetcher, FileRecord, RemoteFile};
use futures::{StreamExt, TryStreamExt};
use progress::Progress;
pub use report::{report, write as write_report};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uri::{ModelUri, OciRef};

use kandle_contract::pull::LOCK;
pub use kandle_contract::pull::MARKER;
const STAGING: &str = ".kandle-staging";

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Expected sha256 of a single-URL download.
    pub sha256: Option<String>,
    pub concurrency: usize,
    pub retry_budget: Duration,
    /// Files at least this large may take several connections.
    pub range_min_bytes: u64,
    pub credentials: credentials::Source,
    /// Reach OCI registries over plain HTTP (loopback ones always are).
    pub plain_http: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub source: String,
    pub revision: Option<String>,
    pub files: Vec<FileRecord>,
}

impl Marker {
    fn read(dest: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(dest.join(MARKER)).ok()?).ok()
    }

    /// Every listed file is there with its recorded size (hashes were checked on arrival).
    fn complete(&self, dest: &Path) -> bool {
        self.files.iter().all(|f| {
            names::inside(dest, &f.path)
                .is_ok_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == f.size))
        })
    }
}

/// What a pull left, and what it took.
#[derive(Debug)]
pub struct Pulled {
    pub marker: Marker,
    /// Bytes that came over the network: 0 when the folder held the model already.
    pub fetched_bytes: u64,
    pub seconds: f64,
}

/// Pulls `uri` into `dest`.
pub async fn pull(uri: &str, dest: &Path, opts: &PullOptions) -> Result<Pulled, PullError> {
    let started = Instant::now();
    let (marker, fetched_bytes) = fill(uri, dest, opts).await?;
    Ok(Pulled {
        marker,
        fetched_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The marker of `dest` once it holds `uri`, and the bytes fetched to get there.
async fn fill(uri: &str, dest: &Path, opts: &PullOptions) -> Result<(Marker, u64), PullError> {
    let parsed = ModelUri::parse(uri)?;
    let sha256 = match &opts.sha256 {
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(h.to_lowercase())
        }
        Some(h) => return Err(PullError::BadSha256(h.chars().take(80).collect())),
        None => None,
    };
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(PullError::io(dest))?;
    let _lock = lock(dest).await?;
    let started = Instant::now();
    let client = http_client(uri)?;
    let credentials = opts.credentials.load().await?;
    let hf_token = credentials.get("HF_TOKEN");
    // What the fetcher's requests carry: the hub's token unless the source says otherwise.
    let mut authorization =
        fetch::Authorization::fixed(hf_token.as_ref().map(|t| format!("Bearer {t}")));
    let mut denied_hint = hub::denied_hint(hf_token.is_some());
    let include = select::globs(&opts.include).map_err(|source| PullError::Select {
        uri: uri.into(),
        source,
    })?;
    let exclude = select::globs(&opts.exclude).map_err(|source| PullError::Select {
        uri: uri.into(),
        source,
    })?;

    let (revision, files) = match &parsed {
        ModelUri::Hub { repo, revision } => {
            // A pinned commit already pulled needs no request at all.
            if let Some(m) = Marker::read(dest).filter(|m| {
                m.source == uri
                    && m.revision.as_deref() == Some(revision.as_str())
                    && m.complete(dest)
            }) {
                tracing::info!(%uri, "already pulled");
                return Ok((m, 0));
            }
            let listing = hub::list(&client, hf_token.as_deref(), repo, revision).await?;
            // The whole listing: a hostile one is refused, not just filtered.
            check_listing(uri, &listing.files, true)?;
            let files = chosen(uri, listing.files, include.as_ref(), exclude.as_ref())?;
            (Some(listing.commit), files)
        }
        ModelUri::Url(url) => {
            let name = url
                .rsplit('/')
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or("model.gguf");
            let name = name.split(['?', '#']).next().unwrap_or(name).to_string();
            let files = vec![RemoteFile {
                path: name,
                url: url.clone(),
                object: None,
                size: None,
                digest: sha256.map(Digest::Sha256),
            }];
            check_listing(uri, &files, false)?;
            (None, files)
        }
        ModelUri::Local(path) => {
            let marker = copy_local(uri, path, dest, include.as_ref(), exclude.as_ref()).await?;
            return Ok((marker, 0));
        }
        ModelUri::S3 { bucket, prefix } => {
            let files = s3::list(bucket, prefix, &credentials).await?;
            check_listing(uri, &files, false)?;
            (
                None,
                chosen(uri, files, include.as_ref(), exclude.as_ref())?,
            )
        }
        ModelUri::Oci(target) => {
            // An artifact pinned by digest and already pulled needs no request at all.
            if let Some(m) = Marker::read(dest).filter(|m| {
                m.source == uri
                    && target.is_digest()
                    && m.revision.as_deref() == Some(target.reference.as_str())
                    && m.complete(dest)
            }) {
                tracing::info!(%uri, "already pulled");
                return Ok((m, 0));
            }
            let mut registry =
                oci::Registry::new(client.clone(), target, &credentials, opts.plain_http)?;
            let listing = registry.list().await?;
            check_listing(uri, &listing.files, true)?;
            authorization = registry.authorization();
            denied_hint = registry.denied_hint();
            let files = chosen(uri, listing.files, include.as_ref(), exclude.as_ref())?;
            (Some(listing.digest), files)
        }
    };

    if let Some(m) =
        Marker::read(dest).filter(|m| m.source == uri && m.revision == revision && m.complete(dest))
    {
        tracing::info!(%uri, revision = ?m.revision, "already pulled");
        return Ok((m, 0));
    }
    let total: u64 = files.iter().filter_map(|f| f.size).sum();
    tracing::info!(%uri, revision = ?revision, files = files.len(), total_bytes = total, "pulling");
    let progress = Progress::new(uri, total);
    let reporter = progress.report();
    let fetcher = Fetcher {
        client,
        authorization,
        denied_hint,
        retry_budget: opts.retry_budget,
        split_min: opts.range_min_bytes,
        connections_per_file: opts.concurrency.max(1),
    };
    let staging = dest.join(STAGING);
    let records: Result<Vec<FileRecord>, PullError> = futures::stream::iter(files.iter())
        .map(|file| {
            let (fetcher, progress, staging) = (&fetcher, &progress, &staging);
            async move {
                let part = names::inside(staging, &file.path).map_err(|e| refused(uri, e))?;
                fetcher.fetch(file, &part, progress).await
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect()
        .await;
    reporter.abort();
    let _ = reporter.await;
    let mut records = records?;
    records.sort_by(|a, b| a.path.cmp(&b.path));
    let marker = Marker {
        source: uri.to_string(),
        revision,
        files: records,
    };
    publish(dest, &staging, &marker).await?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        %uri, files = marker.files.len(), bytes = progress.done(), seconds,
        rate_mib_s = format!("{:.1}", progress.done() as f64 / seconds / (1024.0 * 1024.0)),
        "pull complete"
    );
    Ok((marker, progress.done()))
}

fn http_client(uri: &str) -> Result<reqwest::Client, PullError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| PullError::Network {
            uri: uri.into(),
            message: e.to_string(),
        })
}

/// `kandle-server push`: `source` pulled into `cache_dir` (a local folder's files linked
/// where they can be, not copied), then published to `target` as an OCI artifact. Returns
/// the artifact's URI pinned by its manifest digest.
pub async fn push(
    source: &str,
    target: &str,
    cache_dir: &Path,
    opts: &PullOptions,
) -> Result<String, PullError> {
    let ModelUri::Oci(target_ref) = ModelUri::parse(target)? else {
        return Err(PullError::Unsupported(format!(
            "`{target}`: a push goes to oci://REGISTRY/REPOSITORY:TAG"
        )));
    };
    let folder = cache_folder(cache_dir, source);
    let marker = pull(source, &folder, opts).await?.marker;
    let credentials = opts.credentials.load().await?;
    let mut registry = oci::Registry::new(
        http_client(target)?,
        &target_ref,
        &credentials,
        opts.plain_http,
    )?;
    let started = Instant::now();
    let digest = registry.push(&folder, &marker, opts.concurrency).await?;
    let pinned = OciRef {
        reference: digest,
        ..target_ref
    };
    tracing::info!(
        %source, %target, %pinned, files = marker.files.len(),
        bytes = marker.files.iter().map(|f| f.size).sum::<u64>(),
        seconds = started.elapsed().as_secs_f64(), "push complete"
    );
    Ok(pinned.to_string())
}

/// Where pulled models are kept unless a flag says otherwise.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kandle")
}

/// The files of a listing that `--include`/`--exclude` (or kandle's own choice) keep.
fn chosen(
    uri: &str,
    files: Vec<RemoteFile>,
    include: Option<&globset::GlobSet>,
    exclude: Option<&globset::GlobSet>,
) -> Result<Vec<RemoteFile>, PullError> {
    let names: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let chosen = select::select(&names, include, exclude).map_err(|source| PullError::Select {
        uri: uri.into(),
        source,
    })?;
    Ok(files
        .into_iter()
        .filter(|f| chosen.contains(&f.path))
        .collect())
}

fn refused(uri: &str, e: names::NameError) -> PullError {
    PullError::Refused {
        uri: uri.into(),
        reason: e.to_string(),
    }
}

/// A remote's listing, refused unless every file has a safe name of its own and a size to
/// check (`need_digest`: and a hash; a source that publishes them must publish them all),
/// and the sizes add up to a number (the pull's progress sums them).
fn check_listing(uri: &str, files: &[RemoteFile], need_digest: bool) -> Result<(), PullError> {
    let sizes = files.iter().filter_map(|f| f.size);
    if sizes.clone().try_fold(0u64, u64::checked_add).is_none() {
        return Err(PullError::Refused {
            uri: uri.into(),
            reason: "the sizes listed add up to more than 2^64 bytes".into(),
        });
    }
    let mut seen = HashSet::new();
    for f in files {
        names::check(&f.path).map_err(|e| refused(uri, e))?;
        let reason = if !seen.insert(f.path.as_str()) {
            "is listed twice"
        } else if need_digest && (f.size.is_none() || f.digest.is_none()) {
            "is listed without the size and hash to check it by"
        } else {
            continue;
        };
        return Err(PullError::Refused {
            uri: uri.into(),
            reason: format!("file {:?} {reason}", f.path),
        });
    }
    Ok(())
}

/// Moves verified files from staging into place, then writes the marker last.
async fn publish(dest: &Path, staging: &Path, marker: &Marker) -> Result<(), PullError> {
    // A changed revision may have dropped files: the old marker must not vouch for a mix.
    let _ = tokio::fs::remove_file(dest.join(MARKER)).await;
    for f in &marker.files {
        let target = names::inside(dest, &f.path).map_err(|e| refused(&marker.source, e))?;
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(PullError::io(parent))?;
        }
        let staged = names::inside(staging, &f.path).map_err(|e| refused(&marker.source, e))?;
        tokio::fs::rename(staged, &target)
            .await
            .map_err(PullError::io(&target))?;
    }
    let _ = tokio::fs::remove_dir_all(staging).await;
    write_marker(dest, marker).await
}

async fn write_marker(dest: &Path, marker: &Marker) -> Result<(), PullError> {
    let tmp = dest.join(format!("{MARKER}.tmp"));
    let body = serde_json::to_vec_pretty(marker).expect("marker serializes");
    tokio::fs::write(&tmp, body)
        .await
        .map_err(PullError::io(&tmp))?;
    tokio::fs::rename(&tmp, dest.join(MARKER))
        .await
        .map_err(PullError::io(dest.join(MARKER)))
}

/// One process pulls into a folder at a time; the others wait, then find it done.
async fn lock(dest: &Path) -> Result<std::fs::File, PullError> {
    let path = dest.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(PullError::io(&path))?;
    if file.try_lock().is_ok() {
        return Ok(file);
    }
    tracing::info!(folder = %dest.display(), "another process is pulling into this folder; waiting for it");
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .expect("lock task")
        .map_err(PullError::io(path))
}

/// A local folder or file: hard-linked where possible, else copied; never modified.
async fn copy_local(
    uri: &str,
    source: &Path,
    dest: &Path,
    include: Option<&globset::GlobSet>,
    exclude: Option<&globset::GlobSet>,
) -> Result<Marker, PullError> {
    let source = source.to_path_buf();
    let (dest, dest_for_publish) = (dest.to_path_buf(), dest.to_path_buf());
    let (uri, include, exclude) = (uri.to_string(), include.cloned(), exclude.cloned());
    let marker = tokio::task::spawn_blocking(move || -> Result<Marker, PullError> {
        let (root, names) = if source.is_file() {
            let name = source
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (
                source.parent().unwrap_or(Path::new(".")).to_path_buf(),
                vec![name],
            )
        } else {
            let mut names = Vec::new();
            walk(&source, &source, &mut names)?;
            let names =
                select::select(&names, include.as_ref(), exclude.as_ref()).map_err(|source| {
                    PullError::Select {
                        uri: uri.clone(),
                        source,
                    }
                })?;
            (source.clone(), names)
        };
        let staging = dest.join(STAGING);
        let mut files = Vec::new();
        for name in names {
            let (from, to) = (root.join(&name), staging.join(&name));
            std::fs::create_dir_all(to.parent().unwrap_or(&staging))
                .map_err(PullError::io(&staging))?;
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(PullError::io(&from))?;
            }
            let (size, sha256) = hash_file(&to)?;
            // The source is this machine's own file: hashed here, nothing to check against.
            files.push(FileRecord {
                path: name,
                size,
                sha256,
                verified: true,
            });
        }
        Ok(Marker {
            source: uri,
            revision: None,
            files,
        })
    })
    .await
    .expect("copy task")?;
    publish(&dest_for_publish, &dest_for_publish.join(STAGING), &marker).await?;
    Ok(marker)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), PullError> {
    for entry in std::fs::read_dir(dir).map_err(PullError::io(dir))? {
        let path = entry.map_err(PullError::io(dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, out)?;
        } else {
            out.push(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String), PullError> {
    use sha2::{Digest as _, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(PullError::io(path))?;
    let (mut hasher, mut buf, mut size) = (Sha256::new(), vec![0u8; 1 << 16], 0u64);
    loop {
        let n = file.read(&mut buf).map_err(PullError::io(path))?;
        if n == 0 {
            return Ok((size, hex::encode(hasher.finalize())));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// The folder under the cache where `serve --model URI` keeps a pulled model.
pub fn cache_folder(cache_dir: &Path, uri: &str) -> PathBuf {
    let safe: String = uri
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache_dir.join(safe)
}
