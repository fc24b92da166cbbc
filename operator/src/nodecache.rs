//! The node cache's DaemonSet (`kandle-operator node-cache`): it makes the cache folder on
//! each node the serving pods' own (`prepare`, once, as root), then keeps the cache within
//! its size limit (`collect`): once it holds more, the model folders no ModelDeployment uses
//! are removed, least recently used first, as the kubelet collects unused images. A folder
//! in use, or locked by a pull, is never touched.
use crate::build::node_folder;
use crate::crd::ModelDeployment;
use kandle_contract::pull::{LOCK, MARKER};
use kube::api::ListParams;
use kube::{Api, Client};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One model's folder in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Folder {
    pub name: String,
    pub bytes: u64,
    /// When a pull last wrote it, or when `collect` last saw it in use.
    pub last_used: SystemTime,
}

/// Removes folders until the cache fits in `max_bytes`: unused ones only, least recently
/// used first, no more than needed. `remove` says whether it could (a pull may hold one);
/// returns the folders removed.
pub fn evict<'a>(
    folders: &'a [Folder],
    in_use: &HashSet<String>,
    max_bytes: u64,
    mut remove: impl FnMut(&Folder) -> bool,
) -> Vec<&'a str> {
    let mut total: u64 = folders.iter().map(|f| f.bytes).sum();
    let mut unused: Vec<&Folder> = folders
        .iter()
        .filter(|f| !in_use.contains(&f.name))
        .collect();
    unused.sort_by_key(|f| f.last_used);
    let mut removed = Vec::new();
    for folder in unused {
        if total <= max_bytes {
            break;
        }
        if remove(folder) {
            total -= folder.bytes;
            removed.push(folder.name.as_str());
        }
    }
    removed
}

/// Creates `root` if need be and gives it to `uid` (the serving pods' user), who alone may
/// write it: the kubelet creates a hostPath folder owned by root.
pub fn prepare(root: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root)?;
    std::os::unix::fs::chown(root, Some(uid), Some(uid))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
}

/// The model folders under `root` (named as [`node_folder`] names them; anything else there
/// is not the cache's), with their sizes.
pub fn scan(root: &Path) -> std::io::Result<Vec<Folder>> {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_model_folder(&name) || !entry.file_type()?.is_dir() {
            continue;
        }
        let path = entry.path();
        let written = std::fs::metadata(path.join(MARKER)).or_else(|_| entry.metadata())?;
        folders.push(Folder {
            bytes: size(&path)?,
            last_used: written.modified()?,
            name,
        });
    }
    Ok(folders)
}

