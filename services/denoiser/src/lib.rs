//! The denoiser stage: the decoder UNet and its schedulers (`kandinsky.v1.Denoiser`). Runs the
//! whole denoising loop server-side, streams one progress event per step (with optional
//! predicted-x0 previews) and then the final latents; refuses at once work that cannot finish
//! before its deadline (see [`budget`]) and stops within one UNet layer when the caller goes
//! away or its deadline passes.
#![forbid(unsafe_code)]

pub mod batcher;
pub mod budget;
pub mod denoise;
pub mod guided;
pub mod model;
pub mod request;
pub mod tokens;
pub mod wire;

use denoise::denoise;
use kd_proto::to_wire;
use kd_proto::v1::{self, denoise_event, denoiser_server::DenoiserServer, DenoiseEvent};
use kd_runtime::config::{CommonArgs, PixelArgs, StageArgs};
use kd_runtime::stage::EventStream;
use kd_runtime::{
    blocking, Call, Launch, LaunchError, Listeners, ServiceError, Shutdown, Sink, Stage,
};
use model::DecoderModel;
use request::{Limits, Plan};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The `stage` label of this service's metrics.
pub const STAGE: &str = "denoiser";

/// Denoiser configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kd-denoiser",
    about = "kandinsky-serve denoiser stage (decoder UNet + schedulers)"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub stage: StageArgs,
    /// Denoising loops running at once (the rest wait): with step-level batching, the loops
    /// of families that do not batch (aMUSEd, Kandinsky 2.0).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: usize,
    /// Most rows (images) per Denoise request.
    #[arg(long, env = "KD_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    #[command(flatten)]
    pub schedule: model::ScheduleArgs,
    #[command(flatten)]
    pub pixels: PixelArgs,
    /// Step-level batching across requests: UNet rows per call (a CFG image is two rows).
    /// Running requests of one size share every UNet call, joining and leaving at step
    /// boundaries; 0 = every request runs its own loop (`--max-concurrency` at once).
    #[arg(long, env = "KD_MAX_BATCH_ROWS", default_value_t = 8)]
    pub max_batch_rows: usize,
    /// With batching: how long a request arriving at an idle denoiser waits for companions.
    #[arg(long, env = "KD_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
}

/// What the stage loaded: a decoder UNet (Kandinsky 2.1 / 2.2), for an aMUSEd folder the
/// masked-token generator, for a Kandinsky 2.0 folder its UNet with the official guided
/// samplers. The folder decides, read while loading (the stage answers health NOT_SERVING
/// meanwhile).
pub enum Loaded {
    Decoder(Arc<DecoderModel>),
    Tokens(Box<tokens::TokenModel>),
    Guided(Box<guided::GuidedModel>),
}

impl kd_runtime::StageModel for Loaded {
    fn info(&self) -> &v1::ModelInfo {
        match self {
            Self::Decoder(m) => &m.info,
            Self::Tokens(m) => &m.info,
            Self::Guided(m) => &m.info,
        }
    }
}

/// A request checked against what was loaded.
pub enum Checked {
    Decoder(Plan),
    Tokens(tokens::TokenPlan),
    Guided(guided::GuidedPlan),
}

/// The denoiser service.
#[derive(Clone)]
pub struct Denoiser {
    stage: Stage<Loaded>,
    limits: Limits,
    /// Step-level batching: rows per UNet call and the join wait (`None` = off); the loop
    /// starts with the first request (it needs the loaded model).
    batching: Option<(usize, std::time::Duration)>,
    batcher: Arc<std::sync::OnceLock<batcher::Batcher>>,
    /// Loops of their own (aMUSEd, Kandinsky 2.0) running at once: with batching the admission
    /// lets in enough requests to fill a UNet call, and these loops share no call.
    own_loops: Arc<tokio::sync::Semaphore>,
}

