//! `gaussian_diffusion.py: GaussianDiffusion` as `respace.py: SpacedDiffusion` wraps it and
//! `model_creation.py: create_gaussian_diffusion` builds it: the (respaced) β schedule and its
//! f64 tables, `p_mean_variance` (learned-range variance, ε or x₀ prediction, `denoised_fn`,
//! `clip_denoised` = the batch-element-0 dynamic threshold), `p_sample`, `p_sample_loop` (with
//! `init_step`), and the img2img start (`utils.py: q_sample`).

use super::respace::space_timesteps;
use super::samplers::{no_observer, SamplerStep, StepObserver};
use super::threshold::{dynamic_threshold, DenoisedFn};
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// `CONFIG_2_0["diffusion_config"]`: the keyword arguments of `create_gaussian_diffusion`
/// (missing keys take that function's defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DiffusionConfig {
    pub steps: usize,
    pub learn_sigma: bool,
    pub sigma_small: bool,
    pub noise_schedule: String,
    pub use_kl: bool,
    pub predict_xstart: bool,
    pub rescale_timesteps: bool,
    /// Only picks the training loss; no effect on sampling.
    pub rescale_learned_sigmas: bool,
    pub timestep_respacing: String,
    pub linear_start: f64,
    pub linear_end: f64,
}

impl Default for DiffusionConfig {
    /// `create_gaussian_diffusion`'s own defaults.
    fn default() -> Self {
        Self {
            steps: 1000,
            learn_sigma: false,
            sigma_small: false,
            noise_schedule: "linear".into(),
            use_kl: false,
            predict_xstart: false,
            rescale_timesteps: false,
            rescale_learned_sigmas: false,
            timestep_respacing: String::new(),
            linear_start: 0.0001,
            linear_end: 0.02,
        }
    }
}

impl DiffusionConfig {
    /// Kandinsky 2.0's `CONFIG_2_0["diffusion_config"]`: 1000 linear β 1e-4 .. 0.02, learned
    /// sigma (learned-range variance), ε prediction, rescaled timesteps, no respacing.
    pub fn kandinsky_2_0() -> Self {
        Self {
            steps: 1000,
            learn_sigma: true,
            sigma_small: false,
            noise_schedule: "linear".into(),
            use_kl: false,
            predict_xstart: false,
            rescale_timesteps: true,
            rescale_learned_sigmas: true,
            timestep_respacing: String::new(),
            linear_start: 0.0001,
            linear_end: 0.02,
        }
    }

    /// The same config with another `timestep_respacing`.
    pub fn with_respacing(&self, respacing: &str) -> Self {
        Self {
            timestep_respacing: respacing.into(),
            ..self.clone()
        }
    }
}

/// What the model's first `C` output channels predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeanType {
    /// ε (`predict_xstart = False`).
    Epsilon,
    /// x₀ (`predict_xstart = True`).
    StartX,
}

/// The reverse-step variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarType {
    /// `learn_sigma`: the model's second `C` channels v ∈ [-1, 1] interpolate the log variance
    /// between the clipped posterior log variance (v = -1) and log β (v = 1).
    LearnedRange,
    /// `not learn_sigma and not sigma_small`: β (the posterior variance at t = 0).
    FixedLarge,
    /// `sigma_small`: the posterior variance.
    FixedSmall,
}

/// `get_named_beta_schedule` of `gaussian_diffusion.py` (f64).
pub fn named_beta_schedule(name: &str, n: usize, start: f64, end: f64) -> Result<Vec<f64>> {
    match name {
        "linear" => {
            let scale = 1000.0 / n as f64;
            Ok(super::super::betas::linspace_f64(
                scale * start,
                scale * end,
                n,
            ))
        }
        "cosine" => {
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            Ok((0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - f(t2) / f(t1)).min(0.999)
                })
                .collect())
        }
        other => Err(ModelError::invalid(
            "noise_schedule",
            format!("{other:?}; allowed \"linear\", \"cosine\""),
        )),
    }
}

fn cumprod(v: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut acc = 1.0;
    v.into_iter()
        .map(|a| {
            acc *= a;
            acc
        })
        .collect()
}

