//! aMUSEd's masked-token scheduler (diffusers `schedulers/scheduling_amused.py`,
//! `AmusedScheduler`; Muse: <https://arxiv.org/abs/2301.00704>).
//!
//! Each step samples a token for every position from the model's logits, keeps the tokens
//! already known, and re-masks the least confident of the new ones (confidence = log p + a
//! temperature-scaled Gumbel draw) so that the masked share follows the cosine (or linear)
//! schedule; the last step keeps every sampled token.
//!
//! Arithmetic follows torch's float32 where it decides how many tokens are re-masked (the ratio
//! `(i + 1) / n`, `cos(ratio · π / 2)`, `floor(seq_len · ratio)`): at 6 cosine steps torch gets
//! `cos(π/3) = 0.49999997`, so 31 of 64 tokens, where exact arithmetic would give 32.
//!
//! Randomness comes from a [`NoiseSource`] as uniform draws:
//! * the categorical sample of each position is inverse-CDF sampling from one uniform (the first
//!   index whose float64 cumulative probability exceeds `u · total`) — the distribution of
//!   `torch.multinomial(probs, 1)`, from a source the parity fixtures record and replay;
//! * the Gumbel noise is `-log(-log(u))` of a uniform per position (diffusers' `gumbel_noise`);
//! * `add_noise` masks a position when its uniform is below the mask ratio.
//!
//! Quirks kept: a step whose sample has no masked token still re-masks one token (`mask_len`
//! is at least 1); image-to-image noises at `timesteps[start - 1]`, which for strength 1 wraps
//! to the last timestep (mask ratio ≈ 0: nothing is masked) — see the pipelines.

use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use crate::schedulers::betas::linspace_f32;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

/// `scheduler/scheduler_config.json` of an aMUSEd folder.
#[derive(Debug, Clone, Deserialize)]
pub struct AmusedSchedulerConfig {
    /// The token id meaning "masked" (`vocab_size − 1` in the hub checkpoints).
    pub mask_token_id: u32,
    /// "cosine" (default) or "linear".
    #[serde(default = "cosine")]
    pub masking_schedule: String,
}

fn cosine() -> String {
    "cosine".into()
}

impl AmusedSchedulerConfig {
    /// Reads and checks `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = crate::config::read_json(path)?;
        MaskingSchedule::parse(&cfg.masking_schedule).map_err(|_| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: "masking_schedule".into(),
            value: format!("{:?}", cfg.masking_schedule),
            supported: "cosine, linear".into(),
        })?;
        Ok(cfg)
    }
}

/// How the share of masked tokens falls over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskingSchedule {
    /// `cos(ratio · π/2)`.
    Cosine,
    /// `1 − ratio`.
    Linear,
}

impl MaskingSchedule {
    /// "cosine" or "linear".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            other => Err(ModelError::invalid(
                "masking_schedule",
                format!("{other:?}; allowed: \"cosine\", \"linear\""),
            )),
        }
    }

    /// The masked share after step `index` of `n` (float32 as torch computes it).
    pub fn mask_ratio(self, index: usize, n: usize) -> f32 {
        let ratio = (index + 1) as f32 / n as f32;
        match self {
            Self::Cosine => {
                let arg = ratio * std::f32::consts::PI / 2.0;
                (arg as f64).cos() as f32
            }
            Self::Linear => 1.0 - ratio,
        }
    }
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct AmusedStep {
    /// The token map for the next step (B, h, w) u32, re-masked positions hold the mask token.
    pub prev_sample: Tensor,
    /// Every position's sampled token (known positions keep theirs) (B, h, w) u32.
    pub pred_original_sample: Tensor,
}

/// The scheduler for one request: the step schedule and its temperatures.
#[derive(Debug, Clone)]
pub struct AmusedScheduler {
    mask_token_id: u32,
    schedule: MaskingSchedule,
    temperatures: Vec<f32>,
}

