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
            // DPM-Solver++ has no x0 estimate: the current latents stand in.
            let x0 = p.pred_original_sample.unwrap_or(p.latents);
            let sent = send_progress(
                (p.step + 1, p.total),
                preview_every,
                &|| preview_latents(x0, model.movq_scale_factor),
                sink,
            );
            match sent {
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

/// Streams the progress of finished step `step` of `total` (1-based), with the tensor `preview`
/// makes every `preview_every` steps, then checks whether the request should stop (not after
/// its last step). One request's own loop, the batching loop and the token loop all report
/// through it.
pub(crate) fn send_progress(
    (step, total): (usize, usize),
    preview_every: usize,
    preview: &dyn Fn() -> Result<Tensor, ServiceError>,
    sink: &Sink<DenoiseEvent>,
) -> Result<(), ServiceError> {
    let preview = if preview_every > 0 && step.is_multiple_of(preview_every) {
        Some(to_wire(&preview()?)?)
    } else {
        None
    };
    sink.send_blocking(DenoiseEvent {
        event: Some(denoise_event::Event::Progress(v1::DenoiseProgress {
            step: step as u32,
            total_steps: total as u32,
            preview_latents: preview,
        })),
    })?;
    if step < total {
        sink.cancel()
            .check_at(format_args!("after {step} of {total} denoising steps"))?;
    }
    Ok(())
}

/// Longest side, in pixels, of a decoded preview (`DenoiseProgress.preview_latents`).
pub const PREVIEW_MAX_SIDE: usize = 256;

/// The preview of predicted latents (B, C, h, w): average-pooled by the smallest integer factor
/// that brings their decoded long side (`side × movq_scale_factor`) to at most
/// [`PREVIEW_MAX_SIDE`] pixels, so a preview costs a small MoVQ decode and a small message.
pub fn preview_latents(latents: &Tensor, movq_scale_factor: usize) -> Result<Tensor, ServiceError> {
    let (_, _, h, w) = latents.dims4()?;
    let max_latent = (PREVIEW_MAX_SIDE / movq_scale_factor.max(1)).max(1);
    let factor = h.max(w).div_ceil(max_latent).max(1);
    if factor == 1 {
        return Ok(latents.to_dtype(candle_core::DType::F32)?);
    }
    Ok(latents
        .to_dtype(candle_core::DType::F32)?
        .avg_pool2d(factor)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn previews_decode_to_at_most_256_pixels_on_the_long_side() {
        for (h, w, scale, want) in [
            (8, 8, 8, (8, 8)),
            (64, 64, 8, (32, 32)),
            (256, 128, 8, (32, 16)),
            (72, 40, 8, (24, 13)),
            (64, 64, 2, (64, 64)),
            (256, 256, 2, (128, 128)),
        ] {
            let t = Tensor::ones((2, 4, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
            let p = preview_latents(&t, scale).unwrap();
            let (b, c, ph, pw) = p.dims4().unwrap();
            assert_eq!(
                (b, c, ph, pw),
                (2, 4, want.0, want.1),
                "{h}x{w} scale {scale}"
            );
            assert!(ph.max(pw) * scale <= PREVIEW_MAX_SIDE);
            // Average pooling keeps a constant field constant.
            let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6));
        }
    }
}
