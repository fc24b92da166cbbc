//! Health, readiness, metrics and the model list.
use super::AppState;
use crate::api::{ModelCard, ModelList};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use std::sync::Arc;

/// Alive while the model worker runs; a dead worker needs a restart, not traffic.
pub async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.engine.health().is_alive() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "model worker stopped")
    }
}

/// Ready once loaded and warmed (the server binds only then), until draining starts.
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.edge.metrics.encode(),
    )
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "kandle",
        }],
    })
}
