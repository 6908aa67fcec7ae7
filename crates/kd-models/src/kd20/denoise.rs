//! Kandinsky 2.0 sampling from the UNet's conditioning onward: `kandinsky2_model.py:
//! generate_img` (with the starts of `generate_text2img`, `generate_img2img` and
//! `generate_inpainting` after their image encoding) on the UNet alone — no text encoders, no
//! VAE. [`Kd20Denoiser::sample`] returns `samples[:B]` in the UNet's (scaled) latent space; the
//! caller decodes. [`Kd20Pipeline`](super::Kd20Pipeline) is built on it, so a service holding
//! only the UNet and the in-process pipeline agree byte for byte.
//!
//! Official behaviour kept (see also [`crate::schedulers::guided`]'s quirk list):
//! * the sampled batch is `2B` rows, the conditional rows then the unconditional ones
//!   (`[prompt]·B + [""]·B`): [`Kd20Text`]; classifier-free guidance runs the UNet on the
//!   conditional half of the state twice; only `samples[:B]` is returned;
//! * `p_sampler` runs on the diffusion respaced to `num_steps` with the dynamic threshold of
//!   batch row 0 at 99.5; `ddim_sampler` always at eta 0 (`ddim_eta` never reaches it);
//!   `plms_sampler` as `samplers.py`;
//! * `dynamic_threshold_v` / `denoised_type` only act in inpainting with the `p_sampler` (the
//!   pipeline's `denoised_fn`: threshold or clamp, then `x₀·(1 − mask) + init·mask`, before the
//!   99.5 threshold of row 0); DDIM/PLMS inpainting only has the UNet's inpainting inputs;
//! * img2img: `start_step = int(num_timesteps · (1 − strength))`, `q_sample` at
//!   `timestep_map[start_step − 1]` (one draw of the latents' shape), `repeat(2)`, the sampler
//!   from `init_step = start_step` (DDIM/PLMS: the DDIM timesteps `<= start_step`);
//! * inpainting: the keep mask (1 = keep the init image, 0 = repaint) is resized to the latents
//!   with `F.interpolate(mode="nearest")`, passed through `prepare_mask` (which grows the
//!   repaint region by six of the eight neighbours) and, with the init latents, repeated for
//!   the guidance halves; the UNet gets `inpaint_image = init · mask` and `inpaint_mask =
//!   mask` at every step of every sampler (and multiplies the image by the mask once more, as
//!   `InpaintText2ImUNet` does). `generate_img`'s noise is drawn at its default `h = w = 512`
//!   (64×64 latents), which matches upstream's 512×512 `prepare_image`; here the latents'
//!   size is used (the same for a 512×512 image), and nothing is cropped.
//!
//! Draw order, all from the caller's [`NoiseSource`]: text-to-image and inpainting: the
//! sampler's `randn(2B, 4, h, w)` start, then one draw per step (PLMS: two in its first step);
//! image-to-image: `q_sample`'s `randn_like` of the `(B, 4, h, w)` latents, then the sampler's
//! per-step draws (no start draw: the noised latents are `x_T`).

use super::pipeline::{KD20_INPAINT_UNET_FILE, KD20_UNET_FILE};
use super::text::Kd20TextConditioning;
use super::unet::{Kd20Inpaint, Kd20UnetConfig, Kd20UnetText, Text2ImUNet};
use crate::error::{ModelError, Result};
use crate::interrupt::Stop;
use crate::noise::NoiseSource;
use crate::schedulers::guided::{
    img2img_start, pipeline_diffusion, prepare_mask, DenoisedType, DiffusionConfig,
    GaussianDiffusion, GenerateImg, SamplerKind, SamplerStep,
};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The UNet's text inputs for the `2B` sampled rows: `B` conditional rows then `B`
/// unconditional rows (`[prompt]·B + [""]·B` in the official `encode_text`; upstream has no
/// negative prompt). f32 or the model dtype.
#[derive(Debug, Clone)]
pub struct Kd20Text {
    /// `full_emb1`: M-CLIP token states (2B, L, H1).
    pub full1: Tensor,
    /// `pooled_emb1`: M-CLIP projection (2B, D1).
    pub pooled1: Tensor,
    /// `full_emb2`: mT5 token states (2B, L2, H2).
    pub full2: Tensor,
}

