//! The sampling half of `kandinsky2_model.py: Kandinsky2`: `generate_img` (classifier-free
//! guidance as its `model_fn`, the sampler branches, `denoised_fn`), the diffusion
//! `generate_text2img` / `generate_img2img` / `generate_inpainting` build, the img2img start
//! and `utils.py: prepare_mask`.

use super::diffusion::{DiffusionConfig, GaussianDiffusion, PSampleOptions};
use super::samplers::{no_observer, DdimSampler, DdimSchedule, PlmsSampler, StepObserver};
use super::threshold::{DenoisedFn, DenoisedType};
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};

/// `generate_img`'s `sampler` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// `"p_sampler"`: ancestral sampling (`p_sample_loop`) on a diffusion respaced to
    /// `num_steps`, learned variance, dynamic thresholding.
    P,
    /// `"ddim_sampler"`: [`DdimSampler`] on the 1000-step diffusion (eta 0, see the module docs).
    Ddim,
    /// `"plms_sampler"`: [`PlmsSampler`] on the 1000-step diffusion.
    Plms,
}

impl SamplerKind {
    /// The official name.
    pub fn name(self) -> &'static str {
        match self {
            Self::P => "p_sampler",
            Self::Ddim => "ddim_sampler",
            Self::Plms => "plms_sampler",
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "p_sampler" => Ok(Self::P),
            "ddim_sampler" => Ok(Self::Ddim),
            "plms_sampler" => Ok(Self::Plms),
            other => Err(ModelError::invalid(
                "sampler",
                format!("{other:?}; allowed \"p_sampler\", \"ddim_sampler\", \"plms_sampler\""),
            )),
        }
    }
}

fn check_steps(num_steps: usize) -> Result<()> {
    if num_steps == 0 {
        return Err(ModelError::invalid(
            "num_steps",
            "0; allowed ≥ 1 (p_sampler: ≥ 2)",
        ));
    }
    Ok(())
}

/// The diffusion `generate_text2img` / `generate_img2img` / `generate_inpainting` build from
/// the config: respaced to `str(num_steps)` for the p-sampler, unrespaced otherwise.
pub fn pipeline_diffusion(
    config: &DiffusionConfig,
    sampler: SamplerKind,
    num_steps: usize,
) -> Result<GaussianDiffusion> {
    check_steps(num_steps)?;
    match sampler {
        SamplerKind::P => GaussianDiffusion::new(&config.with_respacing(&num_steps.to_string()))
            .map_err(|e| match e {
                ModelError::InvalidInput {
                    field: "timestep_respacing",
                    message,
                } => ModelError::invalid("num_steps", message),
                e => e,
            }),
        _ => GaussianDiffusion::new(config),
    }
}

/// `generate_img`'s `model_fn` around a UNet callback: the UNet runs on `cat([half, half])`
/// (the first half of `x`, the conditional rows, twice: the second half of the state is never
/// seen), `eps = uncond + s·(cond − uncond)` over the first `C` channels is given to **both**
/// halves, and for the p-sampler the UNet's remaining (variance) channels follow unchanged,
/// each half its own.
pub fn guided_model_fn<'a, M>(
    unet: &'a mut M,
    guidance_scale: f64,
    with_variance: bool,
) -> impl FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a
where
    M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    move |x: &Tensor, t: &Tensor| {
        let xd = x.dims().to_vec();
        let n = xd[0];
        if n == 0 || !n.is_multiple_of(2) {
            return Err(ModelError::invalid(
                "x",
                format!("batch {n}; classifier-free guidance needs an even batch (cond, uncond)"),
            ));
        }
        let h = n / 2;
        let half = x.narrow(0, 0, h)?;
        let out = unet(&Tensor::cat(&[&half, &half], 0)?, t)?.to_dtype(DType::F32)?;
        let od = out.dims().to_vec();
        let c = xd[1];
        if od.len() != xd.len() || od[0] != n || od[1] < c || od[2..] != xd[2..] {
            return Err(ModelError::invalid(
                "model output",
                format!("shape {od:?}; expected at least x's {xd:?}"),
            ));
        }
        let eps = out.narrow(1, 0, c)?;
        let (cond, uncond) = (eps.narrow(0, 0, h)?, eps.narrow(0, h, h)?);
        let half_eps = (&uncond + (cond - &uncond)?.affine(guidance_scale, 0.0)?)?;
        let eps = Tensor::cat(&[&half_eps, &half_eps], 0)?;
        if with_variance && od[1] > c {
            Ok(Tensor::cat(&[&eps, &out.narrow(1, c, od[1] - c)?], 1)?)
        } else {
            Ok(eps)
        }
    }
}

