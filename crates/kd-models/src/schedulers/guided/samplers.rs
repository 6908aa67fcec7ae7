//! `samplers.py: DDIMSampler` and `PLMSSampler` (the latent-diffusion samplers the Kandinsky 2.0
//! pipeline wraps around its 1000-step diffusion): `make_ddim_timesteps("uniform")` (+1 offset),
//! `apply_init_step`, `make_ddim_sampling_parameters`, `p_sample_ddim` and `p_sample_plms`.
//! The model is called with the raw DDIM timestep (no respacing map, no rescaling) and must
//! return ε (its first `C` channels are used when it returns `2C`).

use super::diffusion::GaussianDiffusion;
use super::respace::ddim_uniform_timesteps;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};

/// One sampler step just taken, as a progress observer sees it (the official samplers'
/// `img_callback(pred_x0, i)`).
#[derive(Debug, Clone, Copy)]
pub struct SamplerStep<'a> {
    /// Steps done so far, `1 ..= total` (PLMS's two-call first step counts once).
    pub done: usize,
    /// The steps this run takes.
    pub total: usize,
    /// The step's x₀ prediction for the whole batch as the update used it: the p-sampler's
    /// `pred_xstart` after `denoised_fn` and `clip_denoised`, DDIM's / PLMS's `pred_x0` (PLMS:
    /// from the combined ε).
    pub pred_x0: &'a Tensor,
}

/// Called after every sampler step; an error from it aborts sampling and is returned.
pub type StepObserver<'o> = dyn FnMut(SamplerStep<'_>) -> Result<()> + 'o;

/// The observer of the unobserved entry points.
pub(crate) fn no_observer(_: SamplerStep<'_>) -> Result<()> {
    Ok(())
}

/// `DDIMSampler.ddpm_num_timesteps`: the samplers only work on the unrespaced 1000 steps.
pub const DDPM_NUM_TIMESTEPS: usize = 1000;

/// A DDIM / PLMS schedule: the DDIM timesteps (ascending) and their f64 parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimSchedule {
    /// `make_ddim_timesteps`: `range(0, 1000, 1000 // S) + 1`, then `apply_init_step`.
    pub timesteps: Vec<usize>,
    /// ᾱ at each timestep.
    pub alphas: Vec<f64>,
    /// ᾱ of the previous DDIM timestep; `ᾱ[0]` (not 1) before the first.
    pub alphas_prev: Vec<f64>,
    /// `eta · sqrt((1 − ᾱ_prev) / (1 − ᾱ) · (1 − ᾱ / ᾱ_prev))`.
    pub sigmas: Vec<f64>,
    /// `sqrt(1 − ᾱ)`.
    pub sqrt_one_minus_alphas: Vec<f64>,
}

