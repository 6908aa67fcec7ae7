//! The denoiser stage: the decoder UNet and its schedulers (`kandinsky.v1.Denoiser`). Runs the
//! whole denoising loop server-side, streams one progress event per step (with optional
//! predicted-x0 previews) and then the final latents; stops within one step when the caller
//! goes away or its deadline passes.

pub mod model;
pub mod request;

use candle_core::Tensor;
use kd_models::decoder::{run_decoder, DecoderOutcome};
use kd_models::noise::SeededNoise;
use kd_proto::v1::{self, denoise_event, denoiser_server::DenoiserServer, DenoiseEvent};
use kd_proto::{to_wire, TensorLimits};
use kd_runtime::config::{CommonArgs, StageArgs};
use kd_runtime::launch::Launch;
use kd_runtime::{blocking, deadline, server, Admission, Metrics, ServiceError, Shutdown, Stage};
use model::DecoderModel;
use request::{Limits, Plan};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The gRPC service name (also the health service name).
pub const SERVICE_NAME: &str = "kandinsky.v1.Denoiser";
const METHOD: &str = "Denoise";

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
    /// Denoising loops running at once (the rest wait in the admission queue).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: usize,
    /// Most rows (images) per Denoise request.
    #[arg(long, env = "KD_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
}

/// The denoiser service.
#[derive(Clone)]
pub struct Denoiser {
    stage: Stage<DecoderModel>,
    limits: Limits,
}

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<DenoiseEvent, Status>> + Send>>;
type EventTx = mpsc::Sender<Result<DenoiseEvent, Status>>;

impl Denoiser {
    /// Validates before admission, so a bad request is answered at once (not after the queue);
    /// it is still counted as a request and an `invalid_argument` failure.
    fn plan(&self, req: &v1::DenoiseRequest) -> Result<Option<Plan>, Status> {
        let Ok(model) = self.stage.model() else {
            // Not loaded: `admit` answers UNAVAILABLE and counts it.
            return Ok(None);
        };
        match request::plan(&model, &self.limits, req) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                tracing::warn!(stage = "denoiser", method = METHOD, error = %e, "request failed");
                self.stage
                    .metrics
                    .start(METHOD)
                    .finish::<()>(&Err(e.clone()));
                Err(Status::from(e))
            }
        }
    }
}

#[tonic::async_trait]
impl v1::denoiser_server::Denoiser for Denoiser {
    type DenoiseStream = EventStream;

    async fn denoise(
        &self,
        request: Request<v1::DenoiseRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = deadline::deadline_of(request.metadata());
        let planned = self.plan(request.get_ref())?;
        let admitted = self.stage.admit(METHOD).await?;
        let plan = match planned {
            Some(p) => p,
            // Loaded between the check and the admission: validate now.
            None => match request::plan(&admitted.model, &self.limits, request.get_ref()) {
                Ok(p) => p,
                Err(e) => {
                    admitted.finish::<()>(&Err(e.clone()));
                    return Err(Status::from(e));
                }
            },
        };
        let (tx, rx) = mpsc::channel(16);
        let metrics = self.stage.metrics.clone();
        let span = tracing::info_span!(
            "denoise",
            rows = plan.seeds.len(),
            steps = plan.steps,
            height = plan.height,
            width = plan.width,
            guidance = plan.guidance_scale,
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let started = Instant::now();
                let model = admitted.model.clone();
                let worker_tx = tx.clone();
                let result = if deadline::expired(deadline) {
                    Err(deadline_error(0, plan.steps))
                } else {
                    blocking(move || denoise(&model, plan, &worker_tx, deadline, &metrics)).await
                };
                let result = result.and_then(|latents| {
                    Ok(DenoiseEvent {
                        event: Some(denoise_event::Event::Result(v1::DenoiseResult {
                            latents: Some(
                                to_wire(&latents)
                                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
                            ),
                            model: Some(admitted.model.info.clone()),
                        })),
                    })
                });
                match &result {
                    Ok(ev) => {
                        tracing::info!(seconds = started.elapsed().as_secs_f64(), "denoised");
                        let _ = tx.send(Ok(ev.clone())).await;
                    }
                    Err(e) => {
                        tracing::warn!(stage = "denoiser", method = METHOD, error = %e, "request failed");
                        let _ = tx.send(Err(Status::from(e.clone()))).await;
                    }
                }
                admitted.finish(&result);
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _r: Request<v1::DenoiserInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        self.stage
            .unary("Info", |m| async move { Ok(m.info.clone()) })
            .await
    }
}

fn deadline_error(done: usize, total: usize) -> ServiceError {
    ServiceError::DeadlineExceeded(format!(
        "the deadline passed after {done} of {total} denoising steps"
    ))
}

/// Why the per-step callback stopped the loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    ClientGone,
    Deadline,
}

