//! OpenAI's error shape, which the server and the gateway both answer in.
use serde::Serialize;

/// `{"error": {"message", "type", "param", "code"}}`: what the official clients parse.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}
