//! The MoVQ stage: decodes latents into encoded images and encodes images (and inpaint masks)
//! into latents, on one loaded `VqModel`.

mod decode;
mod encode;

use kd_models::movq::{MovqOptions, VqModel};
use kd_models::CheckpointDir;
use kd_proto::v1::{self, movq_server::MovqServer};
use kd_runtime::config::{CommonArgs, StageArgs};
use kd_runtime::launch::{Launch, LaunchError};
use kd_runtime::model_info::model_info;
use kd_runtime::server::{self, Listeners};
use kd_runtime::{blocking, Admission, Metrics, ServiceError, Shutdown, Stage};
use std::time::Duration;
use tonic::{Request, Response, Status};

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
    /// Calls computing at once (the rest queue).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: usize,
}

/// The loaded model and what requests are checked against.
pub struct Movq {
    vq: VqModel,
    info: v1::ModelInfo,
    device: candle_core::Device,
    max_batch: usize,
}

impl Movq {
    /// Loads `movq/` from a decoder checkpoint folder.
    pub fn load(config: &Config) -> Result<Self, ServiceError> {
        let dir = CheckpointDir::open(&config.stage.model_dir)?;
        let component = dir.component("movq")?;
        let device = config
            .stage
            .device
            .open()
            .map_err(ServiceError::Unavailable)?;
        let opts = MovqOptions {
            attention_chunk: config.attention_chunk,
            ..MovqOptions::default()
        };
        let vq = VqModel::load(&component, opts, config.stage.dtype, &device)?;
        let info = model_info(&dir, "movq", &["movq"], config.stage.dtype, &device)?;
        Ok(Self {
            vq,
            info,
            device,
            max_batch: config.max_batch,
        })
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct MovqService {
    stage: Stage<Movq>,
}

#[tonic::async_trait]
impl v1::movq_server::Movq for MovqService {
    async fn decode(
        &self,
        request: Request<v1::DecodeRequest>,
    ) -> Result<Response<v1::DecodeResponse>, Status> {
        let req = request.into_inner();
        self.stage
            .unary("Decode", |m| async move {
                blocking(move || decode::decode(&m, &req)).await
            })
            .await
    }

    async fn encode(
        &self,
        request: Request<v1::EncodeRequest>,
    ) -> Result<Response<v1::EncodeResponse>, Status> {
        let req = request.into_inner();
        self.stage
            .unary("Encode", |m| async move {
                blocking(move || encode::encode(&m, &req)).await
            })
            .await
    }

    async fn info(
        &self,
        _r: Request<v1::MovqInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        self.stage
            .unary("Info", |m| async move { Ok(m.info.clone()) })
            .await
    }
}

/// Binds the configured addresses and serves until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config.common).await?;
    Ok(run_with_listeners(config, listeners, shutdown).await?)
}

/// Serves on `listeners` until `shutdown`: NOT_SERVING while the model loads and warms up,
/// SERVING after.
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    let stage = Stage::new(
        Admission::new(config.max_concurrency, config.common.max_queue),
        Metrics::new("movq"),
    );
    let (router, readiness) = server::base_router("kandinsky.v1.Movq").await;
    // Latents, pixels and encoded images of large outputs exceed tonic's 4 MiB default.
    let max_message = kd_proto::TensorLimits::default().max_bytes * 2;
    let router = router.add_service(
        MovqServer::new(MovqService {
            stage: stage.clone(),
        })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message),
    );
    let drain = Duration::from_secs_f64(config.common.drain_delay_secs.max(0.0));
    let Listeners { grpc, metrics, .. } = listeners;
    let launch = Launch {
        stage,
        router,
        readiness,
        grpc,
        metrics,
        shutdown,
        drain_delay: drain,
    };
    launch
        .run(std::future::ready(()), move || {
            let m = Movq::load(&config)?;
            decode::warm_up(&m)?;
            Ok(m)
        })
        .await
}
