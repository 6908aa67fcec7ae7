//! The MoVQ stage: decodes latents into encoded images and encodes images (and inpaint masks)
//! into latents, on one loaded autoencoder, served over gRPC (`kandinsky.v1.Movq`) by the one
//! stage launcher. For a Kandinsky 2.1 / 2.2 folder it is the MoVQ (`movq/`). For an aMUSEd
//! folder it is the VQ-GAN (`vqvae/`) and the latents are (B, h, w) token maps: DecodeLatents
//! takes one, EncodeImages returns one (and token-grid masks). For a Kandinsky 2.0 folder it is
//! the KL autoencoder (`vae.ckpt`, config `vae.json` or the official one): DecodeLatents takes
//! the UNet's scaled latents and converts as the official `process_images`; EncodeImages
//! prepares images as the official `prepare_image` and samples the posterior from one seed per
//! image (`EncodeImagesRequest.seeds`, required there and refused elsewhere).
#![forbid(unsafe_code)]

mod decode;
mod encode;
pub mod model;
pub mod service;

use kd_runtime::config::{CommonArgs, MicroBatchArgs, PixelArgs, StageArgs};
use kd_runtime::{blocking, Launch, LaunchError, Listeners, Shutdown, Stage};

pub use model::Movq;
pub use service::MovqService;

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "movq";

/// Configuration of the MoVQ stage.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kd-movq",
    about = "kandinsky-serve MoVQ stage (latents ⇄ pixels)"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub stage: StageArgs,
    /// Attention queries per chunk (bounds peak memory on large images; 0 = unchunked).
    #[arg(long, env = "KD_ATTENTION_CHUNK", default_value_t = 1024)]
    pub attention_chunk: usize,
    /// Most images per call.
    #[arg(long, env = "KD_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// With micro-batching off: calls computing at once (the rest queue).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: usize,
    #[command(flatten)]
    pub pixels: PixelArgs,
    /// Micro-batching of concurrent decodes (images per decoder call).
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
    let concurrency = batching.admitted(config.max_concurrency);
    let stage = Stage::new(STAGE, concurrency, config.common.max_queue);
    let service = MovqService::new(stage.clone(), batching.policy());
    let launch = Launch::stage(stage, &config.common).serve(service);
    let load = blocking(move || Movq::load_and_warm(&config));
    launch.run(listeners, shutdown, load).await
}