/// A `SpacedDiffusion` (every diffusion `create_gaussian_diffusion` builds is one; without
/// respacing it keeps all steps, its β re-derived from ᾱ ratios). Indices `i` below are
/// respaced indices `0 .. num_timesteps()`; the model sees `timestep_map[i]` (rescaled).
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    mean_type: MeanType,
    var_type: VarType,
    rescale_timesteps: bool,
    timestep_map: Vec<usize>,
    original_num_steps: usize,
    noise_schedule: String,
    pub(crate) betas: Vec<f64>,
    pub(crate) alphas_cumprod: Vec<f64>,
    alphas_cumprod_prev: Vec<f64>,
    sqrt_recip_alphas_cumprod: Vec<f64>,
    sqrt_recipm1_alphas_cumprod: Vec<f64>,
    posterior_variance: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
    log_betas: Vec<f64>,
}

/// The result of [`GaussianDiffusion::p_mean_variance`].
#[derive(Debug, Clone)]
pub struct MeanVariance {
    pub mean: Tensor,
    pub log_variance: Tensor,
    /// The x₀ prediction after `denoised_fn` and `clip_denoised`.
    pub pred_xstart: Tensor,
}

/// Options of `p_sample_loop` (the official keyword arguments).
#[derive(Debug, Clone)]
pub struct PSampleOptions {
    /// The dynamic threshold at the 99.5th percentile of batch element 0 (the official
    /// default `True`; the pipeline never changes it).
    pub clip_denoised: bool,
    /// Applied to x₀ before `clip_denoised` (the pipeline passes one for inpainting only).
    pub denoised_fn: Option<DenoisedFn>,
    /// Run only the respaced indices `init_step − 1 .. 0` (img2img; 1 ..= num_timesteps).
    pub init_step: Option<usize>,
}

impl PSampleOptions {
    /// The official defaults: `clip_denoised = True`, no `denoised_fn`, no `init_step`.
    pub fn official() -> Self {
        Self {
            clip_denoised: true,
            denoised_fn: None,
            init_step: None,
        }
    }
}

/// `_extract_into_tensor(...)[i].float()`: a table value as an f32 scalar.
fn f(v: &[f64], i: usize) -> f64 {
    v[i] as f32 as f64
}

