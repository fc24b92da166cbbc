//! A JSON body extractor whose every rejection is an OpenAI-shaped error, and which
//! refuses fields the server would otherwise ignore at the caller's cost.
use super::AppState;
use crate::api::RequestBody;
use crate::error::ApiError;
use crate::validation::{parse_json, unread_fields};
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use std::sync::Arc;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + RequestBody> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let body = state.edge.read_body(req).await?;
        let request: T = parse_json(&body)?;
        unread_fields(request.unread())?;
        Ok(ApiJson(request))
    }
}