fn same_tail(field: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    let (da, db) = (a.dims(), b.dims());
    if da.len() != db.len() || da.len() < 2 || da[1..] != db[1..] {
        return Err(ModelError::invalid(
            field,
            format!("the unconditional rows have shape {db:?}, the conditional ones {da:?}; allowed: the same after the row count"),
        ));
    }
    Ok(())
}

impl Kd20Text {
    /// The conditional rows `cond` (B ≥ 1) followed by the unconditional rows `uncond` (B rows,
    /// or 1 row repeated B times: the encoding of `""`).
    pub fn from_conditioning(
        cond: &Kd20TextConditioning,
        uncond: &Kd20TextConditioning,
    ) -> Result<Self> {
        let b = cond.rows()?;
        if b == 0 {
            return Err(ModelError::invalid("cond", "0 rows; allowed ≥ 1"));
        }
        let ub = uncond.rows()?;
        if ub != 1 && ub != b {
            return Err(ModelError::invalid(
                "uncond",
                format!("{ub} rows; allowed 1 or the conditional rows ({b})"),
            ));
        }
        same_tail("full_emb1", &cond.full1, &uncond.full1)?;
        same_tail("pooled_emb1", &cond.pooled1, &uncond.pooled1)?;
        same_tail("full_emb2", &cond.full2, &uncond.full2)?;
        let join = |c: &Tensor, u: &Tensor| -> Result<Tensor> {
            let u = if ub == 1 && b > 1 {
                let mut reps = vec![1; u.rank()];
                reps[0] = b;
                u.repeat(reps.as_slice())?
            } else {
                u.clone()
            };
            Ok(Tensor::cat(&[c, &u.to_dtype(c.dtype())?], 0)?)
        };
        let text = Self {
            full1: join(&cond.full1, &uncond.full1)?,
            pooled1: join(&cond.pooled1, &uncond.pooled1)?,
            full2: join(&cond.full2, &uncond.full2)?,
        };
        text.check()?;
        Ok(text)
    }

    /// `B`: half the sampled rows.
    pub fn rows(&self) -> usize {
        self.full1.dims().first().copied().unwrap_or(0) / 2
    }

    /// Checks the three tensors have the same even, non-zero row count (their widths are the
    /// UNet's to check); returns `B`.
    fn check(&self) -> Result<usize> {
        let r1 = self.full1.dims();
        if r1.len() != 3 || r1[0] == 0 || !r1[0].is_multiple_of(2) {
            return Err(ModelError::invalid(
                "full_emb1",
                format!(
                    "shape {r1:?}; expected (2B, L, H1) with B ≥ 1 (B conditional rows, then B \
                     unconditional)"
                ),
            ));
        }
        let n = r1[0];
        for (field, t) in [("pooled_emb1", &self.pooled1), ("full_emb2", &self.full2)] {
            if t.dims().first() != Some(&n) {
                return Err(ModelError::invalid(
                    field,
                    format!("shape {:?}; expected {n} rows as full_emb1", t.dims()),
                ));
            }
        }
        Ok(n / 2)
    }
}

/// What to sample.
#[derive(Debug, Clone)]
pub enum Kd20Task {
    /// `generate_text2img`: latent height/width (the official `get_new_h_w`: `⌈h/64⌉·8`).
    TextToImage {
        latent_height: usize,
        latent_width: usize,
    },
    /// `generate_img2img` after encoding: the encoded init latents (posterior sample × scale),
    /// `(B, 4, h, w)`; `strength` in [0, 1) leaving at least one step.
    ImageToImage { latents: Tensor, strength: f64 },
    /// `generate_inpainting` after encoding: the init latents `(B, 4, h, w)` (posterior sample
    /// × scale) and the official KEEP mask `(1 or B, 1, H, W)` at any resolution (1 = keep the
    /// init image, 0 = repaint), resized to `h × w` as `F.interpolate(mode="nearest")`, then
    /// `prepare_mask` per row. Inpainting model only.
    Inpaint { latents: Tensor, keep_mask: Tensor },
}

