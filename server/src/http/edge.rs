//! What every API of the server shares, whatever model it serves: admission, metrics, the
//! drain flag, API keys, and the bounds on request bodies.
use crate::admission::Admission;
use crate::cli::ServeArgs;
use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Edge {
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Accepted bearer tokens; empty means the API is open.
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    /// How long a request's whole body may take to arrive.
    pub body_timeout: Duration,
}

impl Edge {
    pub fn new(args: &ServeArgs, metrics: Arc<Metrics>, api_keys: Vec<String>) -> Self {
        Self {
            admission: Admission::new(
                args.max_concurrent_requests,
                args.max_queue,
                metrics.clone(),
            ),
            metrics,
            draining: AtomicBool::new(false),
            api_keys,
            max_body_bytes: args.max_body_bytes,
            body_timeout: Duration::from_secs(args.body_timeout_seconds.max(1)),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether an API request may proceed: not while draining, and only with a key when
    /// keys are set.
    pub fn admit_caller(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.is_draining() {
            return Err(ApiError::Unavailable("The server is shutting down"));
        }
        check_api_key(&self.api_keys, headers)
    }

    /// A request's whole body, within the size limit and the body timeout.
    pub async fn read_body(&self, req: Request) -> Result<Bytes, ApiError> {
        // Content-Type is not required: `curl -d` sends form encoding by default.
        let body = tokio::time::timeout(self.body_timeout, Bytes::from_request(req, &()))
            .await
            .map_err(|_| ApiError::BodyTimeout {
                seconds: self.body_timeout.as_secs(),
            })?;
        body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: self.max_body_bytes,
                }
            } else {
                ApiError::invalid(format!(
                    "Could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })
    }
}

fn check_api_key(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim_start())
        .ok_or(ApiError::Unauthorized(
            "Missing API key: send `Authorization: Bearer KEY`",
        ))?;
    // Compare every byte of every key so timing does not reveal a matching prefix.
    let matches = keys.iter().fold(false, |found, key| {
        found | constant_time_eq(key.as_bytes(), presented.as_bytes())
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("Invalid API key"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
