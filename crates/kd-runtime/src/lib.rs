//! What every kandinsky-serve service shares: the one launcher ([`launch`]), the per-RPC
//! primitives ([`Stage`]: validation, admission, deadlines, cancellation, metrics, streaming),
//! command-line conventions, the one error→status mapping, health, metrics, traces, the
//! embedding cache and graceful shutdown.
//!
//! The `models` feature (on for the model stages, off for the gateway) adds what needs candle
//! and the model crate: stage flags (device, dtype, model folder), model info and revisions.
#![forbid(unsafe_code)]

pub mod admission;
pub mod budget;
pub mod cache;
pub mod cancel;
pub mod config;
pub mod deadline;
pub mod error;
pub mod launch;
pub mod metrics;
pub mod microbatch;
pub mod model_info;
pub mod server;
pub mod shutdown;
pub mod stage;
pub mod telemetry;
pub mod tls;

pub use admission::{Admission, Permit};
pub use cancel::Cancel;
pub use error::ServiceError;
pub use launch::{Launch, LaunchError, Listeners};
pub use metrics::Metrics;
pub use microbatch::MicroBatcher;
pub use shutdown::Shutdown;
pub use stage::{blocking, Call, Sink, Stage, StageModel};
