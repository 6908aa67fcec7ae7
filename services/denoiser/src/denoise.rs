//! One request's denoising loop on the blocking pool: progress (and previews) streamed per step,
//! stopped within one UNet layer when the call is cancelled or its deadline passes.

use crate::model::DecoderModel;
use crate::request::Plan;
use candle_core::Tensor;
use kd_models::decoder::{run_decoder_interruptible, DecoderOutcome};
use kd_models::noise::SeededNoise;
use kd_proto::to_wire;
use kd_proto::v1::{self, denoise_event, DenoiseEvent};
use kd_runtime::{Metrics, ServiceError, Sink};

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
    let cancel = sink.cancel();
    let outcome = run_decoder_interruptible(
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
        // A step at a large size stops within one UNet layer, not at the step's end.
        &|| cancel.should_stop(),
    )
    .map_err(|e| cancel.model_error(e))?;
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
    let preview = if preview_every > 0 && step.is_multiple_of(preview_every) {
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
