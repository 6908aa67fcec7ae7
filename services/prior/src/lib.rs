//! The prior stage: `PriorTransformer` sampling with the UnCLIP scheduler (text conditioning →
//! CLIP image embedding) and the CLIP vision tower (image → CLIP image embedding) of a Kandinsky
//! prior folder, served over gRPC (`kandinsky.v1.Prior`) by the one stage launcher.
//!
//! Requests enter in [`service`]; each RPC has its own module ([`sample`], [`encode_images`],
//! [`zero_embedding`], [`interpolate`]); [`wire`] decodes and checks request tensors; [`noise`]
//! stops sampling between steps when the call is cancelled; the numbers are computed by
//! [`kd_models::prior::ImagePrior`].
#![forbid(unsafe_code)]

pub mod encode_images;
pub mod interpolate;
pub mod model;
pub mod noise;
pub mod sample;
pub mod service;
pub mod wire;
pub mod zero_embedding;

use kd_runtime::cache::EmbeddingCache;
use kd_runtime::config::{CommonArgs, MicroBatchArgs, StageArgs};
use kd_runtime::{blocking, Launch, LaunchError, Listeners, Shutdown, Stage};
use std::sync::Arc;

pub use model::PriorModel;
pub use service::PriorService;

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "prior";

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
    /// Micro-batching of concurrent Sample calls (transformer rows per call; a CFG row is two).
    #[command(flatten)]
    pub batching: MicroBatchArgs,
}

/// Serves on `listeners` until `shutdown`.
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    let batching = config.batching;
    let stage = Stage::new(STAGE, batching.admitted(1), config.common.max_queue);
    let cache = EmbeddingCache::for_stage(&config.stage, stage.metrics.clone())?;
    let service = PriorService::new(
        stage.clone(),
        Arc::new(cache),
        config.max_batch,
        batching.policy(),
    );
    let args = config.stage.clone();
    Launch::stage(stage, &config.common)
        .serve(service)
        .run(
            listeners,
            shutdown,
            blocking(move || PriorModel::load_and_warm(&args)),
        )
        .await
}