impl DdimSchedule {
    /// `make_schedule(S, ddim_eta=eta, init_step=init_step)` on `diffusion`'s ᾱ. The diffusion
    /// must keep all 1000 steps (no respacing). `steps` must give timesteps below 1000: with
    /// `1000 // S` dividing 999 (e.g. S = 3, S > 500) the official code indexes `ᾱ[1000]` and
    /// fails. `init_step` keeps the timesteps `<= init_step` (it may leave none).
    pub fn new(
        diffusion: &GaussianDiffusion,
        steps: usize,
        eta: f64,
        init_step: Option<usize>,
    ) -> Result<Self> {
        let ac = &diffusion.alphas_cumprod;
        if ac.len() != DDPM_NUM_TIMESTEPS {
            return Err(ModelError::invalid(
                "timestep_respacing",
                format!(
                    "the DDIM/PLMS samplers need the unrespaced \
                     {DDPM_NUM_TIMESTEPS}-step diffusion; this one has {} steps",
                    ac.len()
                ),
            ));
        }
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(ModelError::invalid(
                "ddim_eta",
                format!("{eta}; allowed a finite value ≥ 0"),
            ));
        }
        let mut ts = ddim_uniform_timesteps(steps as i64, DDPM_NUM_TIMESTEPS).ok_or_else(|| {
            ModelError::invalid(
                "num_steps",
                format!("{steps}; allowed 1 ..= {DDPM_NUM_TIMESTEPS}"),
            )
        })?;
        if ts.last().is_some_and(|&t| t >= DDPM_NUM_TIMESTEPS) {
            return Err(ModelError::invalid(
                "num_steps",
                format!(
                    "{steps}: the DDIM timesteps range(0, 1000, {}) + 1 end at 1000, past the \
                     last ᾱ (the official sampler fails); pick a count whose 1000 // S does not \
                     divide 999",
                    DDPM_NUM_TIMESTEPS / steps
                ),
            ));
        }
        if let Some(init) = init_step {
            ts.retain(|&t| t <= init);
        }
        let alphas: Vec<f64> = ts.iter().map(|&t| ac[t]).collect();
        let alphas_prev: Vec<f64> = std::iter::once(ac[0])
            .chain(alphas.iter().take(alphas.len().saturating_sub(1)).copied())
            .collect();
        let sigmas = alphas
            .iter()
            .zip(&alphas_prev)
            .map(|(&a, &ap)| eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt())
            .collect();
        Ok(Self {
            sqrt_one_minus_alphas: alphas.iter().map(|a| (1.0 - a).sqrt()).collect(),
            timesteps: ts,
            alphas,
            alphas_prev,
            sigmas,
        })
    }

    /// Number of DDIM steps (may differ from the requested count: `1000 // S` striding).
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// `get_x_prev_and_pred_x0(e_t, index)` in f32 as torch computes it (each parameter a
    /// `torch.full` f32 scalar). Draws one `randn(x.shape)` (multiplied by σ, 0 for eta 0).
    fn x_prev(
        &self,
        x: &Tensor,
        e_t: &Tensor,
        index: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        let a_t = self.alphas[index] as f32;
        let a_prev = self.alphas_prev[index] as f32;
        let sigma = self.sigmas[index] as f32;
        let s1m = self.sqrt_one_minus_alphas[index] as f32;
        let pred_x0 = div(&(x - e_t.affine(s1m as f64, 0.0)?)?, a_t.sqrt())?;
        let dir_xt = e_t.affine((1.0f32 - a_prev - sigma * sigma).sqrt() as f64, 0.0)?;
        let z = noise.randn(x.dims(), x.device())?;
        let x_prev = ((pred_x0.affine(a_prev.sqrt() as f64, 0.0)? + dir_xt)?
            + z.affine(sigma as f64, 0.0)?)?;
        Ok((x_prev, pred_x0))
    }
}

/// `t / s` with `s` an f32 scalar (a true division, as torch; not a multiplication by 1/s).
fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

fn eps_of(out: Tensor, x: &Tensor) -> Result<Tensor> {
    let (xd, od) = (x.dims(), out.dims());
    let c = xd[1];
    let ok = od.len() == xd.len()
        && od[0] == xd[0]
        && (od[1] == c || od[1] == 2 * c)
        && od[2..] == xd[2..];
    if !ok {
        return Err(ModelError::invalid(
            "model output",
            format!("shape {od:?}; expected ε with x's shape {xd:?} (or 2x the channels)"),
        ));
    }
    Ok(out.narrow(1, 0, c)?.to_dtype(DType::F32)?)
}

fn start(
    shape: &[usize],
    x_t: Option<&Tensor>,
    noise: &mut dyn NoiseSource,
    device: &Device,
) -> Result<Tensor> {
    if shape.len() < 2 {
        return Err(ModelError::invalid(
            "shape",
            format!("{shape:?}; expected (batch, channels, ...)"),
        ));
    }
    match x_t {
        Some(x) if x.dims() != shape => Err(ModelError::invalid(
            "noise",
            format!("shape {:?}; expected {shape:?}", x.dims()),
        )),
        Some(x) => Ok(x.to_dtype(DType::F32)?),
        None => noise.randn(shape, device),
    }
}

/// `DDIMSampler.sample(S, batch, shape, x_T=x_t, eta=eta, init_step=init_step)`.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    pub schedule: DdimSchedule,
}