impl Kd20Task {
    /// The task's name in messages: `text_to_image`, `image_to_image`, `inpaint`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TextToImage { .. } => "text_to_image",
            Self::ImageToImage { .. } => "image_to_image",
            Self::Inpaint { .. } => "inpaint",
        }
    }
}

/// `generate_img`'s sampling arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Kd20Sampling {
    pub sampler: SamplerKind,
    /// The p-sampler's respacing (`str(num_steps)`, ≥ 2), DDIM/PLMS's `S` (the run takes the
    /// `range(0, 1000, 1000 // S)` timesteps: see [`Kd20Denoiser::total_steps`]).
    pub num_steps: usize,
    pub guidance_scale: f64,
    /// The inpainting p-sampler's `denoised_fn` percentile (0 ..= 100; checked always, used
    /// only there).
    pub dynamic_threshold_v: f64,
    /// The inpainting p-sampler's `denoised_fn` kind (used only there).
    pub denoised_type: DenoisedType,
}

impl Kd20Sampling {
    /// The given sampler, steps and guidance with the official `dynamic_threshold_v` 99.5 and
    /// `denoised_type` `"dynamic_threshold"`.
    pub fn new(sampler: SamplerKind, num_steps: usize, guidance_scale: f64) -> Self {
        Self {
            sampler,
            num_steps,
            guidance_scale,
            dynamic_threshold_v: 99.5,
            denoised_type: DenoisedType::DynamicThreshold,
        }
    }
}

/// A sampler step just taken.
#[derive(Debug, Clone, Copy)]
pub struct Kd20Step<'a> {
    /// Steps done, `1 ..= total`.
    pub done: usize,
    /// [`Kd20Denoiser::total_steps`].
    pub total: usize,
    /// The step's predicted clean latents of the `B` conditional rows `(B, 4, h, w)` f32, as
    /// the sampler used them (p-sampler: `pred_xstart` after `denoised_fn` and the dynamic
    /// threshold; DDIM/PLMS: `pred_x0`), in the UNet's scaled latent space.
    pub pred_x0: &'a Tensor,
}

/// The Kandinsky 2.0 UNet (text-to-image or inpainting) with `CONFIG_2_0`'s diffusion.
pub struct Kd20Denoiser {
    unet: Text2ImUNet,
    diffusion: DiffusionConfig,
    device: Device,
    dtype: DType,
}

/// A validated run: the diffusion, `generate_img`'s arguments and the step count.
struct Plan {
    diffusion: GaussianDiffusion,
    gen: GenerateImg,
    total: usize,
}

fn check_latents(field: &'static str, t: &Tensor, c: usize, multiple: usize) -> Result<usize> {
    let d = t.dims();
    let ok = d.len() == 4
        && d[0] > 0
        && d[1] == c
        && d[2] > 0
        && d[3] > 0
        && d[2].is_multiple_of(multiple)
        && d[3].is_multiple_of(multiple);
    if !ok {
        return Err(ModelError::invalid(
            field,
            format!(
                "shape {d:?}; expected (B ≥ 1, {c}, h, w) with h, w positive multiples of \
                 {multiple}"
            ),
        ));
    }
    Ok(d[0])
}

/// Checks a keep mask `(1 or rows, 1, H, W)` (H, W ≥ 1).
pub(super) fn check_keep_mask(mask: &Tensor, rows: usize) -> Result<()> {
    let d = mask.dims();
    let ok = d.len() == 4 && (d[0] == 1 || d[0] == rows) && d[1] == 1 && d[2] > 0 && d[3] > 0;
    if !ok {
        return Err(ModelError::invalid(
            "keep_mask",
            format!("shape {d:?}; expected (1 or {rows}, 1, H ≥ 1, W ≥ 1)"),
        ));
    }
    Ok(())
}