fn is_model_folder(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Bytes of the files under `dir`; links are not followed.
fn size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Removes the folder `name` unless a pull holds its lock; whether it was removed.
pub fn remove(root: &Path, name: &str) -> std::io::Result<bool> {
    let folder = root.join(name);
    // Held while the folder goes: a pull starting now waits, then fails and is retried.
    let _lock = match std::fs::File::open(folder.join(LOCK)) {
        Ok(file) => match file.try_lock() {
            Ok(()) => Some(file),
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    std::fs::remove_dir_all(&folder)?;
    Ok(true)
}

/// Keeps the cache at `root` within `max_bytes`, every `interval`, until the process ends.
pub async fn collect(
    client: Client,
    namespace: Option<&str>,
    root: PathBuf,
    max_bytes: u64,
    interval: Duration,
) {
    let api: Api<ModelDeployment> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut seen_in_use: HashMap<String, SystemTime> = HashMap::new();
    let mut unused_before: HashSet<String> = HashSet::new();
    loop {
        match pass(&api, &root, max_bytes, &mut seen_in_use, &unused_before).await {
            Ok(unused) => unused_before = unused,
            Err(e) => {
                tracing::warn!(error = %e, root = %root.display(), "node cache not collected; trying again")
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One collection: returns the folders no ModelDeployment uses now.
async fn pass(
    api: &Api<ModelDeployment>,
    root: &Path,
    max_bytes: u64,
    seen_in_use: &mut HashMap<String, SystemTime>,
    unused_before: &HashSet<String>,
) -> anyhow::Result<HashSet<String>> {
    // Nothing is removed without a fresh list of what is in use.
    let listed = api.list(&ListParams::default()).await?;
    let mut in_use: HashSet<String> = listed.items.iter().filter_map(node_folder).collect();
    let scan_root = root.to_path_buf();
    let mut folders = tokio::task::spawn_blocking(move || scan(&scan_root)).await??;
    let now = SystemTime::now();
    for f in &mut folders {
        if in_use.contains(&f.name) {
            seen_in_use.insert(f.name.clone(), now);
        }
        if let Some(seen) = seen_in_use.get(&f.name) {
            f.last_used = f.last_used.max(*seen);
        }
    }
    let unused: HashSet<String> = folders
        .iter()
        .map(|f| f.name.clone())
        .filter(|n| !in_use.contains(n))
        .collect();
    // A folder goes only when two lists in a row did not use it: a ModelDeployment created
    // while this one ran shows in the next.
    in_use.extend(unused.difference(unused_before).cloned());
    let total: u64 = folders.iter().map(|f| f.bytes).sum();
    tracing::debug!(
        folders = folders.len(),
        bytes = total,
        max_bytes,
        "node cache scanned"
    );
    let root = root.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || {
        let removed = evict(&folders, &in_use, max_bytes, |f| removed_logged(&root, f));
        removed.into_iter().map(str::to_string).collect::<Vec<_>>()
    })
    .await?;
    for name in removed {
        seen_in_use.remove(&name);
    }
    Ok(unused)
}

/// [`remove`], logged with what the folder held.
fn removed_logged(root: &Path, f: &Folder) -> bool {
    let source = std::fs::read(root.join(&f.name).join(MARKER))
        .ok()
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
        .and_then(|m| m["source"].as_str().map(str::to_string))
        .unwrap_or_default();
    match remove(root, &f.name) {
        Ok(true) => {
            tracing::info!(folder = f.name, %source, bytes = f.bytes, "removed an unused model from the node cache");
            true
        }
        Ok(false) => {
            tracing::info!(folder = f.name, %source, "a pull holds this folder; kept");
            false
        }
        Err(e) => {
            tracing::warn!(folder = f.name, error = %e, "cannot remove from the node cache");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, bytes: u64, age_s: u64) -> Folder {
        Folder {
            name: name.into(),
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        }
    }

    #[test]
    fn unused_folders_go_least_recently_used_first_and_only_past_the_limit() {
        let folders = [
            folder("old", 30, 300),
            folder("used", 100, 900),
            folder("older", 20, 600),
            folder("new", 40, 10),
        ];
        let in_use = HashSet::from(["used".to_string()]);
        let all = |_: &Folder| true;
        // 190 bytes: within a 200-byte limit nothing goes.
        assert!(evict(&folders, &in_use, 200, all).is_empty());
        // Down to 150: the oldest unused one (20) is not enough, the next (30) is.
        assert_eq!(evict(&folders, &in_use, 150, all), ["older", "old"]);
        // A folder in use stays even when the cache cannot fit without it.
        assert_eq!(evict(&folders, &in_use, 0, all), ["older", "old", "new"]);
        // One that cannot go (a pull holds it) is passed over for the next.
        let locked = |f: &Folder| f.name != "older";
        assert_eq!(evict(&folders, &in_use, 150, locked), ["old", "new"]);
    }

    fn pulled(root: &Path, name: &str, bytes: usize) {
        let dir = root.join(name).join("sub");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights.bin"), vec![0u8; bytes]).unwrap();
        std::fs::write(root.join(name).join(MARKER), b"{\"source\":\"hf://a/b\"}").unwrap();
        std::fs::write(root.join(name).join(LOCK), b"").unwrap();
    }

    #[test]
    fn scan_sizes_model_folders_and_leaves_everything_else_alone() {
        let root = tempfile::tempdir().unwrap();
        let a = "0123456789abcdef0123456789abcdef";
        pulled(root.path(), a, 1000);
        std::fs::create_dir(root.path().join("lost+found")).unwrap();
        std::fs::write(
            root.path().join("fedcba9876543210fedcba9876543210"),
            b"a file",
        )
        .unwrap();
        let folders = scan(root.path()).unwrap();
        assert_eq!(folders.len(), 1);
        assert_eq!(folders[0].name, a);
        // The weights, the marker and the empty lock.
        assert_eq!(folders[0].bytes, 1000 + 21);
    }

    #[test]
    fn a_folder_whose_pull_holds_the_lock_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let (busy, idle) = (
            "0123456789abcdef0123456789abcdef",
            "fedcba9876543210fedcba9876543210",
        );
        pulled(root.path(), busy, 10);
        pulled(root.path(), idle, 10);
        let pulling = std::fs::File::open(root.path().join(busy).join(LOCK)).unwrap();
        pulling.lock().unwrap();
        assert!(!remove(root.path(), busy).unwrap());
        assert!(root.path().join(busy).join("sub/weights.bin").exists());
        assert!(remove(root.path(), idle).unwrap());
        assert!(!root.path().join(idle).exists());
    }

    #[test]
    fn prepare_makes_the_root_and_leaves_it_writable_by_its_owner_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("var/lib/kandle/models");
        // Not root here: giving the folder to its current owner is what a test can check.
        let uid = std::fs::metadata(root.path()).unwrap().uid();
        prepare(&cache, uid).unwrap();
        let meta = std::fs::metadata(&cache).unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o777),
            (uid, 0o755)
        );
    }
}