/// The arguments of `generate_img` that shape sampling (defaults: the official ones).
#[derive(Debug, Clone)]
pub struct GenerateImg {
    pub sampler: SamplerKind,
    /// Images per prompt; the sampled batch is `2 · batch_size` (cond rows, then uncond).
    pub batch_size: usize,
    /// DDIM/PLMS `S` (the p-sampler's count is the diffusion's respacing, see
    /// [`pipeline_diffusion`]).
    pub num_steps: usize,
    pub guidance_scale: f64,
    /// Inpainting's `denoised_fn` only (ignored by text2img/img2img and by DDIM/PLMS).
    pub dynamic_threshold_v: f64,
    /// Inpainting's `denoised_fn` only (as `dynamic_threshold_v`).
    pub denoised_type: DenoisedType,
    /// img2img: the respaced (p) or original-scale (DDIM/PLMS) step to start from.
    pub init_step: Option<usize>,
    /// Never reaches the DDIM sampler (the official branch compares the sampler *object* with
    /// `"ddim_sampler"`): DDIM always runs with eta 0. Kept for the signature only.
    pub ddim_eta: f64,
    /// The p-sampler's `clip_denoised` (dynamic threshold at 99.5 of row 0). The official
    /// pipeline always has it on; `false` is this crate's extension (the diffusion's option).
    pub clip_denoised: bool,
}

impl GenerateImg {
    /// `generate_img`'s defaults: 50 steps, guidance 7, `dynamic_threshold_v` 99.5,
    /// `"dynamic_threshold"`, no `init_step`, `ddim_eta` 0.8 (unused), thresholding on.
    pub fn new(sampler: SamplerKind, batch_size: usize) -> Self {
        Self {
            sampler,
            batch_size,
            num_steps: 50,
            guidance_scale: 7.0,
            dynamic_threshold_v: 99.5,
            denoised_type: DenoisedType::DynamicThreshold,
            init_step: None,
            ddim_eta: 0.8,
            clip_denoised: true,
        }
    }

    /// Samples `(2 · batch_size, C, H, W)` latents from `x_t` (or a `randn` draw) with `unet`
    /// and returns the first `batch_size` rows (`samples[:batch_size]`). `inpaint` is
    /// `(init_img, img_mask)` with the full batch's rows (the pipeline's `repeat(2, ...)`).
    #[allow(clippy::too_many_arguments)]
    pub fn run<M>(
        &self,
        diffusion: &GaussianDiffusion,
        latent_chw: [usize; 3],
        x_t: Option<&Tensor>,
        inpaint: Option<(&Tensor, &Tensor)>,
        unet: &mut M,
        noise: &mut dyn NoiseSource,
        device: &Device,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        self.run_observed(
            diffusion,
            latent_chw,
            x_t,
            inpaint,
            unet,
            noise,
            device,
            &mut no_observer,
        )
    }

    /// The number of sampler steps [`Self::run`] takes on `diffusion` (what an observer gets
    /// as `total`): the p-sampler's respaced count or `init_step`; for DDIM/PLMS the DDIM
    /// timesteps `<= init_step` (`1000 // S` striding: S = 6 runs 7 steps; 0 when `init_step` is 0). Checks
    /// `num_steps` and `init_step` as `run` does.
    pub fn total_steps(&self, diffusion: &GaussianDiffusion) -> Result<usize> {
        match self.sampler {
            SamplerKind::P => diffusion.p_sample_steps(self.init_step),
            SamplerKind::Ddim | SamplerKind::Plms => {
                check_steps(self.num_steps)?;
                Ok(DdimSchedule::new(diffusion, self.num_steps, 0.0, self.init_step)?.len())
            }
        }
    }

