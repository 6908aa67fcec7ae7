//! What every kandinsky-serve service shares: command-line conventions, the one error→status
//! mapping, admission control, health, metrics, deadlines and graceful shutdown.
#![forbid(unsafe_code)]

pub mod admission;
pub mod cache;
pub mod config;
pub mod deadline;
pub mod error;
pub mod launch;
pub mod metrics;
pub mod model_info;
pub mod server;
pub mod shutdown;
pub mod stage;
pub mod telemetry;

pub use admission::{Admission, Permit};
pub use error::ServiceError;
pub use metrics::Metrics;
pub use shutdown::Shutdown;
pub use stage::{blocking, Admitted, Stage};
