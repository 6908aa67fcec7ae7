//! `scheduler/scheduler_config.json`: diffusers `UnCLIPScheduler`, `DDPMScheduler`,
//! `DDIMScheduler`, `DPMSolverMultistepScheduler`, and the consistency-model schedulers of
//! few-step students, `LCMScheduler` and `TCDScheduler`.

use super::{check_one_of, check_positive, unsupported};
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

/// `UnCLIPScheduler` config (the prior's scheduler).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UnClipSchedulerConfig {
    pub num_train_timesteps: usize,
    pub variance_type: String,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub prediction_type: String,
    pub beta_schedule: String,
}

impl Default for UnClipSchedulerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            variance_type: "fixed_small_log".into(),
            clip_sample: true,
            clip_sample_range: 1.0,
            prediction_type: "epsilon".into(),
            beta_schedule: "squaredcos_cap_v2".into(),
        }
    }
}

impl UnClipSchedulerConfig {
    /// Rejects what the UnCLIP port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_one_of(
            path,
            "variance_type",
            &self.variance_type,
            &["fixed_small_log", "learned_range"],
        )?;
        check_one_of(
            path,
            "prediction_type",
            &self.prediction_type,
            &["sample", "epsilon"],
        )?;
        check_one_of(
            path,
            "beta_schedule",
            &self.beta_schedule,
            &["squaredcos_cap_v2"],
        )?;
        check_positive(path, "num_train_timesteps", self.num_train_timesteps)
    }
}

/// `DDPMScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdpmSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: String,
    pub clip_sample: bool,
    pub prediction_type: String,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmSchedulerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            variance_type: "fixed_small".into(),
            clip_sample: true,
            prediction_type: "epsilon".into(),
            thresholding: Default::default(),
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            steps_offset: Default::default(),
            rescale_betas_zero_snr: Default::default(),
        }
    }
}

/// `DDIMScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: String,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: Default::default(),
            prediction_type: "epsilon".into(),
            thresholding: Default::default(),
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: Default::default(),
        }
    }
}

/// A float that diffusers may have written as `"-inf"`, `"inf"` or `"nan"` (its `-Infinity`
/// token is not JSON, so saved copies spell it as a string).
fn f64_or_name<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Name(String),
    }
    match F::deserialize(d)? {
        F::Num(v) => Ok(v),
        F::Name(s) => match s.to_ascii_lowercase().as_str() {
            "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
            "inf" | "infinity" => Ok(f64::INFINITY),
            "nan" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got {s:?}"
            ))),
        },
    }
}

/// `DPMSolverMultistepScheduler` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub final_sigmas_type: String,
    #[serde(deserialize_with = "f64_or_name")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DpmSolverMultistepSchedulerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: Default::default(),
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: Default::default(),
            use_karras_sigmas: Default::default(),
            use_lu_lambdas: Default::default(),
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            steps_offset: Default::default(),
            rescale_betas_zero_snr: Default::default(),
        }
    }
}

/// `LCMScheduler` / `TCDScheduler` config (the two classes take the same keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConsistencySchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    /// The teacher schedule the student was distilled on (its timesteps are `k·i − 1`,
    /// k = `num_train_timesteps / original_inference_steps`).
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: String,
    /// Scales the timestep inside the boundary-condition scalings c_skip, c_out.
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for ConsistencySchedulerConfig {
    /// The upstream class defaults (identical for LCM and TCD).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// A scheduler config, dispatched on its `_class_name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "_class_name")]
pub enum SchedulerConfig {
    #[serde(rename = "UnCLIPScheduler")]
    UnClip(UnClipSchedulerConfig),
    #[serde(rename = "DDPMScheduler")]
    Ddpm(DdpmSchedulerConfig),
    #[serde(rename = "DDIMScheduler")]
    Ddim(DdimSchedulerConfig),
    #[serde(rename = "DPMSolverMultistepScheduler")]
    DpmSolverMultistep(DpmSolverMultistepSchedulerConfig),
    #[serde(rename = "LCMScheduler")]
    Lcm(ConsistencySchedulerConfig),
    #[serde(rename = "TCDScheduler")]
    Tcd(ConsistencySchedulerConfig),
}

impl SchedulerConfig {
    /// Checks the values the decoder schedulers rely on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let betas = |s: &str| {
            check_one_of(
                path,
                "beta_schedule",
                s,
                &["linear", "scaled_linear", "squaredcos_cap_v2"],
            )
        };
        let spacing = |s: &str| {
            check_one_of(
                path,
                "timestep_spacing",
                s,
                &["leading", "trailing", "linspace"],
            )
        };
        let prediction = |s: &str| {
            check_one_of(
                path,
                "prediction_type",
                s,
                &["epsilon", "sample", "v_prediction"],
            )
        };
        match self {
            Self::UnClip(c) => c.validate(path),
            Self::Ddpm(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_one_of(
                    path,
                    "variance_type",
                    &c.variance_type,
                    &["fixed_small", "fixed_small_log", "learned_range", "learned"],
                )?;
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
            Self::Ddim(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
            Self::DpmSolverMultistep(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_one_of(path, "algorithm_type", &c.algorithm_type, &["dpmsolver++"])?;
                check_one_of(path, "solver_type", &c.solver_type, &["midpoint", "heun"])?;
                if !(1..=3).contains(&c.solver_order) {
                    return Err(unsupported(path, "solver_order", c.solver_order, "1, 2, 3"));
                }
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
            Self::Lcm(c) | Self::Tcd(c) => {
                betas(&c.beta_schedule)?;
                prediction(&c.prediction_type)?;
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)?;
                check_positive(path, "original_inference_steps", c.original_inference_steps)?;
                if c.original_inference_steps > c.num_train_timesteps {
                    return Err(unsupported(
                        path,
                        "original_inference_steps",
                        c.original_inference_steps,
                        &format!("1 ..= num_train_timesteps ({})", c.num_train_timesteps),
                    ));
                }
                if !(c.timestep_scaling.is_finite() && c.timestep_scaling >= 0.0) {
                    return Err(unsupported(
                        path,
                        "timestep_scaling",
                        c.timestep_scaling,
                        "a finite value ≥ 0",
                    ));
                }
                Ok(())
            }
        }
    }

    /// Whether this is a consistency-model scheduler (LCM, TCD): the scheduler of a few-step
    /// distilled student.
    pub fn is_consistency(&self) -> bool {
        matches!(self, Self::Lcm(_) | Self::Tcd(_))
    }
}