/// torch's `nearest` source index (`upsample.h: nearest_idx` for an explicit output size):
/// the same index when the sizes agree, `dst >> 1` for an exact doubling, else
/// `min(floor(dst · (in / out)), in − 1)` with the scale and product in f32.
fn nearest_indices(input: usize, output: usize) -> Vec<u32> {
    (0..output)
        .map(|dst| {
            let src = if output == input {
                dst
            } else if Some(output) == input.checked_mul(2) {
                dst >> 1
            } else {
                let scale = input as f32 / output as f32;
                ((dst as f32 * scale).floor() as usize).min(input - 1)
            };
            src as u32
        })
        .collect()
}

/// `F.interpolate(x, (height, width), mode="nearest")` of an `(N, C, H, W)` tensor, torch's
/// index formula included (see the module docs; not `nearest-exact`).
pub fn interpolate_nearest(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let d = x.dims();
    if d.len() != 4 || d[2] == 0 || d[3] == 0 {
        return Err(ModelError::invalid(
            "x",
            format!("shape {d:?}; expected (N, C, H ≥ 1, W ≥ 1)"),
        ));
    }
    if height == 0 || width == 0 {
        return Err(ModelError::invalid(
            "size",
            format!("{height}×{width}; allowed ≥ 1 each"),
        ));
    }
    if u32::try_from(d[2].max(d[3])).is_err() {
        return Err(ModelError::invalid(
            "x",
            format!("shape {d:?}: too large to index"),
        ));
    }
    let rows = Tensor::new(nearest_indices(d[2], height), x.device())?;
    let cols = Tensor::new(nearest_indices(d[3], width), x.device())?;
    Ok(x.contiguous()?
        .index_select(&rows, 2)?
        .index_select(&cols, 3)?)
}