impl Denoiser {
    /// The service over `stage`, accepting at most `max_batch` rows and `pixels` per request.
    pub fn new(stage: Stage<Loaded>, max_batch: usize, pixels: PixelArgs) -> DenoiserServer<Self> {
        let own_loops = tokio::sync::Semaphore::MAX_PERMITS;
        DenoiserServer::new(Self::service(stage, max_batch, pixels, None, own_loops))
    }

    fn service(
        stage: Stage<Loaded>,
        max_batch: usize,
        pixels: PixelArgs,
        batching: Option<(usize, std::time::Duration)>,
        own_loops: usize,
    ) -> Self {
        Self {
            stage,
            limits: Limits {
                max_batch: max_batch.max(1),
                pixels,
                tensors: Default::default(),
            },
            batching,
            batcher: Default::default(),
            own_loops: Arc::new(tokio::sync::Semaphore::new(own_loops.max(1))),
        }
    }

    /// The service with step-level batching: `rows` UNet rows per call, a new request at an
    /// idle denoiser waiting `wait` for companions (decoder UNets only: an aMUSEd or Kandinsky
    /// 2.0 request runs its own loop, `own_loops` at once).
    pub fn batched(
        stage: Stage<Loaded>,
        max_batch: usize,
        pixels: PixelArgs,
        rows: usize,
        wait: std::time::Duration,
        own_loops: usize,
    ) -> DenoiserServer<Self> {
        let batching = Some((rows, wait));
        DenoiserServer::new(Self::service(stage, max_batch, pixels, batching, own_loops))
    }
}

#[tonic::async_trait]
impl v1::denoiser_server::Denoiser for Denoiser {
    type DenoiseStream = EventStream<DenoiseEvent>;

    async fn denoise(
        &self,
        request: Request<v1::DenoiseRequest>,
    ) -> Result<Response<EventStream<DenoiseEvent>>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let limits = self.limits;
        let deadline = call.deadline;
        let check = move |m: &Loaded| {
            Ok(match m {
                Loaded::Decoder(m) => {
                    let plan = request::plan(m, &limits, &req)?;
                    m.cost.check(&plan, m.movq_scale_factor, deadline)?;
                    Checked::Decoder(plan)
                }
                Loaded::Tokens(m) => Checked::Tokens(tokens::check(m, &limits, &req, deadline)?),
                Loaded::Guided(m) => Checked::Guided(guided::check(m, &limits, &req, deadline)?),
            })
        };
        let metrics = self.stage.metrics.clone();
        let (batching, batcher) = (self.batching, self.batcher.clone());
        let own_loops = self.own_loops.clone();
        let run = move |m: Arc<Loaded>, checked: Checked, sink: Sink<DenoiseEvent>| async move {
            let worker = sink.clone();
            let own_loop = || async {
                own_loops
                    .acquire_owned()
                    .await
                    .map_err(|_| ServiceError::Unavailable("the denoiser is shutting down".into()))
            };
            let (latents, info) = match (&*m, checked) {
                (Loaded::Decoder(d), Checked::Decoder(plan)) => {
                    let span = tracing::info_span!(
                        "denoise",
                        rows = plan.seeds.len(),
                        steps = plan.steps,
                        height = plan.height,
                        width = plan.width,
                    );
                    let model = d.clone();
                    let latents = match batching {
                        Some((rows, wait)) => {
                            let b = batcher.get_or_init(|| {
                                batcher::Batcher::start(d.clone(), metrics, rows, wait)
                            });
                            tracing::Instrument::instrument(b.denoise(plan, worker), span).await?
                        }
                        None => {
                            tracing::Instrument::instrument(
                                blocking(move || denoise(&model, plan, &worker, &metrics)),
                                span,
                            )
                            .await?
                        }
                    };
                    (latents, d.info.clone())
                }
                (Loaded::Tokens(t), Checked::Tokens(plan)) => {
                    let span = tokens::span(&plan);
                    let model = m.clone();
                    let _slot = own_loop().await?;
                    let tokens = tracing::Instrument::instrument(
                        blocking(move || match &*model {
                            Loaded::Tokens(t) => tokens::generate(t, plan, &worker, &metrics),
                            _ => unreachable_model(),
                        }),
                        span,
                    )
                    .await?;
                    (tokens, t.info.clone())
                }
                (Loaded::Guided(g), Checked::Guided(plan)) => {
                    let span = guided::span(&plan);
                    let model = m.clone();
                    let _slot = own_loop().await?;
                    let latents = tracing::Instrument::instrument(
                        blocking(move || match &*model {
                            Loaded::Guided(g) => guided::generate(g, plan, &worker, &metrics),
                            _ => unreachable_model(),
                        }),
                        span,
                    )
                    .await?;
                    (latents, g.info.clone())
                }
                _ => return unreachable_model(),
            };
            sink.send(DenoiseEvent {
                event: Some(denoise_event::Event::Result(v1::DenoiseResult {
                    latents: Some(to_wire(&latents)?),
                    model: Some(info),
                })),
            })
            .await
        };
        self.stage.stream("Denoise", call, check, run).await
    }
}