impl AmusedScheduler {
    /// A scheduler with `steps` steps, temperatures falling linearly from `temperature.0` to
    /// `temperature.1` (diffusers' default (2, 0); a single value `t` means (t, 0.01)).
    pub fn new(
        mask_token_id: u32,
        schedule: MaskingSchedule,
        steps: usize,
        temperature: (f32, f32),
    ) -> Result<Self> {
        if steps == 0 {
            return Err(ModelError::invalid("num_inference_steps", "must be ≥ 1"));
        }
        for t in [temperature.0, temperature.1] {
            if !t.is_finite() || t < 0.0 {
                return Err(ModelError::invalid(
                    "temperature",
                    format!("{t}: must be finite and ≥ 0"),
                ));
            }
        }
        Ok(Self {
            mask_token_id,
            schedule,
            temperatures: linspace_f32(temperature.0.into(), temperature.1.into(), steps),
        })
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.temperatures.len()
    }

    /// The timestep of step `index`: `n − 1 − index` (diffusers' `arange(n).flip(0)`).
    pub fn timestep(&self, index: usize) -> usize {
        self.steps() - 1 - index
    }

    /// The temperature of each step.
    pub fn temperatures(&self) -> &[f32] {
        &self.temperatures
    }

    /// The mask token.
    pub fn mask_token_id(&self) -> u32 {
        self.mask_token_id
    }

    /// The masking schedule.
    pub fn schedule(&self) -> MaskingSchedule {
        self.schedule
    }

    /// Step `index`: samples tokens from `logits` (B, K, h, w) for `sample` (B, h, w) and
    /// re-masks as the schedule says. `starting_mask_ratio` scales the schedule (inpainting:
    /// the masked share of the token map; 1 otherwise).
    pub fn step(
        &self,
        logits: &Tensor,
        index: usize,
        sample: &Tensor,
        starting_mask_ratio: f32,
        noise: &mut dyn NoiseSource,
    ) -> Result<AmusedStep> {
        let n = self.steps();
        if index >= n {
            return Err(ModelError::invalid(
                "step",
                format!("index {index} of a {n}-step schedule"),
            ));
        }
        let (b, k, h, w) = logits.dims4().map_err(|_| {
            ModelError::invalid(
                "logits",
                format!("expected (B, K, h, w), got {:?}", logits.dims()),
            )
        })?;
        if sample.dims() != [b, h, w] {
            return Err(ModelError::invalid(
                "sample",
                format!(
                    "expected a ({b}, {h}, {w}) token map for logits {:?}, got {:?}",
                    logits.dims(),
                    sample.dims()
                ),
            ));
        }
        let seq = h * w;
        let cpu = Device::Cpu;
        // (B, K, seq) → rows of K per position.
        let logits: Vec<f32> = logits
            .to_device(&cpu)?
            .to_dtype(DType::F32)?
            .reshape((b, k, seq))?
            .transpose(1, 2)?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let tokens: Vec<u32> = sample
            .to_device(&cpu)?
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        let u: Vec<f32> = noise.rand(&[b, seq], &cpu)?.flatten_all()?.to_vec1()?;
        let mut pred = vec![0u32; b * seq];
        let mut selected = vec![0f32; b * seq];
        let mut probs = vec![0f32; k];
        for p in 0..b * seq {
            softmax(&logits[p * k..(p + 1) * k], &mut probs);
            let drawn = inverse_cdf(&probs, u[p]);
            if tokens[p] == self.mask_token_id {
                pred[p] = drawn;
                selected[p] = probs[drawn as usize];
            } else {
                pred[p] = tokens[p];
                // diffusers gathers the probability of the kept token, then overrides it.
                selected[p] = f32::MAX;
            }
        }
        let shape = (b, h, w);
        let pred_t = Tensor::from_vec(pred.clone(), shape, &cpu)?;
        if self.timestep(index) == 0 {
            return Ok(AmusedStep {
                prev_sample: pred_t.clone(),
                pred_original_sample: pred_t,
            });
        }
        let ratio = starting_mask_ratio * self.schedule.mask_ratio(index, n);
        let by_schedule = (seq as f32 * ratio).floor();
        let gumbel: Vec<f32> = noise.rand(&[b, seq], &cpu)?.flatten_all()?.to_vec1()?;
        let temperature = self.temperatures[index];
        let mut prev = pred;
        for row in 0..b {
            let r = row * seq..(row + 1) * seq;
            let unknown = tokens[r.clone()]
                .iter()
                .filter(|&&t| t == self.mask_token_id)
                .count() as f32;
            let mask_len = (unknown - 1.0).min(by_schedule).max(1.0) as usize;
            let confidence: Vec<f32> = r
                .clone()
                .map(|p| {
                    let u = gumbel[p].max(1e-20);
                    let g = -(-u.ln()).max(1e-20).ln();
                    selected[p].max(1e-20).ln() + temperature * g
                })
                .collect();
            let mut sorted = confidence.clone();
            sorted.sort_by(f32::total_cmp);
            let cut_off = sorted[mask_len.min(seq - 1)];
            for (i, c) in confidence.iter().enumerate() {
                if *c < cut_off {
                    prev[row * seq + i] = self.mask_token_id;
                }
            }
        }
        Ok(AmusedStep {
            prev_sample: Tensor::from_vec(prev, shape, &cpu)?,
            pred_original_sample: pred_t,
        })
    }

