//! kandle-server: an OpenAI-compatible inference server over candle models.
//!
//! Layers, each in its own module: `http` (router, API types, middleware), `validation`
//! (requests to typed work), `engine` (the threads that run models: a batching embedder and
//! a step-interleaving generator), `model` (loading and running model families), and the
//! small pieces they share (`admission`, `metrics`, `error`).
// Unsafe only to memory-map weights (`model::weights`, `model::decoder::source`), in CPU
// kernels (`model::decoder::quant`) and to size thread pools before threads start (`cpus`).
#![deny(unsafe_code)]

pub mod admission;
pub mod api;
pub mod chat_template;
pub mod cli;
pub mod constrain;
pub mod cpus;
pub mod detokenize;
pub mod engine;
pub mod error;
pub mod heap;
pub mod http;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pull;
pub mod serve;
pub mod tabular;
pub mod tokenize;
pub mod tools;
pub mod validation;