/// `generate_inpainting`'s mask for `rows` images at latent size `h × w`: the keep mask
/// `(1 or rows, 1, H, W)` resized as `F.interpolate(mode="nearest")`, `prepare_mask` on each
/// row, a single row repeated `rows` times; `(rows, 1, h, w)` f32, before the pipeline's
/// `repeat(2)` for the guidance halves.
pub fn prepare_keep_mask(
    keep_mask: &Tensor,
    rows: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    check_keep_mask(keep_mask, rows)?;
    let resized = interpolate_nearest(&keep_mask.to_dtype(DType::F32)?, h, w)?;
    let n = resized.dim(0)?;
    let prepared = (0..n)
        .map(|i| prepare_mask(&resized.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    let m = Tensor::cat(&prepared, 0)?;
    Ok(if n == 1 && rows > 1 {
        m.repeat((rows, 1, 1, 1))?
    } else {
        m
    })
}

impl Kd20Denoiser {
    /// Loads the folder's UNet: `Kandinsky-2-0.pt` when present, else
    /// `Kandinsky-2-0-inpainting.pt`. The config is the `unet.json` sidecar when present (its
    /// `inpainting` must name the file chosen), else [`Kd20UnetConfig::default`] — with
    /// `inpainting` on for the inpainting file (`in_channels` stays 4; the model takes
    /// `2 · 4 + 1`, as `InpaintText2ImUNet`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message: "missing: a Kandinsky 2.0 checkpoint folder".into(),
            });
        }
        let (file, inpainting) = if dir.join(KD20_UNET_FILE).is_file() {
            (KD20_UNET_FILE, false)
        } else if dir.join(KD20_INPAINT_UNET_FILE).is_file() {
            (KD20_INPAINT_UNET_FILE, true)
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "missing: a Kandinsky 2.0 UNet ({KD20_UNET_FILE} or {KD20_INPAINT_UNET_FILE})"
                ),
            });
        };
        let sidecar = dir.join("unet.json");
        let cfg = if sidecar.is_file() {
            let cfg = Kd20UnetConfig::from_file(&sidecar)?;
            if cfg.inpainting != inpainting {
                let kind = if inpainting {
                    "the inpainting model"
                } else {
                    "the text-to-image model"
                };
                return Err(ModelError::Config {
                    path: sidecar,
                    message: format!(
                        "`inpainting` is {} but the folder's UNet is {file} ({kind}; \
                         {KD20_UNET_FILE} is loaded when present, else \
                         {KD20_INPAINT_UNET_FILE}); allowed: `inpainting: {inpainting}`",
                        cfg.inpainting
                    ),
                });
            }
            cfg
        } else {
            Kd20UnetConfig {
                inpainting,
                ..Kd20UnetConfig::default()
            }
        };
        let unet = Text2ImUNet::load(&dir.join(file), &cfg, dtype, device)?;
        Ok(Self {
            unet,
            diffusion: DiffusionConfig::kandinsky_2_0(),
            device: device.clone(),
            dtype,
        })
    }

    /// Whether the UNet is the inpainting model (it serves [`Kd20Task::Inpaint`] only; the
    /// text-to-image model serves the other two tasks).
    pub fn is_inpaint(&self) -> bool {
        self.unet.config().inpainting
    }

    pub fn unet(&self) -> &Text2ImUNet {
        &self.unet
    }

    /// `CONFIG_2_0["diffusion_config"]`.
    pub fn diffusion_config(&self) -> &DiffusionConfig {
        &self.diffusion
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UNet's weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Latent channels (4).
    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// Refuses a task the loaded model does not serve, naming it.
    pub(super) fn check_task_name(&self, task: &'static str) -> Result<()> {
        let inpaint_task = task == "inpaint";
        if inpaint_task == self.is_inpaint() {
            return Ok(());
        }
        let message = if self.is_inpaint() {
            format!(
                "{task} needs the text-to-image UNet ({KD20_UNET_FILE}); this is the inpainting \
                 model ({KD20_INPAINT_UNET_FILE}), which serves inpaint only"
            )
        } else {
            format!(
                "{task} needs the inpainting UNet ({KD20_INPAINT_UNET_FILE}); this is the \
                 text-to-image model ({KD20_UNET_FILE}), which serves text_to_image and \
                 image_to_image"
            )
        };
        Err(ModelError::invalid("task", message))
    }

    /// Checks `params` and returns the diffusion they build (before any task is known).
    pub(super) fn check_params(&self, params: &Kd20Sampling) -> Result<GaussianDiffusion> {
        if !params.guidance_scale.is_finite() {
            return Err(ModelError::invalid(
                "guidance_scale",
                format!("{}; allowed a finite value", params.guidance_scale),
            ));
        }
        if !(0.0..=100.0).contains(&params.dynamic_threshold_v) {
            return Err(ModelError::invalid(
                "dynamic_threshold_v",
                format!(
                    "{}; allowed 0 ..= 100 (a percentile)",
                    params.dynamic_threshold_v
                ),
            ));
        }
        pipeline_diffusion(&self.diffusion, params.sampler, params.num_steps)
    }

    /// Validates everything but the text rows; `rows` is `B` when known.
    fn plan(&self, params: &Kd20Sampling, task: &Kd20Task, rows: Option<usize>) -> Result<Plan> {
        self.check_task_name(task.name())?;
        let diffusion = self.check_params(params)?;
        let c = self.latent_channels();
        let multiple = self.unet.latent_multiple();
        let (b, init_step) = match task {
            Kd20Task::TextToImage {
                latent_height,
                latent_width,
            } => {
                for (field, v) in [
                    ("latent_height", *latent_height),
                    ("latent_width", *latent_width),
                ] {
                    if v == 0 || !v.is_multiple_of(multiple) {
                        return Err(ModelError::invalid(
                            field,
                            format!("{v}; allowed a positive multiple of {multiple}"),
                        ));
                    }
                }
                (rows.unwrap_or(1), None)
            }
            Kd20Task::ImageToImage { latents, strength } => {
                let b = check_latents("latents", latents, c, multiple)?;
                (b, Some(diffusion.img2img_start_step(*strength)?))
            }
            Kd20Task::Inpaint { latents, keep_mask } => {
                let b = check_latents("latents", latents, c, multiple)?;
                check_keep_mask(keep_mask, b)?;
                (b, None)
            }
        };
        if let Some(r) = rows {
            if r != b {
                return Err(ModelError::invalid(
                    "latents",
                    format!("{b} rows; the text has {r} (B conditional rows)"),
                ));
            }
        }
        let gen = GenerateImg {
            num_steps: params.num_steps,
            guidance_scale: params.guidance_scale,
            dynamic_threshold_v: params.dynamic_threshold_v,
            denoised_type: params.denoised_type,
            init_step,
            ..GenerateImg::new(params.sampler, b)
        };
        let total = gen.total_steps(&diffusion)?;
        Ok(Plan {
            diffusion,
            gen,
            total,
        })
    }

    /// The number of sampler steps [`Self::sample`] runs (and reports as `total`) for
    /// `params` on `task`: the p-sampler's respaced count (`num_steps`) or the img2img
    /// `init_step`; DDIM/PLMS the DDIM timesteps `range(0, 1000, 1000 // S) + 1` it runs (S = 6
    /// gives 7), from `init_step` down for img2img. Validates the parameters and the task
    /// (shapes, strength, the model kind) without drawing.
    pub fn total_steps(&self, params: &Kd20Sampling, task: &Kd20Task) -> Result<usize> {
        Ok(self.plan(params, task, None)?.total)
    }

    /// `generate_img` from the UNet's conditioning onward: returns `samples[:B]`
    /// `(B, 4, h, w)` f32 latents in the UNet's scaled latent space. Draws as the official code
    /// (see the module docs). `observer` is called after every sampler step; an error from it
    /// aborts sampling and is returned. `stop` is asked between the UNet's layers.
    pub fn sample(
        &self,
        text: &Kd20Text,
        task: &Kd20Task,
        params: &Kd20Sampling,
        noise: &mut dyn NoiseSource,
        observer: &mut dyn FnMut(Kd20Step<'_>) -> Result<()>,
        stop: Stop,
    ) -> Result<Tensor> {
        let b = text.check()?;
        let plan = self.plan(params, task, Some(b))?;
        let emb = self.unet.text_embedding(&Kd20UnetText {
            full1: &text.full1,
            pooled1: &text.pooled1,
            full2: &text.full2,
            pooled2: None,
        })?;
        let dev = &self.device;
        let (x_t, inpaint, (lh, lw)) = match task {
            Kd20Task::TextToImage {
                latent_height,
                latent_width,
            } => (None, None, (*latent_height, *latent_width)),
            Kd20Task::ImageToImage { latents, strength } => {
                let latents = latents.to_device(dev)?;
                let start = img2img_start(&plan.diffusion, &latents, *strength, noise)?;
                let (_, _, h, w) = latents.dims4()?;
                (Some(start.x_t), None, (h, w))
            }
            Kd20Task::Inpaint { latents, keep_mask } => {
                let latents = latents.to_device(dev)?.to_dtype(DType::F32)?;
                let (_, _, h, w) = latents.dims4()?;
                let mask = prepare_keep_mask(&keep_mask.to_device(dev)?, b, (h, w))?;
                // image.repeat(2, 1, 1, 1), img_mask.repeat(2, 1, 1, 1)
                let init = Tensor::cat(&[&latents, &latents], 0)?;
                let mask = Tensor::cat(&[&mask, &mask], 0)?;
                // model_kwargs["inpaint_image"] = init_img * img_mask
                let image = init.broadcast_mul(&mask)?;
                (None, Some((init, mask, image)), (h, w))
            }
        };
        let unet = &self.unet;
        let mut model = |x: &Tensor, t: &Tensor| {
            let extra = inpaint
                .as_ref()
                .map(|(_, mask, image)| Kd20Inpaint { image, mask });
            unet.forward_with_text_emb(x, t, &emb, extra, stop)
        };
        let mut on_step = |s: SamplerStep<'_>| -> Result<()> {
            let pred = s.pred_x0.narrow(0, 0, b)?;
            observer(Kd20Step {
                done: s.done,
                total: s.total,
                pred_x0: &pred,
            })
        };
        let samples = plan.gen.run_observed(
            &plan.diffusion,
            [self.latent_channels(), lh, lw],
            x_t.as_ref(),
            inpaint.as_ref().map(|(init, mask, _)| (init, mask)),
            &mut model,
            noise,
            dev,
            &mut on_step,
        )?;
        Ok(samples.to_dtype(DType::F32)?.contiguous()?)
    }
}
