//! Tabular models: gradient-boosted trees from XGBoost and LightGBM, evaluated natively
//! with the training library's own arithmetic, so predictions equal its own.
//!
//! A model folder holds one model file (`*.json` or `*.ubj` from XGBoost, a LightGBM text
//! model, or with the `onnx` feature an `*.onnx` scikit-learn pipeline) and, optionally,
//! `kandle-tabular.json` (`Manifest`) naming what the file lacks.
mod forest;
pub mod http;
pub mod lightgbm;
#[cfg(feature = "onnx")]
pub mod onnx;
mod scorer;
mod ubjson;
pub mod v2;
pub mod xgboost;

use crate::model::LoadError;
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "kandle-tabular.json";

/// Largest model file read; the biggest real forests are a few hundred MiB.
const MAX_MODEL_BYTES: u64 = 2 << 30;

/// What a model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A probability for each class.
    Classifier { classes: usize },
    /// One number.
    Regressor,
}

impl Kind {
    /// Values each row predicts.
    pub fn outputs(self) -> usize {
        match self {
            Self::Classifier { classes } => classes,
            Self::Regressor => 1,
        }
    }

    /// Margins each row sums: one for binary classifiers and regressors.
    pub fn groups(self) -> usize {
        match self {
            Self::Classifier { classes } if classes > 2 => classes,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Schema {
    /// The library that trained it: `xgboost` or `lightgbm`.
    pub format: &'static str,
    /// Feature names in the model's column order.
    pub features: Vec<String>,
    pub kind: Kind,
}

/// A loaded model. Rows are `features` values each (NaN for a missing value); outputs are
/// `kind.outputs()` values each. Only a runtime outside kandle (ONNX) can fail.
pub trait TabularModel: Send + Sync {
    fn schema(&self) -> &Schema;
    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<(), String>;
}

/// What the model file may lack, from `kandle-tabular.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Feature names in the model's column order, replacing the file's own.
    #[serde(default)]
    pub feature_names: Option<Vec<String>>,
    /// For categorical features, the category names in code order: a request may send a
    /// name where the model expects its code.
    #[serde(default)]
    pub categories: BTreeMap<String, Vec<String>>,
    /// Class names in output order; `label` then answers names, not numbers.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

/// A model with the manifest's names applied.
pub struct Tabular {
    pub model: Box<dyn TabularModel>,
    pub schema: Schema,
    /// For each feature, its category names (empty for numbers).
    pub categories: Vec<Vec<String>>,
    pub labels: Option<Vec<String>>,
}

impl Tabular {
    /// Predicts every row, in chunks across the pool's threads when there are many.
    pub fn predict(&self, rows: &[f64]) -> Result<Vec<f64>, String> {
        /// Rows below which splitting costs more than it saves.
        const CHUNK_ROWS: usize = 256;
        let features = self.schema.features.len();
        let outputs = self.schema.kind.outputs();
        let n = rows.len() / features;
        let mut out = vec![0.0; n * outputs];
        if n <= CHUNK_ROWS {
            self.model.predict(rows, &mut out)?;
        } else {
            rows.par_chunks(CHUNK_ROWS * features)
                .zip(out.par_chunks_mut(CHUNK_ROWS * outputs))
                .try_for_each(|(rows, out)| self.model.predict(rows, out))?;
        }
        Ok(out)
    }
}

/// The tabular model file in `path` (a file, or a folder holding one), if it holds one.
/// A pickle or joblib file is an error: loading one runs whatever code it carries.
pub fn find(path: &Path) -> Result<Option<PathBuf>, LoadError> {
    let candidates: Vec<PathBuf> = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        files.sort();
        // A language model's folder is never tabular, whatever else it holds.
        if files
            .iter()
            .any(|f| f.file_name().is_some_and(|n| n == "config.json"))
        {
            return Ok(None);
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut found: Option<PathBuf> = None;
    let mut pickle: Option<PathBuf> = None;
    for file in candidates {
        let ext = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        let is_model = match ext {
            "ubj" => true,
            "json" => !file.ends_with(MANIFEST) && head(&file, 256)?.contains("\"learner\""),
            "txt" => head(&file, 5)? == "tree\n",
            "onnx" => true,
            "pkl" | "pickle" | "joblib" => {
                pickle = Some(file);
                continue;
            }
            _ => false,
        };
        if is_model {
            if let Some(first) = &found {
                return Err(LoadError::invalid(
                    path,
                    format!(
                        "holds two models, {} and {}; keep one",
                        name(first),
                        name(&file)
                    ),
                ));
            }
            found = Some(file);
        }
    }
    match (found, pickle) {
        (None, Some(file)) => Err(LoadError::invalid(
            &file,
            "pickle and joblib files are not loaded: unpickling runs any code the file carries. \
             Save the model with the library's own format instead: XGBoost `booster.save_model(\"model.json\")`, \
             LightGBM `booster.save_model(\"model.txt\")`",
        )),
        (found, _) => Ok(found),
    }
}

fn name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// The first `bytes` of a file, as text (lossily): enough to tell what it holds.
fn head(file: &Path, bytes: u64) -> Result<String, LoadError> {
    let mut head = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(bytes).read_to_end(&mut head))
        .map_err(|source| LoadError::Io {
            path: file.to_path_buf(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Loads the model file and the manifest beside it; ONNX models with ONNX Runtime from
/// `onnxruntime` (a shared library), when given.
pub fn load(file: &Path, onnxruntime: Option<&Path>) -> Result<Tabular, LoadError> {
    let io = |source| LoadError::Io {
        path: file.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(file).map_err(io)?.len();
    if size > MAX_MODEL_BYTES {
        return Err(LoadError::invalid(
            file,
            format!("{size} bytes is larger than the limit of {MAX_MODEL_BYTES}"),
        ));
    }
    let bytes = std::fs::read(file).map_err(io)?;
    let model: Box<dyn TabularModel> = match file.extension().and_then(|e| e.to_str()) {
        Some("onnx") => onnx_model(file, onnxruntime)?,
        Some("ubj") => Box::new(
            xgboost::XgBoost::from_value(
                ubjson::parse(&bytes).map_err(|e| LoadError::invalid(file, e))?,
            )
            .map_err(|e| LoadError::invalid(file, e))?,
        ),
        Some("json") => Box::new(
            serde_json::from_slice(&bytes)
                .map_err(|e| e.to_string())
                .and_then(xgboost::XgBoost::from_value)
                .map_err(|e| LoadError::invalid(file, e))?,
        ),
        _ => Box::new(
            std::str::from_utf8(&bytes)
                .map_err(|_| "not UTF-8 text".to_string())
                .and_then(lightgbm::LightGbm::parse)
                .map_err(|e| LoadError::invalid(file, e))?,
        ),
    };
    let manifest_path = file.with_file_name(MANIFEST);
    let manifest = if manifest_path.exists() {
        let text = std::fs::read(&manifest_path).map_err(|source| LoadError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| LoadError::invalid(&manifest_path, e.to_string()))?
    } else {
        Manifest::default()
    };
    apply(model, manifest).map_err(|e| LoadError::invalid(&manifest_path, e))
}

#[cfg(feature = "onnx")]
fn onnx_model(file: &Path, library: Option<&Path>) -> Result<Box<dyn TabularModel>, LoadError> {
    onnx::OnnxModel::load(file, library)
        .map(|m| Box::new(m) as Box<dyn TabularModel>)
        .map_err(|e| LoadError::invalid(file, e))
}

#[cfg(not(feature = "onnx"))]
fn onnx_model(file: &Path, _: Option<&Path>) -> Result<Box<dyn TabularModel>, LoadError> {
    Err(LoadError::invalid(
        file,
        "this build has no ONNX support; rebuild with `--features onnx`",
    ))
}

fn apply(model: Box<dyn TabularModel>, manifest: Manifest) -> Result<Tabular, String> {
    let mut schema = model.schema().clone();
    if schema.features.is_empty() {
        return Err("the model takes no features".into());
    }
    if let Some(names) = manifest.feature_names {
        if names.len() != schema.features.len() {
            return Err(format!(
                "featureNames has {} names; the model has {} features",
                names.len(),
                schema.features.len()
            ));
        }
        schema.features = names;
    }
    let mut categories = vec![Vec::new(); schema.features.len()];
    for (feature, names) in manifest.categories {
        let i = schema
            .features
            .iter()
            .position(|f| *f == feature)
            .ok_or_else(|| format!("categories names `{feature}`, which is not a feature"))?;
        categories[i] = names;
    }
    if let Some(labels) = &manifest.labels
        && labels.len() != schema.kind.outputs()
    {
        return Err(format!(
            "labels has {} names; the model predicts {} classes",
            labels.len(),
            schema.kind.outputs()
        ));
    }
    Ok(Tabular {
        model,
        schema,
        categories,
        labels: manifest.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Constant(Schema);

    impl TabularModel for Constant {
        fn schema(&self) -> &Schema {
            &self.0
        }
        fn predict(&self, _: &[f64], out: &mut [f64]) -> Result<(), String> {
            out.fill(0.5);
            Ok(())
        }
    }

    fn model(features: usize) -> Box<dyn TabularModel> {
        Box::new(Constant(Schema {
            format: "test",
            features: (0..features).map(|i| format!("f{i}")).collect(),
            kind: Kind::Regressor,
        }))
    }

    #[test]
    fn a_model_without_features_or_with_a_mismatched_manifest_is_refused() {
        assert!(
            apply(model(0), Manifest::default())
                .err()
                .unwrap()
                .contains("no features")
        );
        let names = Manifest {
            feature_names: Some(vec!["a".into()]),
            ..Manifest::default()
        };
        assert!(apply(model(2), names).err().unwrap().contains("1 names"));
        let categories = Manifest {
            categories: [("colour".to_string(), vec!["red".to_string()])].into(),
            ..Manifest::default()
        };
        assert!(
            apply(model(2), categories)
                .err()
                .unwrap()
                .contains("`colour`")
        );
        let ok = apply(model(2), Manifest::default()).unwrap();
        assert_eq!(ok.predict(&[1.0; 600 * 2]).unwrap(), vec![0.5; 600]);
    }

    #[test]
    fn models_are_found_by_what_they_hold_and_pickles_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
        std::fs::write(dir.path().join(MANIFEST), "{}").unwrap();
        assert!(find(dir.path()).unwrap().is_none());
        // XGBoost's JSON, even re-indented.
        std::fs::write(dir.path().join("model.json"), "{\n  \"learner\": {}}").unwrap();
        assert_eq!(
            find(dir.path()).unwrap(),
            Some(dir.path().join("model.json"))
        );
        std::fs::write(dir.path().join("other.ubj"), "").unwrap();
        assert!(
            find(dir.path())
                .unwrap_err()
                .to_string()
                .contains("two models")
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert!(
            find(dir.path()).unwrap().is_none(),
            "a language model's folder"
        );
    }
}
