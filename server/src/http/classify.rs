//! `POST /v1/classify`: a sequence classifier's label probabilities for each input, in
//! vLLM's shape.
use super::json::ApiJson;
use super::{AppState, unix_now};
use crate::api::{Classification, ClassificationList, ClassifyRequest, EmbeddingUsage};
use crate::engine::EncoderInput;
use crate::error::ApiError;
use crate::model::Task;
use crate::validation::{MAX_EMBEDDING_INPUTS, check_model};
use axum::Json;
use axum::extract::State;
use std::sync::Arc;

pub async fn classify(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ClassifyRequest>,
) -> Result<Json<ClassificationList>, ApiError> {
    check_model(&req.model, &state.model_name)?;
    let engine = state.encoder(Task::Classify, "/v1/classify")?;
    let texts = req.input.into_vec();
    if texts.is_empty() || texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            format!(
                "`input` must hold 1 to {MAX_EMBEDDING_INPUTS} texts, got {}",
                texts.len()
            ),
        ));
    }
    let _permit = state.edge.admission.admit().await?;
    let inputs = state
        .prompts
        .run(move |p| {
            texts
                .iter()
                .map(|t| p.encode("input", t, true).map(EncoderInput::single))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let (logits, prompt_tokens) = state.encode(engine, inputs).await?;
    let labels = &state.info.labels;
    let data = logits
        .into_iter()
        .enumerate()
        .map(|(index, l)| {
            let probs = if labels.multi_label {
                l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect()
            } else {
                softmax(&l)
            };
            let best = (0..probs.len())
                .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                .unwrap_or(0);
            Classification {
                index,
                label: labels.names.get(best).cloned().unwrap_or_default(),
                num_classes: probs.len(),
                probs,
            }
        })
        .collect();
    Ok(Json(ClassificationList {
        id: format!("classify-{}", uuid::Uuid::new_v4().simple()),
        object: "list",
        created: unix_now(),
        model: state.model_name.clone(),
        data,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}
