//! The Open Inference Protocol (KServe v2) for tabular models: requests to a matrix of
//! rows, predictions to response tensors, in JSON or with the binary tensor extension
//! (which Triton's clients use by default).
use super::{Kind, Tabular};
use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Request header giving the length of the JSON part when binary tensors follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<RawTensor>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// One input's values: numbers (NaN where missing), or names for categorical features.
enum Values {
    Numbers(Vec<f64>),
    Names(Vec<Option<String>>),
}

struct Input {
    name: String,
    shape: Vec<usize>,
    values: Values,
}

/// A checked inference request: its rows, and how to answer.
pub struct Inference {
    pub id: Option<String>,
    /// Row-major, the model's features each, NaN where missing.
    pub rows: Vec<f64>,
    pub n_rows: usize,
    /// Outputs to return, each with whether it goes as binary data.
    pub outputs: Vec<(Output, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Probabilities,
    Label,
    Predictions,
}

impl Output {
    pub fn name(self) -> &'static str {
        match self {
            Self::Probabilities => "probabilities",
            Self::Label => "label",
            Self::Predictions => "predictions",
        }
    }

    /// What a model of this kind answers.
    pub fn all(kind: Kind) -> &'static [Output] {
        match kind {
            Kind::Classifier { .. } => &[Self::Probabilities, Self::Label],
            Kind::Regressor => &[Self::Predictions],
        }
    }
}

/// Reads a request body: JSON, followed by binary tensors when `json_len` says where the
/// JSON ends.
pub fn parse(
    body: &[u8],
    json_len: Option<usize>,
    model: &Tabular,
    max_rows: usize,
) -> Result<Inference, ApiError> {
    let (json, mut binary) = match json_len {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "Inference-Header-Content-Length is {n}, longer than the {}-byte body",
                body.len()
            )));
        }
        None => (body, &[][..]),
    };
    let json = python_nan(json)?;
    let raw: RawRequest = serde_json::from_slice(&json).map_err(|e| {
        ApiError::invalid(format!("The request is not a valid inference request: {e}"))
    })?;
    if raw.inputs.is_empty() {
        return Err(ApiError::invalid("The request has no inputs"));
    }
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for tensor in raw.inputs {
        inputs.push(decode(
            tensor,
            &mut binary,
            max_rows,
            model.schema.features.len(),
        )?);
    }
    if !binary.is_empty() {
        return Err(ApiError::invalid(format!(
            "{} bytes of binary data that no input claims",
            binary.len()
        )));
    }
    let (rows, n_rows) = matrix(&inputs, model, max_rows)?;
    let all_binary = flag(&raw.parameters, "binary_data_output");
    let known = Output::all(model.schema.kind);
    let outputs = match raw.outputs {
        None => known.iter().map(|&o| (o, all_binary)).collect(),
        Some(wanted) => wanted
            .into_iter()
            .map(|o| {
                let output = known.iter().find(|k| k.name() == o.name).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "Unknown output `{}`; this model answers {}",
                        o.name,
                        names(known.iter().map(|k| k.name()))
                    ))
                })?;
                Ok((*output, all_binary || flag(&o.parameters, "binary_data")))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    Ok(Inference {
        id: raw.id,
        rows,
        n_rows,
        outputs,
    })
}

fn flag(parameters: &Map<String, Value>, name: &str) -> bool {
    parameters
        .get(name)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy)]
enum DataType {
    Bool,
    Int(u8),
    Uint(u8),
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => Self::Bool,
            "INT8" => Self::Int(1),
            "INT16" => Self::Int(2),
            "INT32" => Self::Int(4),
            "INT64" => Self::Int(8),
            "UINT8" => Self::Uint(1),
            "UINT16" => Self::Uint(2),
            "UINT32" => Self::Uint(4),
            "UINT64" => Self::Uint(8),
            "FP16" => Self::Fp16,
            "FP32" => Self::Fp32,
            "FP64" => Self::Fp64,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }
}

