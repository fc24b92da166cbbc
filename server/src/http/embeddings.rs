//! `POST /v1/embeddings`: every input of a request goes to the batcher at once.
use super::AppState;
use super::json::ApiJson;
use crate::api::{EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage, EmbeddingVector};
use crate::engine::EncoderInput;
use crate::error::ApiError;
use crate::model::Task;
use crate::validation::{PromptInput, check_model, check_token_ids, embedding_inputs};
use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use std::sync::Arc;

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingList>, ApiError> {
    check_model(&req.model, &state.model_name)?;
    let engine = state.encoder(Task::Embedding, "/v1/embeddings")?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, got `{other}`"),
            ));
        }
    };
    if let Some(d) = req.dimensions
        && d < 1
    {
        return Err(ApiError::invalid_param(
            "dimensions",
            "`dimensions` must be positive",
        ));
    }
    let inputs = embedding_inputs(req.input)?;
    let _permit = state.edge.admission.admit().await?;
    let sequences = state
        .prompts
        .run(move |p| {
            inputs
                .into_iter()
                .map(|input| match input {
                    PromptInput::Tokens(ids) => Ok(ids),
                    PromptInput::Text(text) => p.encode("input", &text, true),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    for ids in &sequences {
        check_token_ids("input", ids, state.info.vocab_size)?;
    }
    let inputs = sequences.into_iter().map(EncoderInput::single).collect();
    let (vectors, prompt_tokens) = state.encode(engine, inputs).await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            if let Some(d) = req.dimensions
                && d as usize != vector.len()
            {
                return Err(ApiError::invalid_param(
                    "dimensions",
                    format!(
                        "This model returns {} dimensions; `dimensions` asked for {d}",
                        vector.len()
                    ),
                ));
            }
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(vector)
            };
            Ok(EmbeddingData {
                object: "embedding",
                index,
                embedding,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Json(EmbeddingList {
        object: "list",
        data,
        model: state.model_name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}
