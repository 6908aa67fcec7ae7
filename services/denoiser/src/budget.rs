//! What a request costs before it runs: one CFG step (two UNet rows) is timed at two sizes at
//! warm-up, on the device the stage runs on, and fitted as `fixed + per-pixel × latent pixels`.
//! A request whose estimate, even at half of it, cannot finish before its deadline is refused
//! at once (DEADLINE_EXCEEDED naming the estimate and what remains) instead of computing for a
//! caller that will have gone. The fit is linear, so it under-estimates large images (attention
//! grows faster than the area): it only refuses work that is hopeless, never work that fits.

use crate::request::Plan;
use kd_models::decoder::DecoderMode;
use kd_runtime::ServiceError;
use std::time::{Duration, Instant};

/// Only work whose estimate × this cannot finish in time is refused.
pub const SAFETY: f64 = 0.5;

/// The calibrated cost of one denoising step of two UNet rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost {
    /// Seconds per step whatever the size (launch and per-layer overhead).
    pub fixed_s: f64,
    /// Seconds per latent pixel per step.
    pub per_pixel_s: f64,
}

impl StepCost {
    /// The fit through two timed steps: `(latent pixels, seconds)` at a smaller and a larger
    /// size. Noise that makes the larger one faster gives a zero per-pixel cost (no refusal
    /// by size), never a negative one.
    pub fn fit(small: (usize, Duration), large: (usize, Duration)) -> Self {
        let (p1, t1) = (small.0 as f64, small.1.as_secs_f64());
        let (p2, t2) = (large.0 as f64, large.1.as_secs_f64());
        let per_pixel_s = if p2 > p1 {
            ((t2 - t1) / (p2 - p1)).max(0.0)
        } else {
            0.0
        };
        Self {
            fixed_s: (t1 - per_pixel_s * p1).max(0.0),
            per_pixel_s,
        }
    }

    /// Estimated seconds of `plan` (its loop's steps, rows and latent size).
    pub fn estimate(&self, plan: &Plan, scale_factor: usize) -> f64 {
        let steps = match plan.inputs.mode {
            DecoderMode::Img2Img { strength, .. } => (plan.steps as f64 * strength).floor(),
            _ => plan.steps as f64,
        };
        let cfg = if plan.guidance_scale > 1.0 { 2.0 } else { 1.0 };
        let rows = plan.seeds.len() as f64 * cfg;
        let sf = scale_factor.max(1) as f64;
        let pixels = (plan.height as f64 / sf) * (plan.width as f64 / sf);
        steps * (self.fixed_s + self.per_pixel_s * pixels * rows / 2.0)
    }

    /// DEADLINE_EXCEEDED when `plan` cannot finish before `deadline` even at [`SAFETY`] × its
    /// estimate.
    pub fn check(
        &self,
        plan: &Plan,
        scale_factor: usize,
        deadline: Option<Instant>,
    ) -> Result<(), ServiceError> {
        let Some(deadline) = deadline else {
            return Ok(());
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let estimate = self.estimate(plan, scale_factor);
        if estimate * SAFETY <= remaining {
            return Ok(());
        }
        Err(ServiceError::DeadlineExceeded(format!(
            "the request deadline would pass before its work ends: about {estimate:.1} s of \
             denoising ({} steps, {} rows, {}×{} pixels; calibrated at warm-up on this device) \
             against {remaining:.1} s left",
            plan.steps,
            plan.seeds.len(),
            plan.height,
            plan.width
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_separates_overhead_from_per_pixel_cost_and_never_goes_negative() {
        let ms = Duration::from_millis;
        let c = StepCost::fit((64, ms(110)), (256, ms(140)));
        assert!((c.per_pixel_s - 0.03 / 192.0).abs() < 1e-12, "{c:?}");
        assert!(
            (c.fixed_s - (0.110 - 64.0 * 0.03 / 192.0)).abs() < 1e-12,
            "{c:?}"
        );
        // Timing noise: the larger size measured faster.
        let c = StepCost::fit((64, ms(120)), (256, ms(100)));
        assert_eq!(c.per_pixel_s, 0.0);
        assert!((c.fixed_s - 0.120).abs() < 1e-12);
    }
}
