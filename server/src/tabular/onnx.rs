//! ONNX models exported from scikit-learn pipelines (skl2onnx, ZipMap off), run by ONNX
//! Runtime loaded from a shared library at start (the one the `onnxruntime` wheel ships),
//! never downloaded at build time.
use super::{Kind, Schema, TabularModel};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// One ONNX Runtime environment per process, from the first library asked for.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

pub struct OnnxModel {
    schema: Schema,
    /// Runs take the session mutably; ONNX Runtime spreads each run over its own threads.
    session: Mutex<Session>,
    input: String,
    input_f64: bool,
    /// The output read: `probabilities` for classifiers, the only one for regressors.
    output: String,
}

fn environment(library: Option<&Path>) -> Result<&'static ort::environment::Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let library = library.map_or_else(|| "libonnxruntime.so".into(), Path::to_path_buf);
            ort::init_from(&library)
                .map_err(|e| {
                    format!(
                        "loading ONNX Runtime from {}: {e} (pass --onnxruntime PATH, for example the libonnxruntime.so.* in the onnxruntime wheel's onnxruntime/capi folder)",
                        library.display()
                    )
                })?
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl OnnxModel {
    pub fn load(file: &Path, library: Option<&Path>) -> Result<Self, String> {
        let env = environment(library)?;
        let session = Session::builder(env)
            .and_then(|mut b| b.commit_from_file(file))
            .map_err(|e| format!("not a model ONNX Runtime loads: {e}"))?;
        let [input] = session.inputs() else {
            return Err(format!(
                "has {} inputs; kandle serves models with one input of rows by features",
                session.inputs().len()
            ));
        };
        let (input_f64, features) = match input.dtype() {
            ValueType::Tensor { ty, shape, .. } if shape.len() == 2 && shape[1] > 0 => match ty {
                TensorElementType::Float32 => (false, shape[1] as usize),
                TensorElementType::Float64 => (true, shape[1] as usize),
                other => {
                    return Err(format!(
                        "input `{}` is {other}; kandle sends floats",
                        input.name()
                    ));
                }
            },
            other => {
                return Err(format!(
                    "input `{}` is {other}, not a matrix of rows by a fixed number of features",
                    input.name()
                ));
            }
        };
        let outputs = session.outputs();
        let (output, kind) = match outputs.iter().find(|o| o.name() == "probabilities") {
            Some(o) => match o.dtype() {
                ValueType::Tensor { shape, .. } if shape.len() == 2 && shape[1] > 1 => (
                    o.name().to_string(),
                    Kind::Classifier {
                        classes: shape[1] as usize,
                    },
                ),
                other => {
                    return Err(format!(
                        "output `probabilities` is {other}; export with ZipMap off (options={{'zipmap': False}})"
                    ));
                }
            },
            None if outputs.len() == 1 => (outputs[0].name().to_string(), Kind::Regressor),
            None => {
                return Err(
                    "has no `probabilities` output; export classifiers with ZipMap off (options={'zipmap': False})"
                        .into(),
                );
            }
        };
        let input_name = input.name().to_string();
        Ok(Self {
            schema: Schema {
                format: "onnx",
                features: (0..features).map(|i| format!("f{i}")).collect(),
                kind,
            },
            session: Mutex::new(session),
            input: input_name,
            input_f64,
            output,
        })
    }

    fn run(&self, rows: &[f64], out: &mut [f64]) -> Result<(), String> {
        self.try_run(rows, out)
            .map_err(|e| format!("ONNX Runtime: {e}"))
    }

    fn try_run(&self, rows: &[f64], out: &mut [f64]) -> ort::Result<()> {
        let shape = [
            rows.len() / self.schema.features.len(),
            self.schema.features.len(),
        ];
        let input = if self.input_f64 {
            Tensor::from_array((shape, rows.to_vec()))?.into_dyn()
        } else {
            let rows: Vec<f32> = rows.iter().map(|&v| v as f32).collect();
            Tensor::from_array((shape, rows))?.into_dyn()
        };
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(ort::inputs![self.input.as_str() => input])?;
        let value = &outputs[self.output.as_str()];
        let values: Vec<f64> = match value.try_extract_tensor::<f32>() {
            Ok((_, values)) => values.iter().map(|&v| f64::from(v)).collect(),
            Err(_) => value.try_extract_tensor::<f64>()?.1.to_vec(),
        };
        if values.len() != out.len() {
            return Err(ort::Error::new(format!(
                "`{}` has {} values for {} expected",
                self.output,
                values.len(),
                out.len()
            )));
        }
        out.copy_from_slice(&values);
        Ok(())
    }
}

impl TabularModel for OnnxModel {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<(), String> {
        self.run(rows, out)
    }
}
