//! Files on disk: JSON configs and memory-mapped safetensors.
use super::LoadError;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::invalid(path, e.to_string()))
}

/// Reads an optional JSON file: None when it is absent, an error when it is malformed.
pub fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, LoadError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The safetensors files of a model: one file, or the shards an index names.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(LoadError::invalid(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    let index = read_json(&index_path)?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::invalid(&index_path, "no `weight_map` object"))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(LoadError::invalid(
            &index_path,
            format!("names a missing shard {}", missing.display()),
        ));
    }
    Ok(files)
}

/// Memory-maps the weights rather than reading them, so load time and resident memory do
/// not grow with copies of the file.
#[allow(unsafe_code)]
pub fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    // SAFETY: the files are mapped read-only; like every server that mmaps weights we
    // rely on nothing rewriting them while the process runs (pulls publish by rename).
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? })
}

/// Model code in candle panics on some shape mismatches; a malformed checkpoint must be a
/// load error, not a crash.
pub fn catch_load<T>(
    what: &Path,
    f: impl FnOnce() -> Result<T, LoadError>,
) -> Result<T, LoadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "model code panicked".into());
        Err(LoadError::invalid(
            what,
            format!("weights do not fit the config: {message}"),
        ))
    })
}
