//! The decoder's diffusion schedulers behind one trait: DDPM (the Kandinsky 2.2 default),
//! DDIM, DPM-Solver++ (multistep) and the few-step students' LCM and TCD, ported from
//! diffusers 0.42 `schedulers/`.
//!
//! A scheduler holds per-request state (the timestep schedule, DPM's model-output history), so
//! one is built per request with [`from_config`]. All sampling noise comes from a
//! [`NoiseSource`]; nothing uses candle's device RNG.

pub mod amused;
pub mod betas;
pub mod consistency;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod guided;

use crate::config::SchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

pub use consistency::{ConsistencyKind, ConsistencyScheduler};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;

/// The result of one denoising step.
#[derive(Debug, Clone)]
pub struct SchedulerStep {
    /// x_{t-1}, the latents for the next step (f32).
    pub prev_sample: Tensor,
    /// The scheduler's x0 estimate (after clipping), when it computes one.
    pub pred_original_sample: Option<Tensor>,
}

/// A diffusion scheduler for one request.
pub trait Scheduler: Send {
    /// Computes the timestep schedule for `num_inference_steps` (1 ..= `num_train_timesteps`)
    /// and resets the per-request state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The most steps `set_timesteps` takes, and the config key that sets it.
    fn max_inference_steps(&self) -> (usize, &'static str) {
        (self.num_train_timesteps(), "num_train_timesteps")
    }

    /// Checks an explicit schedule for [`Scheduler::set_custom_timesteps`] without setting it.
    /// Only the consistency schedulers (LCM, TCD) take one.
    fn check_custom_timesteps(&self, timesteps: &[usize]) -> Result<()> {
        Err(ModelError::invalid(
            "timesteps",
            format!(
                "an explicit list ({} given) is taken by the LCM and TCD schedulers only; \
                 allowed here: num_inference_steps instead, or an LCMScheduler / TCDScheduler",
                timesteps.len()
            ),
        ))
    }

    /// Sets an explicit schedule instead of N spaced steps (strictly descending, below
    /// `num_train_timesteps`) and resets the per-request state.
    fn set_custom_timesteps(&mut self, timesteps: &[usize]) -> Result<()> {
        self.check_custom_timesteps(timesteps)?;
        Err(ModelError::invalid(
            "timesteps",
            "this scheduler does not take an explicit list",
        ))
    }

    /// The schedule set by [`Scheduler::set_timesteps`], in stepping order.
    fn timesteps(&self) -> &[usize];

    /// Standard deviation of the initial noise (1 for all decoder schedulers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Number of training timesteps (the upper bound on the inference steps).
    fn num_train_timesteps(&self) -> usize;

    /// Whether `step` consumes the 8-channel model output (learned variance); otherwise the
    /// caller passes only the 4 ε channels.
    fn learned_variance(&self) -> bool {
        false
    }

    /// One reverse-diffusion step from `sample` at `timestep` (a member of the schedule).
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerStep>;

    /// Forward-diffuses `original` to `timestep` with `noise` (img2img, inpaint re-noising).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor>;
}

/// TCD's γ when a pipeline does not name one (diffusers' `TCDScheduler.step(eta=0.3)`).
pub const TCD_DEFAULT_GAMMA: f64 = 0.3;

/// The `eta` the diffusers pipelines step `cfg`'s scheduler with: TCD's default γ, else 0
/// (DDIM's deterministic default).
pub fn pipeline_eta(cfg: &SchedulerConfig) -> f64 {
    match cfg {
        SchedulerConfig::Tcd(_) => TCD_DEFAULT_GAMMA,
        _ => 0.0,
    }
}

/// Builds a decoder scheduler from its config. `eta` is DDIM's step argument (0 = deterministic)
/// and TCD's γ; the other schedulers ignore it.
pub fn from_config(cfg: &SchedulerConfig, eta: f64) -> Result<Box<dyn Scheduler>> {
    cfg.validate(Path::new("scheduler/scheduler_config.json"))?;
    Ok(match cfg {
        SchedulerConfig::Ddpm(c) => Box::new(DdpmScheduler::new(c)?),
        SchedulerConfig::Ddim(c) => Box::new(DdimScheduler::new(c, eta)?),
        SchedulerConfig::DpmSolverMultistep(c) => Box::new(DpmSolverMultistepScheduler::new(c)?),
        SchedulerConfig::Lcm(c) => Box::new(ConsistencyScheduler::new(c, ConsistencyKind::Lcm)?),
        SchedulerConfig::Tcd(c) => Box::new(ConsistencyScheduler::new(
            c,
            ConsistencyKind::Tcd { gamma: eta },
        )?),
        SchedulerConfig::UnClip(_) => {
            return Err(unsupported(
                "_class_name",
                "UnCLIPScheduler",
                "DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler (UnCLIP is the prior's)",
            ))
        }
    })
}

pub(crate) fn unsupported(field: &str, value: impl std::fmt::Debug, supported: &str) -> ModelError {
    ModelError::Unsupported {
        path: Path::new("scheduler/scheduler_config.json").to_path_buf(),
        field: field.into(),
        value: format!("{value:?}"),
        supported: supported.into(),
    }
}

/// Checks `num_inference_steps` against the training timesteps.
pub(crate) fn check_steps(n: usize, train: usize) -> Result<()> {
    if n == 0 || n > train {
        return Err(ModelError::invalid(
            "num_inference_steps",
            format!("{n}; allowed 1 ..= {train} (num_train_timesteps)"),
        ));
    }
    Ok(())
}

/// Checks that `timestep` is below `train` and returns it as an index.
pub(crate) fn check_timestep(t: usize, train: usize) -> Result<usize> {
    if t >= train {
        return Err(ModelError::invalid(
            "timestep",
            format!("{t}; allowed 0 ..= {}", train - 1),
        ));
    }
    Ok(t)
}

/// Checks that `model_output` has `channels` channels and otherwise the shape of `sample`.
pub(crate) fn check_model_output(
    model_output: &Tensor,
    sample: &Tensor,
    channels: usize,
) -> Result<()> {
    let (m, s) = (model_output.dims(), sample.dims());
    let ok =
        m.len() == s.len() && m.len() >= 2 && m[0] == s[0] && m[1] == channels && m[2..] == s[2..];
    if !ok {
        return Err(ModelError::invalid(
            "model_output",
            format!("shape {m:?}; expected the sample shape {s:?} with {channels} channels"),
        ));
    }
    Ok(())
}

/// Timestep spacing shared by DDPM and DDIM (`set_timesteps`), in stepping order.
pub(crate) fn spaced_timesteps(
    spacing: &str,
    train: usize,
    n: usize,
    offset: usize,
) -> Result<Vec<usize>> {
    let ts: Vec<i64> = match spacing {
        "linspace" => betas::linspace_f64(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        "leading" => {
            let ratio = train / n;
            (0..n).rev().map(|k| (k * ratio + offset) as i64).collect()
        }
        "trailing" => {
            let ratio = train as f64 / n as f64;
            betas::arange_down(train as f64, ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
        other => {
            return Err(unsupported(
                "timestep_spacing",
                other,
                "leading, trailing, linspace",
            ))
        }
    };
    ts.into_iter()
        .map(|t| {
            if t < 0 || t as usize >= train {
                Err(ModelError::invalid(
                    "num_inference_steps",
                    format!(
                        "{n} gives timestep {t} outside 0 ..= {} with steps_offset {offset}; use fewer steps",
                        train - 1
                    ),
                ))
            } else {
                Ok(t as usize)
            }
        })
        .collect()
}