fn decode(
    tensor: RawTensor,
    binary: &mut &[u8],
    max_rows: usize,
    features: usize,
) -> Result<Input, ApiError> {
    let max_values = max_rows.saturating_mul(features);
    let name = tensor.name;
    let datatype = DataType::parse(&tensor.datatype).ok_or_else(|| {
        ApiError::invalid(format!(
            "Input `{name}` has datatype `{}`; use FP64, FP32, FP16, an integer type, BOOL, or BYTES for category names",
            tensor.datatype
        ))
    })?;
    let shape = tensor
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Input `{name}` has a negative dimension in its shape {:?}",
                tensor.shape
            ))
        })?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= max_values)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Input `{name}` has shape {shape:?}, more values than the limit of {max_rows} rows of {features} features holds"
            ))
        })?;
    let values = match tensor.parameters.get("binary_data_size") {
        Some(size) => {
            let size = size
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s <= binary.len())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "Input `{name}` claims more binary data than the body holds"
                    ))
                })?;
            let (bytes, rest) = binary.split_at(size);
            *binary = rest;
            from_binary(&name, datatype, bytes, count)?
        }
        None => {
            let data = tensor
                .data
                .ok_or_else(|| ApiError::invalid(format!("Input `{name}` has no data")))?;
            let mut flat = Vec::with_capacity(count);
            flatten(data, &mut flat, count, &name)?;
            from_json(&name, datatype, flat)?
        }
    };
    let len = match &values {
        Values::Numbers(v) => v.len(),
        Values::Names(v) => v.len(),
    };
    if len != count {
        return Err(ApiError::invalid(format!(
            "Input `{name}` has shape {shape:?} ({count} values) but carries {len}"
        )));
    }
    Ok(Input {
        name,
        shape,
        values,
    })
}

/// Python's `json` and Triton's client write a missing value in a float array as `NaN`,
/// which JSON lacks: read it as `null`. `Infinity` is refused by name.
fn python_nan(json: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, ApiError> {
    let mut out: Option<Vec<u8>> = None;
    let (mut in_string, mut escaped) = (false, false);
    let mut copied = 0;
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            (in_string, escaped) = match b {
                _ if escaped => (true, false),
                b'\\' => (true, true),
                b'"' => (false, false),
                _ => (true, false),
            };
        } else if b == b'"' {
            in_string = true;
        } else if b == b'I' && json[i..].starts_with(b"Infinity") {
            return Err(ApiError::invalid(
                "The request holds an infinite value; send null for a missing value",
            ));
        } else if b == b'N' && json[i..].starts_with(b"NaN") {
            let out = out.get_or_insert_with(|| Vec::with_capacity(json.len() + 64));
            out.extend_from_slice(&json[copied..i]);
            out.extend_from_slice(b"null");
            copied = i + 3;
        }
    }
    Ok(match out {
        None => std::borrow::Cow::Borrowed(json),
        Some(mut bytes) => {
            bytes.extend_from_slice(&json[copied..]);
            std::borrow::Cow::Owned(bytes)
        }
    })
}

/// Nested arrays flattened in row-major order, never past `limit` elements.
fn flatten(value: Value, out: &mut Vec<Value>, limit: usize, name: &str) -> Result<(), ApiError> {
    match value {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, limit, name)?;
            }
        }
        scalar if out.len() < limit => out.push(scalar),
        _ => {
            return Err(ApiError::invalid(format!(
                "Input `{name}` carries more values than its shape holds"
            )));
        }
    }
    Ok(())
}

fn from_json(name: &str, datatype: DataType, data: Vec<Value>) -> Result<Values, ApiError> {
    let wrong = |v: &Value| {
        ApiError::invalid(format!(
            "Input `{name}` holds {v}, which is not a value of its datatype"
        ))
    };
    if let DataType::Bytes = datatype {
        return data
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(Some(s)),
                Value::Null => Ok(None),
                other => Err(wrong(&other)),
            })
            .collect::<Result<_, _>>()
            .map(Values::Names);
    }
    data.iter()
        .map(|v| match (v, datatype) {
            (Value::Null, _) => Ok(f64::NAN),
            (Value::Bool(b), DataType::Bool) => Ok(f64::from(u8::from(*b))),
            (Value::Number(n), DataType::Fp16 | DataType::Fp32 | DataType::Fp64) => {
                n.as_f64().ok_or_else(|| wrong(v))
            }
            // Integer types take integers only: 1.5 in an INT64 input is a client's bug.
            (Value::Number(n), DataType::Int(_) | DataType::Uint(_)) => n
                .as_i64()
                .map(|i| i as f64)
                .or_else(|| n.as_u64().map(|u| u as f64))
                .ok_or_else(|| wrong(v)),
            _ => Err(wrong(v)),
        })
        .collect::<Result<_, _>>()
        .map(Values::Numbers)
}