    /// Masks each position of `sample` (B, h, w) with probability = the mask ratio of step
    /// `index` (`add_noise(sample, timesteps[index])`).
    pub fn add_noise(
        &self,
        sample: &Tensor,
        index: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.steps();
        if index >= n {
            return Err(ModelError::invalid(
                "step",
                format!("index {index} of a {n}-step schedule"),
            ));
        }
        let cpu = Device::Cpu;
        let ratio = self.schedule.mask_ratio(index, n);
        let tokens: Vec<u32> = sample
            .to_device(&cpu)?
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        let u: Vec<f32> = noise.rand(sample.dims(), &cpu)?.flatten_all()?.to_vec1()?;
        let out: Vec<u32> = tokens
            .iter()
            .zip(&u)
            .map(|(&t, &u)| if u < ratio { self.mask_token_id } else { t })
            .collect();
        Ok(Tensor::from_vec(out, sample.dims(), &cpu)?)
    }
}

/// Numerically stable softmax of `x` into `out` (float32, as torch).
fn softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// The first index whose float64 cumulative probability exceeds `u · total` (clamped to the
/// last index).
fn inverse_cdf(probs: &[f32], u: f32) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u as f64 * total;
    let mut acc = 0f64;
    for (i, &p) in probs.iter().enumerate() {
        acc += p as f64;
        if acc > target {
            return i as u32;
        }
    }
    (probs.len() - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_ratio_rounds_as_torch_float32() {
        // torch: cos(((3 + 1) / 6) · π / 2) = 0.49999997 in float32, so floor(64 · r) = 31.
        let r = MaskingSchedule::Cosine.mask_ratio(3, 6);
        assert_eq!((64.0 * r).floor(), 31.0);
        assert_eq!(MaskingSchedule::Linear.mask_ratio(2, 6), 0.5);
    }

    #[test]
    fn linspace_matches_torch() {
        assert_eq!(
            linspace_f32(3.0, 1.0, 7),
            vec![
                3.0,
                2.666_666_7,
                2.333_333_3,
                2.0,
                1.666_666_7,
                1.333_333_4,
                1.0
            ]
        );
        assert_eq!(linspace_f32(2.0, 0.0, 1), vec![2.0]);
    }

    #[test]
    fn inverse_cdf_picks_the_bucket_of_u() {
        let p = [0.25f32, 0.5, 0.25];
        assert_eq!(inverse_cdf(&p, 0.0), 0);
        assert_eq!(inverse_cdf(&p, 0.2499), 0);
        assert_eq!(inverse_cdf(&p, 0.25), 1);
        assert_eq!(inverse_cdf(&p, 0.74), 1);
        assert_eq!(inverse_cdf(&p, 0.999), 2);
    }
}
