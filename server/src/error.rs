//! One error type for the HTTP edge, mapped once to OpenAI's error shape and status code.
use crate::engine::EngineError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kandle_contract::openai::{ErrorBody, ErrorDetail};

/// Seconds a client is told to wait after a 429.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("No such endpoint")]
    NotFound,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("Request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("The request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: u64 },
    #[error("Method not allowed; see the API reference for this path's methods")]
    MethodNotAllowed,
    #[error("The server is at capacity; retry later")]
    Overloaded,
    #[error("{0}")]
    Unavailable(&'static str),
    /// The cause goes to the log only: it can hold paths or a backtrace.
    #[error("The server could not complete the request; its log has the cause")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { .. } => ("invalid_request_error", None),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::NotFound => ("invalid_request_error", Some("not_found")),
            Self::Unauthorized(_) => ("authentication_error", Some("invalid_api_key")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::BodyTimeout { .. } => ("invalid_request_error", Some("timeout")),
            Self::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            Self::Overloaded => ("rate_limit_error", Some("queue_full")),
            Self::Unavailable(_) => ("server_error", Some("unavailable")),
            Self::Internal(_) => ("server_error", None),
        }
    }

    /// The JSON body, also sent as the last event of a stream that fails midway.
    pub fn body(&self) -> serde_json::Value {
        if let Self::Internal(cause) = self {
            tracing::error!(%cause, "request failed");
        }
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        };
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        })
        .expect("error body serializes")
    }
}

/// The engine knows nothing of HTTP; its errors take their OpenAI shape here, once.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::WorkerDead => Self::Unavailable("The model worker has stopped"),
            EngineError::Model(m) => Self::Internal(m),
            EngineError::Refused(m) => Self::invalid(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        self.respond(body)
    }
}

impl ApiError {
    /// This error's status and headers, with `body` in the shape of the API it answers.
    pub fn respond(self, body: serde_json::Value) -> Response {
        let mut response = (self.status(), axum::Json(body)).into_response();
        if matches!(self, Self::Overloaded) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_the_status_a_client_can_act_on() {
        let status = |e: EngineError| ApiError::from(e).status().as_u16();
        assert_eq!(status(EngineError::WorkerDead), 503);
        assert_eq!(status(EngineError::Model("nan".into())), 500);
        let refused = ApiError::from(EngineError::Refused("too long".into()));
        assert_eq!(refused.status().as_u16(), 400);
        assert_eq!(refused.body()["error"]["message"], "too long");
    }
}
