//! The text-encoder stage: the CLIP tokenizer and text tower of a Kandinsky prior folder (and,
//! for Kandinsky 2.1, the decoder folder's multilingual XLM-R encoder), served over gRPC (`kandinsky.v1.TextEncoder`), with health, reflection and `/metrics`.
//!
//! Requests enter in [`service`], each RPC has its own module ([`encode`], [`info`]), and the
//! numbers are computed by [`kd_models::clip::ClipTextEncoder`].
#![forbid(unsafe_code)]

pub mod encode;
pub mod info;
pub mod model;
pub mod service;

use kd_runtime::admission::Admission;
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::config::{CommonArgs, StageArgs};
use kd_runtime::launch::{Launch, LaunchError};
use kd_runtime::server::Listeners;
use kd_runtime::{Metrics, Shutdown, Stage};
use std::sync::Arc;
use std::time::Duration;

pub use model::TextModel;
pub use service::TextEncoderService;

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "text_encoder";

/// Largest gRPC message accepted or sent (a batch of 64 bigG hidden states is ~25 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Longest prompt accepted, in characters (CLIP truncates to 77 tokens; this only bounds work).
pub const MAX_PROMPT_CHARS: usize = 10_000;

/// Configuration of `kd-text-encoder`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kd-text-encoder",
    version,
    about = "Kandinsky text-encoder stage: CLIP tokenizer + text tower over gRPC"
)]
pub struct Config {
    /// Flags every service takes.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Flags of the model stages.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Kandinsky 2.1 only: the decoder checkpoint folder whose `tokenizer/` and `text_encoder/`
    /// (XLM-R + MultilingualCLIP) produce the decoder's text conditioning. Required when
    /// `--model-dir` is a 2.1 prior folder; must be the same family.
    #[arg(long, env = "KD_DECODER_MODEL_DIR")]
    pub decoder_model_dir: Option<std::path::PathBuf>,
    /// Most prompts in one Encode call; larger requests get INVALID_ARGUMENT.
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
    let stage: Stage<TextModel> = Stage::new(
        Admission::new(1, config.common.max_queue),
        Metrics::new(STAGE),
    );
    let (router, readiness) = kd_runtime::server::base_router(service::SERVICE_NAME).await;
    let cache = EmbeddingCache::for_stage(&config.stage, stage.metrics.clone())
        .map_err(LaunchError::Load)?;
    let router = router.add_service(
        TextEncoderService::new(stage.clone(), Arc::new(cache), config.max_batch).into_server(),
    );
    let stage_args = config.stage.clone();
    let decoder_dir = config.decoder_model_dir.clone();
    Launch {
        stage,
        router,
        readiness,
        grpc,
        metrics,
        shutdown,
        drain_delay: Duration::from_secs_f64(config.common.drain_delay_secs.max(0.0)),
    }
    .run(gate, move || {
        TextModel::load_and_warm(&stage_args, decoder_dir.as_deref())
    })
    .await
}
