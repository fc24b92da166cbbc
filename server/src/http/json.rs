//! A JSON body extractor whose every rejection is an OpenAI-shaped error, and which
//! refuses fields the server would otherwise ignore at the caller's cost.
use super::AppState;
use crate::api::RequestBody;
use crate::error::ApiError;
use crate::validation::{parse_json, unread_fields};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::Arc;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + RequestBody> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        // Content-Type is not required: `curl -d` sends form encoding by default.
        let body = tokio::time::timeout(state.body_timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::BodyTimeout {
                seconds: state.body_timeout.as_secs(),
            })?;
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.max_body_bytes,
                }
            } else {
                ApiError::invalid(format!(
                    "Could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        let request: T = parse_json(&body)?;
        unread_fields(request.unread())?;
        Ok(ApiJson(request))
    }
}