/// A request checked against one kind of model reaching the other (the loaded model never
/// changes, so this cannot happen).
fn unreachable_model<T>() -> Result<T, ServiceError> {
    Err(ServiceError::Internal(
        "a request checked for one kind of model ran on another".into(),
    ))
}

/// Serves on `listeners` until `shutdown`: NOT_SERVING while the model loads and warms up
/// (one step), SERVING after. An aMUSEd folder loads the token generator
/// ([`tokens::TokenModel`]) and a Kandinsky 2.0 folder its guided sampler
/// ([`guided::GuidedModel`]) behind the same API; step-level batching applies to decoder UNets
/// only (the others run their own loops, up to the admission's concurrency).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    // With batching every admitted request waits in the shared loop, which bounds the work:
    // admit as many as can share a call.
    let concurrency = config.max_concurrency.max(config.max_batch_rows);
    let stage = Stage::new(STAGE, concurrency, config.common.max_queue);
    let service = match config.max_batch_rows {
        0 => Denoiser::new(stage.clone(), config.max_batch, config.pixels),
        rows => Denoiser::batched(
            stage.clone(),
            config.max_batch,
            config.pixels,
            rows,
            std::time::Duration::from_millis(config.batch_wait_ms),
            config.max_concurrency,
        ),
    };
    let launch = Launch::stage(stage, &config.common).serve(service);
    let pixels = config.pixels;
    let load = blocking(move || {
        // Opened once (model_index.json is read once): the family decides what to load.
        let dir = kd_models::CheckpointDir::open(&config.stage.model_dir)?;
        let own_loop = match dir.family() {
            kd_models::ModelFamily::Amused => Some("aMUSEd"),
            kd_models::ModelFamily::Kandinsky20 => Some("Kandinsky 2.0"),
            _ => None,
        };
        if let (Some(family), true) = (own_loop, config.max_batch_rows > 0) {
            tracing::info!(
                max_batch_rows = config.max_batch_rows,
                max_concurrency = config.max_concurrency,
                "step-level batching is not implemented for {family} folders; each request runs \
                 its own loop, --max-concurrency at once"
            );
        }
        match dir.family() {
            kd_models::ModelFamily::Amused => {
                let model = tokens::TokenModel::load_and_warm(&config.stage, &dir, pixels)?;
                return Ok(Loaded::Tokens(Box::new(model)));
            }
            kd_models::ModelFamily::Kandinsky20 => {
                let model = guided::GuidedModel::load_and_warm(&config.stage, &dir, pixels)?;
                return Ok(Loaded::Guided(Box::new(model)));
            }
            _ => {}
        }
        let mut model = DecoderModel::load_and_warm(&config.stage, &dir, &config.schedule)?;
        model.info.max_pixels = pixels.limit(&model.device);
        Ok(Loaded::Decoder(Arc::new(model)))
    });
    launch.run(listeners, shutdown, load).await
}