    /// [`Self::run`] calling `observer` after every sampler step with the steps done,
    /// [`Self::total_steps`] and the step's x₀ prediction of all `2 · batch_size` rows (see
    /// [`SamplerStep`](super::SamplerStep)); an error from it stops sampling and is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn run_observed<M>(
        &self,
        diffusion: &GaussianDiffusion,
        latent_chw: [usize; 3],
        x_t: Option<&Tensor>,
        inpaint: Option<(&Tensor, &Tensor)>,
        unet: &mut M,
        noise: &mut dyn NoiseSource,
        device: &Device,
        observer: &mut StepObserver<'_>,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    {
        if self.batch_size == 0 {
            return Err(ModelError::invalid("batch_size", "0; allowed ≥ 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(ModelError::invalid(
                "guidance_scale",
                format!("{}; allowed a finite value", self.guidance_scale),
            ));
        }
        let [c, h, w] = latent_chw;
        let rows = self
            .batch_size
            .checked_mul(2)
            .ok_or_else(|| ModelError::invalid("batch_size", "too large"))?;
        let shape = [rows, c, h, w];
        let samples = match self.sampler {
            SamplerKind::P => {
                let opts = PSampleOptions {
                    clip_denoised: self.clip_denoised,
                    denoised_fn: inpaint.map(|(init, mask)| DenoisedFn {
                        denoised_type: self.denoised_type,
                        dynamic_threshold_v: self.dynamic_threshold_v,
                        inpaint: Some((init.clone(), mask.clone())),
                    }),
                    init_step: self.init_step,
                };
                let mut model = guided_model_fn(unet, self.guidance_scale, true);
                diffusion.p_sample_loop_observed(
                    &mut model, &shape, x_t, &opts, noise, device, observer,
                )?
            }
            SamplerKind::Ddim => {
                check_steps(self.num_steps)?;
                let s = DdimSampler::new(diffusion, self.num_steps, 0.0, self.init_step)?;
                let mut model = guided_model_fn(unet, self.guidance_scale, false);
                s.sample_observed(&mut model, &shape, x_t, noise, device, observer)?
            }
            SamplerKind::Plms => {
                check_steps(self.num_steps)?;
                let s = PlmsSampler::new(diffusion, self.num_steps, self.init_step)?;
                let mut model = guided_model_fn(unet, self.guidance_scale, false);
                s.sample_observed(&mut model, &shape, x_t, noise, device, observer)?
            }
        };
        Ok(samples.narrow(0, 0, self.batch_size)?)
    }
}

/// The img2img start of `generate_img2img`.
#[derive(Debug, Clone)]
pub struct Img2ImgStart {
    /// The noised init latents repeated for the CFG halves (`image.repeat(2, 1, 1, 1)`): pass
    /// as `x_t`.
    pub x_t: Tensor,
    /// `int(num_timesteps · (1 − strength))`: pass as `init_step`.
    pub init_step: usize,
    /// The original timestep the latents were noised to (`timestep_map[init_step − 1]`).
    pub timestep: usize,
}

/// `generate_img2img`: `start_step` from `strength` on `diffusion` (the p-sampler's respaced
/// one or the 1000-step one), `q_sample` of the (encoded, scaled) init latents at
/// `timestep_map[start_step − 1]` with one `randn_like` draw, repeated for the CFG halves.
/// With DDIM/PLMS the sampler then starts at the largest DDIM timestep `<= start_step`, below
/// the noise level the latents were given (e.g. 201 for 299 at 10 steps, strength 0.7).
pub fn img2img_start(
    diffusion: &GaussianDiffusion,
    init_latents: &Tensor,
    strength: f64,
    noise: &mut dyn NoiseSource,
) -> Result<Img2ImgStart> {
    let init_step = diffusion.img2img_start_step(strength)?;
    let x = diffusion.img2img_q_sample(init_latents, init_step, noise)?;
    Ok(Img2ImgStart {
        x_t: Tensor::cat(&[&x, &x], 0)?,
        init_step,
        timestep: diffusion.timestep_map()[init_step - 1],
    })
}

/// `utils.py: prepare_mask` on a `(1, C, H, W)` mask at latent size: every pixel whose
/// channel-0 value is not exactly 1 zeroes six of its eight neighbours (up, left, up-left,
/// down, right, down-right — not up-right nor down-left) in every channel, read from the
/// unmodified mask.
pub fn prepare_mask(mask: &Tensor) -> Result<Tensor> {
    let d = mask.dims();
    if d.len() != 4 || d[0] != 1 {
        return Err(ModelError::invalid(
            "img_mask",
            format!("shape {d:?}; expected (1, C, H, W)"),
        ));
    }
    let (c, h, w) = (d[1], d[2], d[3]);
    let old: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut m = old.clone();
    let mut zero = |i: usize, j: usize| {
        for ch in 0..c {
            m[(ch * h + i) * w + j] = 0.0;
        }
    };
    for i in 0..h {
        for j in 0..w {
            if old[i * w + j] == 1.0 {
                continue;
            }
            if i != 0 {
                zero(i - 1, j);
            }
            if j != 0 {
                zero(i, j - 1);
            }
            if i != 0 && j != 0 {
                zero(i - 1, j - 1);
            }
            if i != h - 1 {
                zero(i + 1, j);
            }
            if j != w - 1 {
                zero(i, j + 1);
            }
            if i != h - 1 && j != w - 1 {
                zero(i + 1, j + 1);
            }
        }
    }
    Ok(Tensor::from_vec(m, d, mask.device())?)
}