/// Sends `ev` from the blocking pool without blocking forever on a client that stopped
/// reading: waits for room while checking the deadline and whether the client went away.
fn send_blocking(
    tx: &EventTx,
    mut ev: Result<DenoiseEvent, Status>,
    deadline: Option<Instant>,
) -> Result<(), Stop> {
    loop {
        match tx.try_send(ev) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::ClientGone),
            Err(mpsc::error::TrySendError::Full(back)) => {
                if deadline::expired(deadline) {
                    return Err(Stop::Deadline);
                }
                ev = back;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Runs one request's loop on the calling (blocking-pool) thread.
pub fn denoise(
    model: &DecoderModel,
    mut plan: Plan,
    tx: &EventTx,
    deadline: Option<Instant>,
    metrics: &Metrics,
) -> Result<Tensor, ServiceError> {
    let mut noise = SeededNoise::new(&plan.seeds);
    let preview_every = plan.preview_every;
    let mut stop = None;
    let mut failure = None;
    let outcome = run_decoder(
        &model.unet,
        plan.scheduler.as_mut(),
        &plan.inputs,
        &mut noise,
        &mut |p| {
            metrics.steps(1);
            let step = p.step + 1;
            let preview = if preview_every > 0 && step % preview_every == 0 {
                // DPM-Solver++ has no x0 estimate: the current latents stand in.
                let x = p.pred_original_sample.unwrap_or(p.latents);
                match to_wire(x) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        failure = Some(ServiceError::Internal(format!("preview: {e}")));
                        return false;
                    }
                }
            } else {
                None
            };
            let ev = DenoiseEvent {
                event: Some(denoise_event::Event::Progress(v1::DenoiseProgress {
                    step: step as u32,
                    total_steps: p.total as u32,
                    preview_latents: preview,
                })),
            };
            if let Err(s) = send_blocking(tx, Ok(ev), deadline) {
                stop = Some(s);
                return false;
            }
            if tx.is_closed() {
                stop = Some(Stop::ClientGone);
                return false;
            }
            if deadline::expired(deadline) && step < p.total {
                stop = Some(Stop::Deadline);
                return false;
            }
            true
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    match outcome {
        DecoderOutcome::Finished(latents) => {
            if deadline::expired(deadline) {
                return Err(deadline_error(plan.steps, plan.steps));
            }
            latents
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| ServiceError::Internal(e.to_string()))
        }
        DecoderOutcome::Cancelled { steps_done } => Err(match stop {
            Some(Stop::Deadline) => deadline_error(steps_done, plan.steps),
            _ => ServiceError::Cancelled(format!(
                "the client went away; stopped after {steps_done} steps"
            )),
        }),
    }
}

/// Binds the configured addresses and serves until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let l = kd_runtime::server::Listeners::bind(&config.common).await?;
    run_with_listeners(config, l.grpc, l.metrics, shutdown).await
}

/// Serves on the given listeners until `shutdown` (tests bind port 0). Serving starts at once
/// with health NOT_SERVING; the model loads on the blocking pool, one warm-up step runs, then
/// health turns SERVING. A load failure ends the server with the error.
pub async fn run_with_listeners(
    config: Config,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let device = config
        .stage
        .device
        .open()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = config.stage.dtype;
    let metrics = Metrics::new("denoiser");
    let stage: Stage<DecoderModel> = Stage::new(
        Admission::new(config.max_concurrency.max(1), config.common.max_queue),
        metrics.clone(),
    );
    let denoiser = Denoiser {
        stage: stage.clone(),
        limits: Limits {
            max_batch: config.max_batch.max(1),
            tensors: TensorLimits::default(),
        },
    };
    let (router, readiness) = server::base_router(SERVICE_NAME).await;
    // Requests carry pixel-resolution masks and hints and responses carry latents: allow
    // messages as large as the wire tensor limit (tonic's default is 4 MiB).
    let max_message = TensorLimits::default().max_bytes * 2;
    let router = router.add_service(
        DenoiserServer::new(denoiser)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );
    let model_dir = config.stage.model_dir.clone();
    let drain = Duration::from_secs_f64(config.common.drain_delay_secs.max(0.0));
    let launch = Launch {
        stage,
        router,
        readiness,
        grpc,
        metrics: metrics_listener,
        shutdown,
        drain_delay: drain,
    };
    launch
        .run(std::future::ready(()), move || {
            let model = DecoderModel::load(&model_dir, &device, dtype).map_err(|e| {
                ServiceError::Unavailable(format!("loading {}: {e:#}", model_dir.display()))
            })?;
            model.warm_up()?;
            tracing::info!(model_dir = %model_dir.display(), info = ?model.info, "denoiser ready");
            Ok(model)
        })
        .await
        .map_err(anyhow::Error::from)
}
