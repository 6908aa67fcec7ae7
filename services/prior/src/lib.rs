//! The prior stage: `PriorTransformer` sampling with the UnCLIP scheduler (text conditioning →
//! CLIP image embedding) and the CLIP vision tower (image → CLIP image embedding) of a Kandinsky
//! 2.2 prior folder, served over gRPC (`kandinsky.v1.Prior`), with health, reflection and
//! `/metrics`.
//!
//! Requests enter in [`service`]; each RPC has its own module ([`sample`], [`encode_images`],
//! [`zero_embedding`], [`interpolate`], [`info`]); [`wire`] decodes and checks request tensors;
//! [`watchdog`] stops sampling between steps when the caller leaves or its deadline passes; the
//! numbers are computed by [`kd_models::prior::ImagePrior`].
#![forbid(unsafe_code)]

pub mod encode_images;
pub mod info;
pub mod interpolate;
pub mod model;
pub mod sample;
pub mod service;
pub mod watchdog;
pub mod wire;
pub mod zero_embedding;

use kd_runtime::admission::Admission;
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::config::{CommonArgs, StageArgs};
use kd_runtime::launch::{Launch, LaunchError};
use kd_runtime::server::Listeners;
use kd_runtime::{Metrics, Shutdown, Stage};
use std::sync::Arc;
use std::time::Duration;

pub use model::PriorModel;
pub use service::PriorService;

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "prior";

/// Largest gRPC message accepted or sent (conditioning for 64 rows of bigG is ~50 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Configuration of `kd-prior`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kd-prior",
    version,
    about = "Kandinsky prior stage: PriorTransformer sampling and CLIP vision embeddings over gRPC"
)]
pub struct Config {
    /// Flags every service takes.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Flags of the model stages.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Most rows (conditionings, images or fusion items) in one call; more get INVALID_ARGUMENT.
    #[arg(long, env = "KD_MAX_BATCH", default_value_t = 64)]
    pub max_batch: usize,
}

/// Binds the configured addresses and serves until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), LaunchError> {
    let l = Listeners::bind(&config.common).await?;
    run_with_listeners(config, l, shutdown).await
}

/// Serves on `listeners` until `shutdown` (tests bind `127.0.0.1:0`); model loading waits for
/// the listeners' load gate, if any.
pub async fn run_with_listeners(
    config: Config,
    mut listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    let gate = listeners.take_load_gate();
    let Listeners { grpc, metrics, .. } = listeners;
    let stage: Stage<PriorModel> = Stage::new(
        Admission::new(1, config.common.max_queue),
        Metrics::new(STAGE),
    );
    let (router, readiness) = kd_runtime::server::base_router(service::SERVICE_NAME).await;
    let cache = EmbeddingCache::for_stage(&config.stage, stage.metrics.clone())
        .map_err(LaunchError::Load)?;
    let router = router.add_service(
        PriorService::new(stage.clone(), Arc::new(cache), config.max_batch).into_server(),
    );
    let stage_args = config.stage.clone();
    Launch {
        stage,
        router,
        readiness,
        grpc,
        metrics,
        shutdown,
        drain_delay: Duration::from_secs_f64(config.common.drain_delay_secs.max(0.0)),
    }
    .run(gate, move || PriorModel::load_and_warm(&stage_args))
    .await
}