fn from_binary(
    name: &str,
    datatype: DataType,
    bytes: &[u8],
    count: usize,
) -> Result<Values, ApiError> {
    let width = match datatype {
        DataType::Bool | DataType::Int(1) | DataType::Uint(1) => 1,
        DataType::Int(w) | DataType::Uint(w) => usize::from(w),
        DataType::Fp16 => 2,
        DataType::Fp32 => 4,
        DataType::Fp64 => 8,
        DataType::Bytes => return names_from_binary(name, bytes).map(Values::Names),
    };
    if bytes.len() != count * width {
        return Err(ApiError::invalid(format!(
            "Input `{name}` has {} bytes of binary data; its shape and datatype need {}",
            bytes.len(),
            count * width
        )));
    }
    let values = bytes
        .chunks_exact(width)
        .map(|b| match datatype {
            DataType::Bool | DataType::Uint(_) => {
                let mut le = [0u8; 8];
                le[..width].copy_from_slice(b);
                u64::from_le_bytes(le) as f64
            }
            DataType::Int(_) => {
                // Sign-extend from the top byte.
                let fill = if b[width - 1] & 0x80 != 0 { 0xff } else { 0 };
                let mut le = [fill; 8];
                le[..width].copy_from_slice(b);
                i64::from_le_bytes(le) as f64
            }
            DataType::Fp16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            DataType::Fp32 => f64::from(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            DataType::Fp64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
            DataType::Bytes => unreachable!("handled above"),
        })
        .collect();
    Ok(Values::Numbers(values))
}

/// BYTES elements: each a 4-byte little-endian length, then that many bytes.
fn names_from_binary(name: &str, mut bytes: &[u8]) -> Result<Vec<Option<String>>, ApiError> {
    let bad = || ApiError::invalid(format!("Input `{name}` has malformed BYTES binary data"));
    let mut names = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_le_bytes(*len) as usize;
        let text = rest.get(..len).ok_or_else(bad)?;
        names.push(Some(String::from_utf8(text.to_vec()).map_err(|_| bad())?));
        bytes = &rest[len..];
    }
    Ok(names)
}

/// The request's inputs as rows of the model's features: one 2-D input, rows by features
/// in the model's order, or one 1-D input per feature named after it.
fn matrix(
    inputs: &[Input],
    model: &Tabular,
    max_rows: usize,
) -> Result<(Vec<f64>, usize), ApiError> {
    let features = &model.schema.features;
    let width = features.len();
    let columns: Vec<(usize, &Input)> = match inputs {
        [one] if one.shape.len() == 2 => {
            if one.shape[1] != width {
                return Err(ApiError::invalid(format!(
                    "Input `{}` has {} columns; the model takes {width} features ({})",
                    one.name,
                    one.shape[1],
                    names(features.iter().map(String::as_str))
                )));
            }
            (0..width).map(|f| (f, one)).collect()
        }
        _ => {
            let mut seen = vec![false; width];
            let mut columns = Vec::with_capacity(inputs.len());
            for input in inputs {
                let f = features
                    .iter()
                    .position(|n| *n == input.name)
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "Unknown feature `{}`; the model's features are {}",
                            input.name,
                            names(features.iter().map(String::as_str))
                        ))
                    })?;
                if std::mem::replace(&mut seen[f], true) {
                    return Err(ApiError::invalid(format!(
                        "Feature `{}` is given twice",
                        input.name
                    )));
                }
                if !matches!(input.shape.as_slice(), [_] | [_, 1]) {
                    return Err(ApiError::invalid(format!(
                        "Input `{}` has shape {:?}; a feature's input is 1-D, one value per row (or send one 2-D input of rows by features)",
                        input.name, input.shape
                    )));
                }
                columns.push((f, input));
            }
            if let Some(missing) = seen.iter().position(|s| !s) {
                return Err(ApiError::invalid(format!(
                    "Feature `{}` is missing; send every feature (null for a missing value)",
                    features[missing]
                )));
            }
            columns
        }
    };
    let n_rows = columns.first().map_or(0, |(_, i)| i.shape[0]);
    if let Some((_, other)) = columns.iter().find(|(_, i)| i.shape[0] != n_rows) {
        return Err(ApiError::invalid(format!(
            "Input `{}` has {} rows; the others have {n_rows}",
            other.name, other.shape[0]
        )));
    }
    if n_rows == 0 {
        return Err(ApiError::invalid("The request has no rows"));
    }
    if n_rows > max_rows {
        return Err(ApiError::invalid(format!(
            "The request has {n_rows} rows, more than the limit of {max_rows}"
        )));
    }
    let mut rows = vec![0.0; n_rows * width];
    for (f, input) in columns {
        // A 2-D input's column `f`, or a 1-D input's only column.
        let (stride, offset) = if input.shape.len() == 2 && input.shape[1] == width && width > 1 {
            (width, f)
        } else {
            (1, 0)
        };
        for r in 0..n_rows {
            let at = r * stride + offset;
            rows[r * width + f] = match &input.values {
                Values::Numbers(v) => v[at],
                Values::Names(v) => category(model, f, v[at].as_deref(), &input.name)?,
            };
            if rows[r * width + f].is_infinite() {
                return Err(ApiError::invalid(format!(
                    "Input `{}` holds an infinite value in row {r}; send null for a missing value",
                    input.name
                )));
            }
        }
    }
    Ok((rows, n_rows))
}

