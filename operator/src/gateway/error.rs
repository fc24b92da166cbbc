//! Everything the gateway refuses, mapped once to OpenAI's error shape and a status code.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kandle_contract::openai::{ErrorBody, ErrorDetail};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("The request has no `model`; name one of GET /v1/models")]
    MissingModel,
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("No such endpoint")]
    NotFound,
    #[error("This endpoint takes POST requests only")]
    MethodNotAllowed,
    #[error("The request's head is over 64 KiB or 100 headers")]
    HeadTooLarge,
    #[error("Request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("The request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("Missing or unknown API key; send it as `Authorization: Bearer KEY`")]
    Unauthorized,
    #[error("This API key may not call the model `{0}`")]
    Forbidden(String),
    #[error("This API key sent more requests than its limit allows; retry later")]
    RateLimited(Duration),
    #[error("This API key has as many requests in flight as its limit allows; retry later")]
    TooManyConcurrent,
    #[error("The model `{0}` cannot serve: {1}")]
    ModelFailed(String, String),
    #[error("The model `{0}` has no ready replica yet; retry later")]
    NotReady(String, Duration),
    #[error("Too many requests are waiting for the model `{0}` to start; retry later")]
    HoldQueueFull(String),
    #[error("The model `{0}` could not be reached")]
    Upstream(String),
    #[error("The gateway is shutting down")]
    Draining,
}

/// Seconds a client is told to wait when nothing better is known.
const RETRY_SOON: Duration = Duration::from_secs(1);

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::MissingModel => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) | Self::TooManyConcurrent => StatusCode::TOO_MANY_REQUESTS,
            Self::ModelFailed(..)
            | Self::NotReady(..)
            | Self::HoldQueueFull(_)
            | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest(_)
            | Self::MissingModel
            | Self::HeadTooLarge
            | Self::PayloadTooLarge(_) => ("invalid_request_error", None),
            Self::BodyTimeout(_) => ("invalid_request_error", Some("timeout")),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::NotFound => ("invalid_request_error", Some("not_found")),
            Self::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            Self::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            Self::Forbidden(_) => ("permission_error", Some("model_not_allowed")),
            Self::RateLimited(_) | Self::TooManyConcurrent => {
                ("rate_limit_error", Some("rate_limit_exceeded"))
            }
            Self::ModelFailed(..) => ("server_error", Some("model_failed")),
            Self::NotReady(..) | Self::HoldQueueFull(_) | Self::Draining => {
                ("server_error", Some("unavailable"))
            }
            Self::Upstream(_) => ("server_error", Some("upstream_unreachable")),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited(wait) | Self::NotReady(_, wait) => Some(*wait),
            Self::TooManyConcurrent | Self::HoldQueueFull(_) | Self::Draining => Some(RETRY_SOON),
            _ => None,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (kind, code) = self.kind_and_code();
        let param = matches!(
            self,
            Self::MissingModel | Self::ModelNotFound(_) | Self::Forbidden(_)
        )
        .then_some("model");
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up: `Retry-After: 0` would invite a hot loop.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if matches!(self, Self::MethodNotAllowed) {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}
