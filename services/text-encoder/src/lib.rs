//! The text-encoder stage: the CLIP tokenizer and text tower of a Kandinsky prior folder (and,
//! for Kandinsky 2.1, the decoder folder's multilingual XLM-R encoder; for an aMUSEd folder its
//! CLIP tower; for a Kandinsky 2.0 folder its M-CLIP and mT5 encoders), served over gRPC
//! (`kandinsky.v1.TextEncoder`) by the one stage launcher.
//!
//! Requests enter in [`service`]; [`encode`] checks and computes; the numbers are computed by
//! [`kd_models::clip::ClipTextEncoder`], [`kd_models::mclip::MultilingualTextEncoder`] and
//! [`kd_models::kd20::Kd20TextEncoders`].
#![forbid(unsafe_code)]

pub mod encode;
pub mod model;
pub mod service;

use kd_runtime::cache::EmbeddingCache;
use kd_runtime::config::{CommonArgs, MicroBatchArgs, StageArgs};
use kd_runtime::{blocking, Launch, LaunchError, Listeners, Shutdown, Stage};
use std::sync::Arc;

pub use model::TextModel;
pub use service::TextEncoderService;

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "text_encoder";

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
    /// Micro-batching of concurrent calls (prompts per tower call).
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
    let service = TextEncoderService::new(
        stage.clone(),
        Arc::new(cache),
        config.max_batch,
        batching.policy(),
    );
    let (args, decoder_dir) = (config.stage.clone(), config.decoder_model_dir.clone());
    let load = blocking(move || TextModel::load_and_warm(&args, decoder_dir.as_deref()));
    Launch::stage(stage, &config.common)
        .serve(service)
        .run(listeners, shutdown, load)
        .await
}
