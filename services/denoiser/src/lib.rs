//! The denoiser stage: the decoder UNet and its schedulers (`kandinsky.v1.Denoiser`). Runs the
//! whole denoising loop server-side, streams one progress event per step (with optional
//! predicted-x0 previews) and then the final latents; stops within one step when the caller
//! goes away or its deadline passes.
#![forbid(unsafe_code)]

pub mod model;
pub mod request;

use candle_core::Tensor;
use kd_models::decoder::{run_decoder, DecoderOutcome};
use kd_models::noise::SeededNoise;
use kd_proto::to_wire;
use kd_proto::v1::{self, denoise_event, denoiser_server::DenoiserServer, DenoiseEvent};
use kd_runtime::config::{CommonArgs, StageArgs};
use kd_runtime::stage::EventStream;
use kd_runtime::{
    blocking, Call, Launch, LaunchError, Listeners, Metrics, ServiceError, Shutdown, Sink, Stage,
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

impl Denoiser {
    /// The service over `stage`, accepting at most `max_batch` rows per request.
    pub fn new(stage: Stage<DecoderModel>, max_batch: usize) -> DenoiserServer<Self> {
        DenoiserServer::new(Self {
            stage,
            limits: Limits {
                max_batch: max_batch.max(1),
                tensors: Default::default(),
            },
        })
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
        let limits = self.limits.clone();
        let check = move |m: &DecoderModel| request::plan(m, &limits, &req);
        let metrics = self.stage.metrics.clone();
        let run = |m: Arc<DecoderModel>, plan: Plan, sink: Sink<DenoiseEvent>| async move {
            let span = tracing::info_span!(
                "denoise",
                rows = plan.seeds.len(),
                steps = plan.steps,
                height = plan.height,
                width = plan.width,
            );
            let worker = sink.clone();
            let model = m.clone();
            let latents = tracing::Instrument::instrument(
                blocking(move || denoise(&model, plan, &worker, &metrics)),
                span,
            )
            .await?;
            sink.send(DenoiseEvent {
                event: Some(denoise_event::Event::Result(v1::DenoiseResult {
                    latents: Some(to_wire(&latents)?),
                    model: Some(m.info.clone()),
                })),
            })
            .await
        };
        self.stage.stream("Denoise", call, check, run).await
    }
}

/// Runs one request's loop on the calling (blocking-pool) thread.
pub fn denoise(
    model: &DecoderModel,
    mut plan: Plan,
    sink: &Sink<DenoiseEvent>,
    metrics: &Metrics,
) -> Result<Tensor, ServiceError> {
    let mut noise = SeededNoise::new(&plan.seeds);
    let preview_every = plan.preview_every;
    let total = plan.steps;
    let mut stopped = None;
    let outcome = run_decoder(
        &model.unet,
        plan.scheduler.as_mut(),
        &plan.inputs,
        &mut noise,
        &mut |p| {
            metrics.steps(1);
            match progress(&p, preview_every, sink) {
                Ok(()) => true,
                Err(e) => {
                    stopped = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = stopped {
        return Err(e);
    }
    match outcome {
        DecoderOutcome::Finished(latents) => {
            sink.cancel()
                .check_at(format_args!("after {total} of {total} denoising steps"))?;
            Ok(latents.to_dtype(candle_core::DType::F32)?)
        }
        DecoderOutcome::Cancelled { steps_done } => Err(ServiceError::Internal(format!(
            "the loop stopped after {steps_done} of {total} steps without a reason"
        ))),
    }
}

/// Streams one step's progress (with a preview every `preview_every` steps), then checks
/// whether the call should stop.
fn progress(
    p: &kd_models::decoder::StepProgress<'_>,
    preview_every: usize,
    sink: &Sink<DenoiseEvent>,
) -> Result<(), ServiceError> {
    let step = p.step + 1;
    let preview = if preview_every > 0 && step % preview_every == 0 {
        // DPM-Solver++ has no x0 estimate: the current latents stand in.
        Some(to_wire(p.pred_original_sample.unwrap_or(p.latents))?)
    } else {
        None
    };
    sink.send_blocking(DenoiseEvent {
        event: Some(denoise_event::Event::Progress(v1::DenoiseProgress {
            step: step as u32,
            total_steps: p.total as u32,
            preview_latents: preview,
        })),
    })?;
    if step < p.total {
        sink.cancel()
            .check_at(format_args!("after {step} of {} denoising steps", p.total))?;
    }
    Ok(())
}

/// Serves on `listeners` until `shutdown`: NOT_SERVING while the model loads and warms up
/// (one step), SERVING after.
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    let stage = Stage::new(STAGE, config.max_concurrency, config.common.max_queue);
    let service = Denoiser::new(stage.clone(), config.max_batch);
    let launch = Launch::stage(stage, &config.common).serve(service);
    let load = blocking(move || DecoderModel::load_and_warm(&config.stage));
    launch.run(listeners, shutdown, load).await
}