impl DdimSampler {
    pub fn new(
        diffusion: &GaussianDiffusion,
        steps: usize,
        eta: f64,
        init_step: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            schedule: DdimSchedule::new(diffusion, steps, eta, init_step)?,
        })
    }

    /// `ddim_sampling`: `x_t` or one `randn(shape)` draw, then for each DDIM timestep from the
    /// last: `model(x, t)` and [`DdimSchedule`]'s update with one `randn` draw (also at eta 0).
    pub fn sample<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
        device: &Device,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        self.sample_observed(model, shape, x_t, noise, device, &mut no_observer)
    }

    /// [`Self::sample`] calling `observer` after every step with the step's `pred_x0`; an
    /// error from it stops sampling and is returned.
    pub fn sample_observed<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
        device: &Device,
        observer: &mut StepObserver<'_>,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let mut x = start(shape, x_t, noise, device)?;
        let s = &self.schedule;
        let n = s.len();
        for (done, index) in (0..n).rev().enumerate() {
            let t = Tensor::full(s.timesteps[index] as f32, shape[0], x.device())?;
            let e_t = eps_of(model(&x, &t)?, &x)?;
            let (next, pred_x0) = s.x_prev(&x, &e_t, index, noise)?;
            x = next;
            observer(SamplerStep {
                done: done + 1,
                total: n,
                pred_x0: &pred_x0,
            })?;
        }
        Ok(x)
    }
}

/// `PLMSSampler.sample(S, batch, shape, x_T=x_t, init_step=init_step)` (eta is always 0:
/// the official `make_schedule` refuses any other).
#[derive(Debug, Clone)]
pub struct PlmsSampler {
    pub schedule: DdimSchedule,
}

impl PlmsSampler {
    pub fn new(
        diffusion: &GaussianDiffusion,
        steps: usize,
        init_step: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            schedule: DdimSchedule::new(diffusion, steps, 0.0, init_step)?,
        })
    }

    /// `plms_sampling`: the first step is a pseudo improved-Euler step (two model calls, the
    /// second at the *next* timestep, the current one on the last step; two `randn` draws),
    /// then Adams–Bashforth of order 2, 3, 4 over the last ε of previous steps (one call and
    /// one draw each). The ε history keeps the plain `e_t`, not the combined one.
    pub fn sample<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
        device: &Device,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        self.sample_observed(model, shape, x_t, noise, device, &mut no_observer)
    }

    /// [`Self::sample`] calling `observer` after every step (not after each model call: the
    /// first step's two calls are one step) with the step's `pred_x0` (from the combined ε);
    /// an error from it stops sampling and is returned.
    pub fn sample_observed<M>(
        &self,
        model: &mut M,
        shape: &[usize],
        x_t: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
        device: &Device,
        observer: &mut StepObserver<'_>,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let mut x = start(shape, x_t, noise, device)?;
        let s = &self.schedule;
        let n = s.len();
        let mut old_eps: Vec<Tensor> = Vec::new();
        for i in 0..n {
            let index = n - i - 1;
            let t = Tensor::full(s.timesteps[index] as f32, shape[0], x.device())?;
            let next = s.timesteps[n - 1 - (i + 1).min(n - 1)];
            let e_t = eps_of(model(&x, &t)?, &x)?;
            let e_prime = match old_eps.len() {
                0 => {
                    let (x_prev, _) = s.x_prev(&x, &e_t, index, noise)?;
                    let t_next = Tensor::full(next as f32, shape[0], x.device())?;
                    let e_next = eps_of(model(&x_prev, &t_next)?, &x)?;
                    (&e_t + e_next)?.affine(0.5, 0.0)?
                }
                1 => (e_t.affine(3.0, 0.0)? - &old_eps[0])?.affine(0.5, 0.0)?,
                2 => div(
                    &((e_t.affine(23.0, 0.0)? - old_eps[1].affine(16.0, 0.0)?)?
                        + old_eps[0].affine(5.0, 0.0)?)?,
                    12.0,
                )?,
                _ => {
                    let k = old_eps.len();
                    div(
                        &(((e_t.affine(55.0, 0.0)? - old_eps[k - 1].affine(59.0, 0.0)?)?
                            + old_eps[k - 2].affine(37.0, 0.0)?)?
                            - old_eps[k - 3].affine(9.0, 0.0)?)?,
                        24.0,
                    )?
                }
            };
            let (next, pred_x0) = s.x_prev(&x, &e_prime, index, noise)?;
            x = next;
            old_eps.push(e_t);
            if old_eps.len() >= 4 {
                old_eps.remove(0);
            }
            observer(SamplerStep {
                done: i + 1,
                total: n,
                pred_x0: &pred_x0,
            })?;
        }
        Ok(x)
    }
}