/// A category name to the code the model was trained on.
fn category(
    model: &Tabular,
    feature: usize,
    name: Option<&str>,
    input: &str,
) -> Result<f64, ApiError> {
    let Some(name) = name else {
        return Ok(f64::NAN);
    };
    let codes = &model.categories[feature];
    if codes.is_empty() {
        return Err(ApiError::invalid(format!(
            "Input `{input}` holds the text `{name}` for feature `{}`, which takes numbers",
            model.schema.features[feature]
        )));
    }
    codes
        .iter()
        .position(|c| c == name)
        .map(|i| i as f64)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Feature `{}` has no category `{name}`; its categories are {}",
                model.schema.features[feature],
                names(codes.iter().map(String::as_str))
            ))
        })
}

#[derive(Serialize)]
struct ResponseTensor {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Serialize)]
struct Response<'a> {
    model_name: &'a str,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<ResponseTensor>,
}

/// The response: its JSON, then the binary tensors (if any were asked for) to append.
pub fn respond(
    model_name: &str,
    model: &Tabular,
    inference: Inference,
    predictions: &[f64],
) -> (Vec<u8>, Vec<u8>) {
    let n = inference.n_rows;
    let outputs = model.schema.kind.outputs();
    let mut binary = Vec::new();
    let tensors = inference
        .outputs
        .iter()
        .map(|&(output, as_binary)| {
            let (datatype, shape, data, bytes): (_, _, Value, Vec<u8>) = match output {
                Output::Probabilities | Output::Predictions => (
                    "FP64",
                    if output == Output::Predictions {
                        vec![n]
                    } else {
                        vec![n, outputs]
                    },
                    predictions.iter().map(|&p| Value::from(p)).collect(),
                    predictions.iter().flat_map(|p| p.to_le_bytes()).collect(),
                ),
                Output::Label => {
                    let labels: Vec<usize> =
                        predictions.chunks_exact(outputs).map(argmax).collect();
                    match &model.labels {
                        Some(names) => (
                            "BYTES",
                            vec![n],
                            labels
                                .iter()
                                .map(|&l| Value::from(names[l].as_str()))
                                .collect(),
                            labels
                                .iter()
                                .flat_map(|&l| {
                                    let name = names[l].as_bytes();
                                    (name.len() as u32)
                                        .to_le_bytes()
                                        .into_iter()
                                        .chain(name.iter().copied())
                                })
                                .collect(),
                        ),
                        None => (
                            "INT64",
                            vec![n],
                            labels.iter().map(|&l| Value::from(l)).collect(),
                            labels
                                .iter()
                                .flat_map(|&l| (l as i64).to_le_bytes())
                                .collect(),
                        ),
                    }
                }
            };
            let (data, parameters) = if as_binary {
                let size = bytes.len();
                binary.extend(bytes);
                (None, Some(serde_json::json!({ "binary_data_size": size })))
            } else {
                (Some(data), None)
            };
            ResponseTensor {
                name: output.name(),
                datatype,
                shape,
                data,
                parameters,
            }
        })
        .collect();
    let json = serde_json::to_vec(&Response {
        model_name,
        model_version: "1",
        id: inference.id,
        outputs: tensors,
    })
    .expect("response serializes");
    (json, binary)
}

/// The most probable class; the first of equals, as numpy's argmax.
fn argmax(probabilities: &[f64]) -> usize {
    probabilities
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &p)| {
            if p > best.1 { (i, p) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_nan_is_missing_outside_strings_only() {
        let body = br#"{"id": "NaN \"NaN\"", "data": [1.0, NaN, NaN]}"#;
        let read = python_nan(body).unwrap();
        assert_eq!(
            std::str::from_utf8(&read).unwrap(),
            r#"{"id": "NaN \"NaN\"", "data": [1.0, null, null]}"#
        );
        assert!(matches!(
            python_nan(b"[1.0]").unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(python_nan(b"[-Infinity]").is_err());
    }

    #[test]
    fn binary_tensors_decode_by_width_and_sign() {
        let Values::Numbers(v) =
            from_binary("x", DataType::Int(2), &[0xfe, 0xff, 3, 0], 2).unwrap()
        else {
            panic!("numbers")
        };
        assert_eq!(v, [-2.0, 3.0]);
        let Values::Numbers(v) = from_binary("x", DataType::Uint(2), &[0xfe, 0xff], 1).unwrap()
        else {
            panic!("numbers")
        };
        assert_eq!(v, [65534.0]);
        assert!(from_binary("x", DataType::Fp32, &[0; 6], 2).is_err());
        let mut names = 5u32.to_le_bytes().to_vec();
        names.extend(b"north");
        let Values::Names(v) = from_binary("x", DataType::Bytes, &names, 1).unwrap() else {
            panic!("names")
        };
        assert_eq!(v, [Some("north".to_string())]);
        assert!(from_binary("x", DataType::Bytes, &names[..7], 1).is_err());
    }
}
