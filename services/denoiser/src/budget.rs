//! What a denoising request costs before it runs: one CFG step (two UNet rows) is timed at two
//! sizes at warm-up ([`kd_runtime::budget::Cost`] per latent pixel), and a request that cannot
//! finish before its deadline is refused at once ([`kd_runtime::budget::check`]).

use crate::request::Plan;
use kd_models::decoder::DecoderMode;
use kd_runtime::budget::{self, Cost};
use kd_runtime::ServiceError;
use std::time::{Duration, Instant};

/// The calibrated cost of one denoising step of two UNet rows, per latent pixel, and the
/// stage's `--admission-safety`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost(pub Cost, pub f64);

impl StepCost {
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
        steps * self.0.seconds(pixels * rows / 2.0)
    }

    /// DEADLINE_EXCEEDED when `plan` cannot finish before `deadline`.
    pub fn check(
        &self,
        plan: &Plan,
        scale_factor: usize,
        deadline: Option<Instant>,
    ) -> Result<(), ServiceError> {
        let work = format!(
            "denoising ({} steps, {} rows, {}×{} pixels)",
            plan.steps,
            plan.seeds.len(),
            plan.height,
            plan.width
        );
        budget::check(self.estimate(plan, scale_factor), self.1, deadline, work)
    }
}

/// The cost of one step per unit (latent pixel, token) from timing it at 64² and at 128²
/// pixels: `units(side)` units per step at `side`, `step_at(side)` one timed step. Each size is
/// the fastest of three runs: a busy machine only adds time, and a single slow run at 64² could
/// hide the per-unit cost in the difference (no refusal by size).
pub fn calibrate(
    units: impl Fn(usize) -> f64,
    step_at: impl Fn(usize) -> Result<Duration, ServiceError>,
) -> Result<Cost, ServiceError> {
    let fastest = |side: usize| -> Result<(f64, Duration), ServiceError> {
        let t = step_at(side)?.min(step_at(side)?).min(step_at(side)?);
        Ok((units(side), t))
    };
    Ok(Cost::fit(fastest(64)?, fastest(128)?))
}
