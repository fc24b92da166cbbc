//! `POST /v1/rerank`: a cross-encoder scores each document against the query, in the shape
//! Cohere, Jina and TEI use. Every pair of a request goes to the batcher at once.
use super::AppState;
use super::json::ApiJson;
use crate::api::{RerankRequest, RerankResponse, RerankResult, RerankUsage, RerankedDocument};
use crate::error::ApiError;
use crate::model::Task;
use crate::validation::check_model;
use axum::Json;
use axum::extract::State;
use std::sync::Arc;

/// Cohere's limit on documents in one request.
pub const MAX_DOCUMENTS: usize = 1000;

pub async fn rerank(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<RerankRequest>,
) -> Result<Json<RerankResponse>, ApiError> {
    check_model(&req.model, &state.model_name)?;
    let engine = state.encoder(Task::Rerank, "/v1/rerank")?;
    let documents: Vec<String> = req.documents.into_iter().map(|d| d.into_text()).collect();
    if documents.is_empty() || documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid_param(
            "documents",
            format!(
                "`documents` must hold 1 to {MAX_DOCUMENTS} documents, got {}",
                documents.len()
            ),
        ));
    }
    let top_n = match req.top_n {
        None => documents.len(),
        Some(n) if n >= 1 => (n as usize).min(documents.len()),
        Some(n) => {
            return Err(ApiError::invalid_param(
                "top_n",
                format!("`top_n` must be at least 1, got {n}"),
            ));
        }
    };
    let _permit = state.edge.admission.admit().await?;
    let query = req.query;
    let (pairs, documents) = state
        .prompts
        .run(move |p| {
            let pairs = documents
                .iter()
                .enumerate()
                .map(|(i, d)| p.encode_pair(&format!("documents[{i}]"), &query, d))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((pairs, documents))
        })
        .await?;
    let (logits, total_tokens) = state.encode(engine, pairs).await?;
    // sentence-transformers' CrossEncoder reads a single logit through a sigmoid.
    let mut scored: Vec<(usize, f32)> = logits
        .iter()
        .map(|l| 1.0 / (1.0 + (-l[0]).exp()))
        .enumerate()
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut documents: Vec<Option<String>> = documents.into_iter().map(Some).collect();
    let results = scored
        .into_iter()
        .take(top_n)
        .map(|(index, relevance_score)| RerankResult {
            index,
            relevance_score,
            document: req.return_documents.then(|| RerankedDocument {
                text: documents[index].take().unwrap_or_default(),
            }),
        })
        .collect();
    Ok(Json(RerankResponse {
        id: uuid::Uuid::new_v4().simple().to_string(),
        model: state.model_name.clone(),
        results,
        usage: RerankUsage { total_tokens },
    }))
}