impl GaussianDiffusion {
    /// `create_gaussian_diffusion(**config)`.
    pub fn new(config: &DiffusionConfig) -> Result<Self> {
        if config.steps < 2 {
            return Err(ModelError::invalid(
                "steps",
                format!("{}; allowed ≥ 2", config.steps),
            ));
        }
        let base_betas = named_beta_schedule(
            &config.noise_schedule,
            config.steps,
            config.linear_start,
            config.linear_end,
        )?;
        if !base_betas.iter().all(|&b| b > 0.0 && b <= 1.0) {
            return Err(ModelError::invalid(
                "linear_start",
                "the schedule gives β outside (0, 1]".to_string(),
            ));
        }
        let base_ac = cumprod(base_betas.iter().map(|b| 1.0 - b));
        let use_ts = space_timesteps(config.steps, &config.timestep_respacing)?;
        // SpacedDiffusion: new β from the kept ᾱ; members >= steps are dropped silently
        let mut last = 1.0f64;
        let mut betas = Vec::new();
        let mut timestep_map = Vec::new();
        for (i, &ac) in base_ac.iter().enumerate() {
            if use_ts.binary_search(&i).is_ok() {
                betas.push(1.0 - ac / last);
                last = ac;
                timestep_map.push(i);
            }
        }
        if betas.len() < 2 {
            return Err(ModelError::invalid(
                "timestep_respacing",
                format!(
                    "{:?} keeps {} timestep(s); the official diffusion needs at least 2 \
                     (it fails on `posterior_variance[1]`)",
                    config.timestep_respacing,
                    betas.len()
                ),
            ));
        }
        let n = betas.len();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let ac = cumprod(alphas.iter().copied());
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n - 1].iter().copied())
            .collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]))
            .collect();
        let posterior_log_variance_clipped = std::iter::once(posterior_variance[1])
            .chain(posterior_variance[1..].iter().copied())
            .map(f64::ln)
            .collect();
        Ok(Self {
            mean_type: if config.predict_xstart {
                MeanType::StartX
            } else {
                MeanType::Epsilon
            },
            var_type: if config.learn_sigma {
                VarType::LearnedRange
            } else if config.sigma_small {
                VarType::FixedSmall
            } else {
                VarType::FixedLarge
            },
            rescale_timesteps: config.rescale_timesteps,
            timestep_map,
            original_num_steps: config.steps,
            noise_schedule: config.noise_schedule.clone(),
            sqrt_recip_alphas_cumprod: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            posterior_mean_coef1: (0..n)
                .map(|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|i| (1.0 - ac_prev[i]) * alphas[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod: ac,
            alphas_cumprod_prev: ac_prev,
            betas,
        })
    }

    /// Number of (respaced) steps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The original timestep of each respaced index.
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    /// The config's `steps` (the unrespaced process length).
    pub fn original_num_steps(&self) -> usize {
        self.original_num_steps
    }

    pub fn mean_type(&self) -> MeanType {
        self.mean_type
    }

    pub fn var_type(&self) -> VarType {
        self.var_type
    }

    /// A named f64 table of the (respaced) process, for parity checks: `betas`,
    /// `alphas_cumprod`, `alphas_cumprod_prev`, `sqrt_recip_alphas_cumprod`,
    /// `sqrt_recipm1_alphas_cumprod`, `posterior_variance`, `posterior_log_variance_clipped`,
    /// `posterior_mean_coef1`, `posterior_mean_coef2`, `log_betas`.
    pub fn table(&self, name: &str) -> Option<&[f64]> {
        Some(match name {
            "betas" => &self.betas,
            "alphas_cumprod" => &self.alphas_cumprod,
            "alphas_cumprod_prev" => &self.alphas_cumprod_prev,
            "sqrt_recip_alphas_cumprod" => &self.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod" => &self.sqrt_recipm1_alphas_cumprod,
            "posterior_variance" => &self.posterior_variance,
            "posterior_log_variance_clipped" => &self.posterior_log_variance_clipped,
            "posterior_mean_coef1" => &self.posterior_mean_coef1,
            "posterior_mean_coef2" => &self.posterior_mean_coef2,
            "log_betas" => &self.log_betas,
            _ => return None,
        })
    }

    /// The timestep value the UNet receives for respaced index `i` (`_WrappedModel`):
    /// `timestep_map[i]`, times `1000 / original_num_steps` in f32 when `rescale_timesteps`.
    pub fn model_timestep(&self, i: usize) -> f32 {
        let t = self.timestep_map[i] as f32;
        if self.rescale_timesteps {
            t * (1000.0 / self.original_num_steps as f64) as f32
        } else {
            t
        }
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.num_timesteps() {
            return Err(ModelError::invalid(
                "t",
                format!("{i}; allowed 0 ..= {}", self.num_timesteps() - 1),
            ));
        }
        Ok(())
    }

    /// `p_mean_variance(model, x, t=i)`: calls `model(x, t)` once with `t` the UNet timestep
    /// ([`Self::model_timestep`], f32, one per row).
    pub fn p_mean_variance<M>(
        &self,
        model: &mut M,
        x: &Tensor,
        i: usize,
        clip_denoised: bool,
        denoised_fn: Option<&DenoisedFn>,
    ) -> Result<MeanVariance>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        self.check_index(i)?;
        let dims = x.dims().to_vec();
        if dims.len() < 2 {
            return Err(ModelError::invalid(
                "x",
                format!("shape {dims:?}; expected (batch, channels, ...)"),
            ));
        }
        let (b, c) = (dims[0], dims[1]);
        let t = Tensor::full(self.model_timestep(i), b, x.device())?;
        let out = model(x, &t)?;
        let learned = self.var_type == VarType::LearnedRange;
        let want = if learned { 2 * c } else { c };
        let od = out.dims();
        if od.len() != dims.len() || od[0] != b || od[1] != want || od[2..] != dims[2..] {
            return Err(ModelError::invalid(
                "model output",
                format!("shape {od:?}; expected {want} channels and otherwise x's {dims:?}"),
            ));
        }
        let out = out.to_dtype(DType::F32)?;
        let (model_output, log_variance) = match self.var_type {
            VarType::LearnedRange => {
                let eps = out.narrow(1, 0, c)?;
                let v = out.narrow(1, c, c)?;
                let min_log = f(&self.posterior_log_variance_clipped, i);
                let max_log = f(&self.log_betas, i);
                let frac = (v + 1.0)?.affine(0.5, 0.0)?; // (v + 1) / 2
                let lv =
                    (frac.affine(max_log, 0.0)? + frac.affine(-1.0, 1.0)?.affine(min_log, 0.0)?)?;
                (eps, lv)
            }
            VarType::FixedLarge | VarType::FixedSmall => {
                let lv = if self.var_type == VarType::FixedLarge {
                    // np.log(np.append(posterior_variance[1], betas[1:]))
                    if i == 0 {
                        self.posterior_variance[1].ln()
                    } else {
                        self.log_betas[i]
                    }
                } else {
                    self.posterior_log_variance_clipped[i]
                };
                let lv = Tensor::full(lv as f32, x.shape(), x.device())?;
                (out, lv)
            }
        };
        let x32 = x.to_dtype(DType::F32)?;
        let raw = match self.mean_type {
            MeanType::StartX => model_output,
            MeanType::Epsilon => {
                (x32.affine(f(&self.sqrt_recip_alphas_cumprod, i), 0.0)?
                    - model_output.affine(f(&self.sqrt_recipm1_alphas_cumprod, i), 0.0)?)?
            }
        };
        let mut pred = match denoised_fn {
            Some(df) => df.apply(&raw)?,
            None => raw,
        };
        if clip_denoised {
            pred = dynamic_threshold(&pred, 99.5)?;
        }
        let mean = (pred.affine(f(&self.posterior_mean_coef1, i), 0.0)?
            + x32.affine(f(&self.posterior_mean_coef2, i), 0.0)?)?;
        Ok(MeanVariance {
            mean,
            log_variance,
            pred_xstart: pred,
        })
    }

    /// `p_sample`: one reverse step from respaced index `i`. Draws `randn_like(x)` at every
    /// index, also at `i = 0` where it is not added.
    pub fn p_sample<M>(
        &self,
        model: &mut M,
        x: &Tensor,
        i: usize,
        clip_denoised: bool,
        denoised_fn: Option<&DenoisedFn>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        Ok(self
            .p_sample_with_pred(model, x, i, clip_denoised, denoised_fn, noise)?
            .0)
    }

    /// [`Self::p_sample`] also returning the step's `pred_xstart` (after `denoised_fn` and
    /// `clip_denoised`, as the mean used it).
    pub fn p_sample_with_pred<M>(
        &self,
        model: &mut M,
        x: &Tensor,
        i: usize,
        clip_denoised: bool,
        denoised_fn: Option<&DenoisedFn>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let out = self.p_mean_variance(model, x, i, clip_denoised, denoised_fn)?;
        let z = noise.randn(x.dims(), x.device())?;
        if i == 0 {
            return Ok((out.mean, out.pred_xstart));
        }
        let std = out.log_variance.affine(0.5, 0.0)?.exp()?;
        Ok(((out.mean + std.mul(&z)?)?, out.pred_xstart))
    }

    /// The number of [`Self::p_sample`] steps `p_sample_loop` runs with `init_step` (all the
    /// respaced steps without one); refuses an `init_step` outside `1 ..= num_timesteps`.
    pub fn p_sample_steps(&self, init_step: Option<usize>) -> Result<usize> {
        match init_step {
            None => Ok(self.num_timesteps()),
            Some(s) if (1..=self.num_timesteps()).contains(&s) => Ok(s),
            Some(s) => Err(ModelError::invalid(
                "init_step",
                format!(
                    "{s}; allowed 1 ..= {} (the official loop has no step to run at 0)",
                    self.num_timesteps()
                ),
            )),
        }
    }

    /// `p_sample_loop(model, shape, noise=x_t, ...)`: `x_t` or a `randn(shape)` draw, then
    /// [`Self::p_sample`] over the respaced indices from the last (or `init_step − 1`) to 0.
    pub fn p_sample_loop<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        opts: &PSampleOptions,
        noise: &mut dyn NoiseSource,
        device: &Device,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        self.p_sample_loop_observed(model, shape, x_t, opts, noise, device, &mut no_observer)
    }

    /// [`Self::p_sample_loop`] calling `observer` after every step (the official
    /// `progress` loop's place) with the steps done, the total ([`Self::p_sample_steps`]) and
    /// the step's `pred_xstart` (all rows); an error from it stops the loop and is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn p_sample_loop_observed<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        opts: &PSampleOptions,
        noise: &mut dyn NoiseSource,
        device: &Device,
        observer: &mut StepObserver<'_>,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let n = self.p_sample_steps(opts.init_step)?;
        if let Some(df) = &opts.denoised_fn {
            df.validate(shape)?;
        }
        let mut x = match x_t {
            Some(x) => {
                if x.dims() != shape {
                    return Err(ModelError::invalid(
                        "noise",
                        format!("shape {:?}; expected {shape:?}", x.dims()),
                    ));
                }
                x.to_dtype(DType::F32)?
            }
            None => noise.randn(shape, device)?,
        };
        for (done, i) in (0..n).rev().enumerate() {
            let (next, pred) = self.p_sample_with_pred(
                model,
                &x,
                i,
                opts.clip_denoised,
                opts.denoised_fn.as_ref(),
                noise,
            )?;
            x = next;
            observer(SamplerStep {
                done: done + 1,
                total: n,
                pred_x0: &pred,
            })?;
        }
        Ok(x)
    }

    /// `generate_img2img`'s start: `start_step = int(num_timesteps · (1 − strength))`, refused
    /// when 0 (`strength` near 1: the official p-sampler loop then has no step and fails, and
    /// DDIM returns the fully noised latents) or negative.
    pub fn img2img_start_step(&self, strength: f64) -> Result<usize> {
        let s = (self.num_timesteps() as f64 * (1.0 - strength)).trunc();
        if !(s.is_finite() && s >= 1.0 && s <= self.num_timesteps() as f64) {
            return Err(ModelError::invalid(
                "strength",
                format!(
                    "{strength} gives start step {s} of {}; allowed a strength in [0, 1) that \
                     leaves at least one step",
                    self.num_timesteps()
                ),
            ));
        }
        Ok(s as usize)
    }

    /// `kandinsky2/utils.py: q_sample(x_start, timestep_map[start_step − 1])`: forward-diffuses
    /// the init latents with one `randn_like` draw, on the **unrespaced** schedule of
    /// `model/utils.py: get_named_beta_schedule`, which hard-codes the linear β 1e-4 .. 0.02
    /// (the config's `linear_start`/`linear_end` are ignored; "cosine" is a NameError there).
    pub fn img2img_q_sample(
        &self,
        x_start: &Tensor,
        start_step: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if !(1..=self.num_timesteps()).contains(&start_step) {
            return Err(ModelError::invalid(
                "init_step",
                format!("{start_step}; allowed 1 ..= {}", self.num_timesteps()),
            ));
        }
        if self.noise_schedule != "linear" {
            return Err(ModelError::invalid(
                "noise_schedule",
                format!(
                    "{:?}: the official img2img q_sample knows \"linear\" only",
                    self.noise_schedule
                ),
            ));
        }
        let t = self.timestep_map[start_step - 1];
        let betas = named_beta_schedule("linear", self.original_num_steps, 0.0001, 0.02)?;
        let ac = cumprod(betas.iter().map(|b| 1.0 - b));
        let a = ac[t].sqrt() as f32 as f64;
        let s = (1.0 - ac[t]).sqrt() as f32 as f64;
        let z = noise.randn(x_start.dims(), x_start.device())?;
        Ok((x_start.to_dtype(DType::F32)?.affine(a, 0.0)? + z.affine(s, 0.0)?)?)
    }
}
