//! The Kandinsky 2.2 and 2.1 decoder loops at the latent level: image embeddings (and, for 2.1,
//! M-CLIP text conditioning) → final latents (the MoVQ `decode` input), as diffusers'
//! `KandinskyV22Pipeline`, `…Img2ImgPipeline`, `…InpaintPipeline` and `…ControlnetPipeline`
//! run it (spec §2.5–2.8), and as `KandinskyPipeline`, `KandinskyImg2ImgPipeline` and
//! `KandinskyInpaintPipeline` (`pipelines/kandinsky/`, spec §9) do. [`DecoderFamily`] picks the
//! generation explicitly; the 2.1 differences:
//!
//! * the UNet also gets the text conditioning, arranged like the image embeddings
//!   (`[negative…, positive…]` under CFG, each repeat-interleaved per image); diffusers does not
//!   pass the text attention mask to the UNet;
//! * img2img noises the image latents (times `init_noise_sigma`) with the pipeline's own
//!   `add_noise` (linear β 0.0001…0.02, 1000 steps) at `int(num_train_timesteps·strength) − 2`,
//!   not with the scheduler at the first remaining timestep;
//! * inpainting never blends the known latents back in (neither per step nor at the end).
//!
//! * Classifier-free guidance iff `guidance_scale > 1`, batch order `[negative…, positive…]`,
//!   ε = u + s·(c − u); the variance channels come from the conditional half and are dropped
//!   unless the scheduler learns its variance.
//! * Latent size `ceil(H / sf²)·sf` with sf = the MoVQ scale factor (8 for the real MoVQ).
//! * Noise: initial latents (unless given) and every scheduler draw come from one
//!   [`NoiseSource`], in diffusers' draw order.
//! * A per-step callback sees the progress and may stop the loop (cancellation within one step).

use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use crate::schedulers::betas::{alphas_cumprod, linspace_f32};
use crate::schedulers::ddpm::add_noise_at;
use crate::schedulers::Scheduler;
use crate::unet::{UNet2DConditionModel, UNetConditioning};
use candle_core::{DType, Tensor};

/// The text conditioning of a Kandinsky 2.1 decoder run: the M-CLIP outputs of the prompts
/// (B rows, one per image embedding) and of the negative prompts (1 row, shared, or B rows).
/// The attention mask is not needed: diffusers does not pass it to the UNet.
#[derive(Debug, Clone, Copy)]
pub struct DecoderText21<'a> {
    /// Projected pooled prompt embeddings (B, cross_attention_dim).
    pub text_embeds: &'a Tensor,
    /// Prompt hidden states (B, L, encoder_hid_dim).
    pub hidden_states: &'a Tensor,
    /// Projected pooled negative-prompt embeddings (1 or B, cross_attention_dim); used only with CFG.
    pub negative_text_embeds: &'a Tensor,
    /// Negative-prompt hidden states (1 or B, L, encoder_hid_dim); used only with CFG.
    pub negative_hidden_states: &'a Tensor,
}

/// Which Kandinsky generation's decoder pipeline a run mirrors (must match the UNet).
#[derive(Debug, Clone, Copy)]
pub enum DecoderFamily<'a> {
    /// Kandinsky 2.2 (`KandinskyV22*Pipeline`): image embeddings only.
    Kandinsky22,
    /// Kandinsky 2.1 (`Kandinsky*Pipeline`): image embeddings plus text conditioning.
    Kandinsky21(DecoderText21<'a>),
}

/// What the loop does besides text-to-image.
#[derive(Debug, Clone, Copy)]
pub enum DecoderMode<'a> {
    /// Plain text-to-image (from image embeddings).
    Text2Img,
    /// Image-to-image: start from `image_latents` (MoVQ `encode` output, (1 or B, 4, h, w))
    /// and run the last `⌊N·strength⌋` timesteps; `strength` ∈ (0, 1]. 2.2 noises the latents
    /// to the first of them with the scheduler, 2.1 to `int(T·strength) − 2` with its own β table.
    Img2Img {
        /// MoVQ latents of the init image.
        image_latents: &'a Tensor,
        /// How much of the schedule to run.
        strength: f64,
    },
    /// Inpainting with a 9-channel UNet: `image_latents` (1 or B, 4, h, w) and the prepared
    /// latent keep-mask (1 or B, 1, h, w) from [`prepare_inpaint_mask`] (1 = keep; the same
    /// preparation for 2.1 and 2.2). Only 2.2 blends the known latents back in.
    Inpaint {
        /// MoVQ latents of the init image.
        image_latents: &'a Tensor,
        /// Prepared latent keep-mask.
        mask: &'a Tensor,
    },
    /// ControlNet: `hint` (1 or B, 3, 8h, 8w) in [0, 1] at pixel resolution.
    Controlnet {
        /// The depth hint.
        hint: &'a Tensor,
    },
}

/// The inputs of one decoder run.
#[derive(Debug, Clone, Copy)]
pub struct DecoderParams<'a> {
    /// Prior output (B, embed_dim).
    pub image_embeds: &'a Tensor,
    /// Negative prior output (B, embed_dim).
    pub negative_image_embeds: &'a Tensor,
    /// Requested image height in pixels.
    pub height: usize,
    /// Requested image width in pixels.
    pub width: usize,
    /// MoVQ scale factor 2^(levels−1) (8 for Kandinsky 2.2).
    pub movq_scale_factor: usize,
    /// Scheduler steps N (img2img runs the last ⌊N·strength⌋ of them).
    pub num_inference_steps: usize,
    /// CFG scale; no guidance (UNet batch B) when ≤ 1.
    pub guidance_scale: f64,
    /// Images per embedding (n ≥ 1).
    pub num_images_per_prompt: usize,
    /// Explicit initial latents (B·n, 4, h, w) instead of a draw (not for img2img).
    pub latents: Option<&'a Tensor>,
    /// Text2img, img2img, inpaint or ControlNet.
    pub mode: DecoderMode<'a>,
    /// Kandinsky 2.2, or 2.1 with its text conditioning.
    pub family: DecoderFamily<'a>,
}

/// What the per-step callback sees.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress<'a> {
    /// Index of the step just finished (0-based).
    pub step: usize,
    /// Number of steps this run makes.
    pub total: usize,
    /// The timestep just stepped from.
    pub timestep: usize,
    /// Latents after this step (after the inpaint blend).
    pub latents: &'a Tensor,
    /// The scheduler's x0 estimate at this step, when it has one.
    pub pred_original_sample: Option<&'a Tensor>,
}

/// How a decoder run ended.
#[derive(Debug, Clone)]
pub enum DecoderOutcome {
    /// All steps ran; the final latents (B·n, 4, h, w), f32.
    Finished(Tensor),
    /// The callback asked to stop after `steps_done` steps.
    Cancelled {
        /// Steps completed before stopping.
        steps_done: usize,
    },
}

impl DecoderOutcome {
    /// The final latents, or an error if the run was cancelled.
    pub fn into_latents(self) -> Result<Tensor> {
        match self {
            Self::Finished(t) => Ok(t),
            Self::Cancelled { steps_done } => Err(ModelError::invalid(
                "decoder",
                format!("cancelled after {steps_done} steps"),
            )),
        }
    }
}

/// Latent side for an image side: `ceil(side / sf²)·sf`.
pub fn latent_side(side: usize, movq_scale_factor: usize) -> usize {
    let sf2 = movq_scale_factor * movq_scale_factor;
    side.div_ceil(sf2) * movq_scale_factor
}

/// Repeats each batch row `n` times (`repeat_interleave(n, dim=0)`).
fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// Brings a (1 or B, …) per-image input to batch B·n (repeat_interleave n).
fn per_image(
    x: &Tensor,
    b: usize,
    n: usize,
    field: &'static str,
    rest: &[usize],
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() != rest.len() + 1 || dims[1..] != *rest || (dims[0] != 1 && dims[0] != b) {
        return Err(ModelError::invalid(
            field,
            format!(
                "shape {dims:?}; expected ({}, {})",
                if b == 1 {
                    "1".to_string()
                } else {
                    format!("1 or {b}")
                },
                join(rest)
            ),
        ));
    }
    let x = x.to_dtype(DType::F32)?;
    let x = if dims[0] == 1 && b > 1 {
        let mut reps = vec![1; dims.len()];
        reps[0] = b;
        x.repeat(reps)?
    } else {
        x
    };
    repeat_interleave(&x, n)
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the decoder loop and returns the final latents (or the cancellation point).
/// `scheduler` is a fresh per-request scheduler; `on_step` returns `false` to stop.
pub fn run_decoder(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    params: &DecoderParams,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<DecoderOutcome> {
    let p = params;
    let dev = p.image_embeds.device().clone();
    let d = unet.embed_dim();
    let emb_dims = p.image_embeds.dims();
    if emb_dims.len() != 2 || emb_dims[1] != d || emb_dims[0] == 0 {
        return Err(ModelError::invalid(
            "image_embeds",
            format!("shape {emb_dims:?}; expected (B, {d}) with B ≥ 1"),
        ));
    }
    if p.negative_image_embeds.dims() != emb_dims {
        return Err(ModelError::invalid(
            "negative_image_embeds",
            format!(
                "shape {:?}; expected the image_embeds shape {emb_dims:?}",
                p.negative_image_embeds.dims()
            ),
        ));
    }
    if p.num_images_per_prompt == 0 {
        return Err(ModelError::invalid(
            "num_images_per_prompt",
            "0; allowed ≥ 1",
        ));
    }
    if !p.guidance_scale.is_finite() {
        return Err(ModelError::invalid(
            "guidance_scale",
            "must be a finite number",
        ));
    }
    if p.height == 0 || p.width == 0 || p.movq_scale_factor == 0 {
        return Err(ModelError::invalid(
            "height/width",
            format!("{}×{}; allowed ≥ 1 pixel", p.height, p.width),
        ));
    }
    let (n, b) = (p.num_images_per_prompt, emb_dims[0]);
    let bn = b * n;
    let (lh, lw) = (
        latent_side(p.height, p.movq_scale_factor),
        latent_side(p.width, p.movq_scale_factor),
    );
    let m = unet.latent_multiple();
    if lh % m != 0 || lw % m != 0 {
        return Err(ModelError::invalid(
            "height/width",
            format!(
                "{}×{} gives latents {lh}×{lw}, which the UNet needs to be multiples of {m}",
                p.height, p.width
            ),
        ));
    }
    let shape = [bn, 4, lh, lw];
    let cfg = p.guidance_scale > 1.0;
    let pos = repeat_interleave(&p.image_embeds.to_dtype(DType::F32)?, n)?;
    let embeds = if cfg {
        let neg = repeat_interleave(&p.negative_image_embeds.to_dtype(DType::F32)?, n)?;
        Tensor::cat(&[neg, pos], 0)?
    } else {
        pos
    };
    let double =
        |x: Tensor| -> Result<Tensor> { Ok(if cfg { Tensor::cat(&[&x, &x], 0)? } else { x }) };
    let text = text_conditioning(unet, p, b, cfg)?;
    let is21 = text.is_some();

    // The UNet's extra inputs and the per-mode set-up.
    let inpaint_needed = matches!(p.mode, DecoderMode::Inpaint { .. });
    if inpaint_needed != (unet.sample_channels() == 9) {
        return Err(ModelError::invalid(
            "mode",
            format!(
                "this UNet takes {} input channels; inpainting needs a 9-channel UNet and the other modes a 4-channel one",
                unet.sample_channels()
            ),
        ));
    }
    if matches!(p.mode, DecoderMode::Controlnet { .. }) != unet.takes_hint() {
        return Err(ModelError::invalid(
            "mode",
            "a ControlNet UNet needs the Controlnet mode (with a hint) and only it",
        ));
    }
    let mut hint = None;
    let mut inpaint = None;
    scheduler.set_timesteps(p.num_inference_steps)?;
    let mut timesteps = scheduler.timesteps().to_vec();
    let mut latents = match p.mode {
        DecoderMode::Img2Img {
            image_latents,
            strength,
        } => {
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(ModelError::invalid(
                    "strength",
                    format!("{strength}; allowed (0, 1]"),
                ));
            }
            if p.latents.is_some() {
                return Err(ModelError::invalid(
                    "latents",
                    "img2img starts from the image latents; explicit latents are not allowed",
                ));
            }
            let steps = timesteps.len();
            let init = ((steps as f64 * strength) as usize).min(steps);
            if init == 0 {
                return Err(ModelError::invalid(
                    "strength",
                    format!(
                        "{strength} × {steps} steps runs no step; allowed strength ≥ 1/num_inference_steps"
                    ),
                ));
            }
            timesteps = timesteps[steps - init..].to_vec();
            let x = per_image(image_latents, b, n, "image_latents", &shape[1..])?;
            if is21 {
                let x = (x * scheduler.init_noise_sigma())?;
                let t = img2img21_timestep(scheduler.num_train_timesteps(), strength)?;
                let z = noise.randn(&shape, &dev)?;
                let ac = alphas_cumprod(&linspace_f32(0.0001, 0.02, IMG2IMG21_TRAIN_STEPS));
                add_noise_at(&ac, &x, &z, t)?
            } else {
                let z = noise.randn(&shape, &dev)?;
                scheduler.add_noise(&x, &z, timesteps[0])?
            }
        }
        _ => match p.latents {
            Some(l) => {
                if l.dims() != shape {
                    return Err(ModelError::invalid(
                        "latents",
                        format!("shape {:?}; expected {shape:?}", l.dims()),
                    ));
                }
                (l.to_dtype(DType::F32)? * scheduler.init_noise_sigma())?
            }
            None => (noise.randn(&shape, &dev)? * scheduler.init_noise_sigma())?,
        },
    };
    match p.mode {
        DecoderMode::Inpaint {
            image_latents,
            mask,
        } => {
            let img = per_image(image_latents, b, n, "image_latents", &shape[1..])?;
            let mask = per_image(mask, b, n, "mask", &[1, lh, lw])?;
            let masked = img.broadcast_mul(&mask)?;
            let extra = double(Tensor::cat(&[&masked, &mask], 1)?)?;
            inpaint = Some(Inpaint {
                image0: img.narrow(0, 0, 1)?,
                mask0: mask.narrow(0, 0, 1)?,
                extra,
                noise: latents.clone(),
                blend: !is21,
            });
        }
        DecoderMode::Controlnet { hint: h } => {
            hint = Some(double(per_image(h, b, n, "hint", &[3, 8 * lh, 8 * lw])?)?);
        }
        _ => {}
    }

    let total = timesteps.len();
    let learned = scheduler.learned_variance();
    for (i, &t) in timesteps.iter().enumerate() {
        let x_in = double(latents.clone())?;
        let x_in = match &inpaint {
            Some(ip) => Tensor::cat(&[&x_in, &ip.extra], 1)?,
            None => x_in,
        };
        let mut cond = UNetConditioning::image(&embeds).with_hint(hint.as_ref());
        if let Some((te, hs)) = &text {
            cond = cond.with_text(te, hs);
        }
        let out = unet.forward(&x_in, t as f64, &cond)?.to_dtype(DType::F32)?;
        let out = if cfg {
            let (u, c) = (out.narrow(0, 0, bn)?, out.narrow(0, bn, bn)?);
            let eps_u = u.narrow(1, 0, 4)?;
            let eps = (&eps_u + ((c.narrow(1, 0, 4)? - &eps_u)? * p.guidance_scale)?)?;
            if learned {
                Tensor::cat(&[&eps, &c.narrow(1, 4, c.dim(1)? - 4)?], 1)?
            } else {
                eps
            }
        } else if learned {
            out
        } else {
            out.narrow(1, 0, 4)?
        };
        let step = scheduler.step(&out, t, &latents, noise)?;
        latents = step.prev_sample;
        if let Some(ip) = inpaint.as_ref().filter(|ip| ip.blend) {
            let proper = match timesteps.get(i + 1) {
                Some(&t_next) => scheduler.add_noise(
                    &ip.image0.broadcast_as(ip.noise.shape())?.contiguous()?,
                    &ip.noise,
                    t_next,
                )?,
                None => ip.image0.clone(),
            };
            latents = ip.blend(&proper, &latents)?;
        }
        let go_on = on_step(StepProgress {
            step: i,
            total,
            timestep: t,
            latents: &latents,
            pred_original_sample: step.pred_original_sample.as_ref(),
        });
        if !go_on {
            return Ok(DecoderOutcome::Cancelled { steps_done: i + 1 });
        }
    }
    if let Some(ip) = inpaint.as_ref().filter(|ip| ip.blend) {
        latents = ip.blend(&ip.image0, &latents)?;
    }
    Ok(DecoderOutcome::Finished(latents))
}

/// Inpainting state: the first image's latents and mask (diffusers blends with batch
/// element 0 only), the UNet's extra channels, the initial latents used as re-noising noise,
/// and whether to blend at all (2.2 does, 2.1 does not).
struct Inpaint {
    image0: Tensor,
    mask0: Tensor,
    extra: Tensor,
    noise: Tensor,
    blend: bool,
}

impl Inpaint {
    /// `mask·known + (1 − mask)·latents`.
    fn blend(&self, known: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let keep = known.broadcast_mul(&self.mask0)?;
        let inv = (self.mask0.neg()? + 1.0)?;
        Ok(keep.broadcast_add(&latents.broadcast_mul(&inv)?)?)
    }
}

/// Length of the β table of `KandinskyImg2ImgPipeline.add_noise`.
const IMG2IMG21_TRAIN_STEPS: usize = 1000;

/// The 2.1 img2img noising index `int(num_train_timesteps·strength) − 2`, wrapped like a
/// negative Python index into the 1000-entry table.
fn img2img21_timestep(num_train_timesteps: usize, strength: f64) -> Result<usize> {
    let n = IMG2IMG21_TRAIN_STEPS as i64;
    let t = (num_train_timesteps as f64 * strength) as i64 - 2;
    let idx = if t < 0 { t + n } else { t };
    if !(0..n).contains(&idx) {
        return Err(ModelError::invalid(
            "strength",
            format!(
                "{strength} with num_train_timesteps {num_train_timesteps} gives noising timestep {t}; \
                 Kandinsky 2.1 img2img allows −{n}…{} (num_train_timesteps·strength ≤ {})",
                n - 1,
                n + 1
            ),
        ));
    }
    Ok(idx as usize)
}

/// The UNet's 2.1 text inputs (text_embeds, hidden_states) at batch (2·)B·n, arranged like the
/// image embeddings; `None` for 2.2. Checks that the family matches the UNet.
fn text_conditioning(
    unet: &UNet2DConditionModel,
    p: &DecoderParams,
    b: usize,
    cfg: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let t = match (p.family, unet.text_hidden_dim()) {
        (DecoderFamily::Kandinsky22, None) => return Ok(None),
        (DecoderFamily::Kandinsky21(t), Some(_)) => t,
        (DecoderFamily::Kandinsky22, Some(h)) => {
            return Err(ModelError::invalid(
                "family",
                format!(
                    "Kandinsky22, but this is a Kandinsky 2.1 UNet; expected Kandinsky21 with text_embeds (B, {}) and hidden_states (B, L, {h})",
                    unet.embed_dim()
                ),
            ))
        }
        (DecoderFamily::Kandinsky21(_), None) => {
            return Err(ModelError::invalid(
                "family",
                "Kandinsky21, but this is a Kandinsky 2.2 UNet (image embeddings only); expected Kandinsky22",
            ))
        }
    };
    let (d, h) = (unet.embed_dim(), unet.text_hidden_dim().unwrap_or_default());
    let n = p.num_images_per_prompt;
    let hd = t.hidden_states.dims();
    if hd.len() != 3 || hd[0] != b || hd[1] == 0 || hd[2] != h {
        return Err(ModelError::invalid(
            "text_hidden_states",
            format!("shape {hd:?}; expected ({b}, L, {h}) with L ≥ 1"),
        ));
    }
    if t.text_embeds.dims() != [b, d] {
        return Err(ModelError::invalid(
            "text_embeds",
            format!("shape {:?}; expected ({b}, {d})", t.text_embeds.dims()),
        ));
    }
    let te = repeat_interleave(&t.text_embeds.to_dtype(DType::F32)?, n)?;
    let hs = repeat_interleave(&t.hidden_states.to_dtype(DType::F32)?, n)?;
    if !cfg {
        return Ok(Some((te, hs)));
    }
    let neg_te = per_image(t.negative_text_embeds, b, n, "negative_text_embeds", &[d])?;
    let neg_hs = per_image(
        t.negative_hidden_states,
        b,
        n,
        "negative_text_hidden_states",
        &[hd[1], h],
    )?;
    Ok(Some((
        Tensor::cat(&[neg_te, te], 0)?,
        Tensor::cat(&[neg_hs, hs], 0)?,
    )))
}

/// The inpaint keep-mask at latent resolution, as `KandinskyV22InpaintPipeline` prepares it:
/// `mask` (B, H, W) or (B, 1, H, W) at pixel resolution in [0, 1] with **1 = repaint** is
/// binarised at 0.5, inverted (1 = keep), nearest-resized to (`latent_h`, `latent_w`)
/// (source index ⌊dst·in/out⌋) and eroded by [`prepare_mask`]. Returns (B, 1, latent_h, latent_w).
pub fn prepare_inpaint_mask(mask: &Tensor, latent_h: usize, latent_w: usize) -> Result<Tensor> {
    let mask = match mask.rank() {
        3 => mask.unsqueeze(1)?,
        4 if mask.dim(1)? == 1 => mask.clone(),
        _ => {
            return Err(ModelError::invalid(
                "mask",
                format!(
                    "shape {:?}; expected (B, H, W) or (B, 1, H, W)",
                    mask.dims()
                ),
            ))
        }
    };
    let (b, _, h, w) = mask.dims4()?;
    if h == 0 || w == 0 || latent_h == 0 || latent_w == 0 {
        return Err(ModelError::invalid("mask", "empty mask or latent size"));
    }
    let v = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let src = |dst: usize, inp: usize, out: usize| -> usize {
        if inp == out {
            dst
        } else {
            (((dst as f32) * (inp as f32 / out as f32)).floor() as usize).min(inp - 1)
        }
    };
    let mut out = Vec::with_capacity(b * latent_h * latent_w);
    for bi in 0..b {
        for i in 0..latent_h {
            for j in 0..latent_w {
                let m = v[bi * h * w + src(i, h, latent_h) * w + src(j, w, latent_w)];
                out.push(if m >= 0.5 { 0.0f32 } else { 1.0 });
            }
        }
    }
    let keep = Tensor::from_vec(out, (b, 1, latent_h, latent_w), mask.device())?;
    prepare_mask(&keep)
}

/// diffusers' `prepare_mask` erosion of a keep-mask (B, C, h, w): for every pixel whose original
/// channel-0 value is not 1, zero all channels at (i−1,j), (i,j−1), (i−1,j−1), (i+1,j), (i,j+1),
/// (i+1,j+1) (the anti-diagonal neighbours stay).
pub fn prepare_mask(masks: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = masks.dims4()?;
    let old = masks
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut new = old.clone();
    let plane = h * w;
    for bi in 0..b {
        let base = bi * c * plane;
        for i in 0..h {
            for j in 0..w {
                if old[base + i * w + j] == 1.0 {
                    continue;
                }
                let mut zero = |ii: usize, jj: usize| {
                    for ci in 0..c {
                        new[base + ci * plane + ii * w + jj] = 0.0;
                    }
                };
                if i > 0 {
                    zero(i - 1, j);
                }
                if j > 0 {
                    zero(i, j - 1);
                }
                if i > 0 && j > 0 {
                    zero(i - 1, j - 1);
                }
                if i + 1 < h {
                    zero(i + 1, j);
                }
                if j + 1 < w {
                    zero(i, j + 1);
                }
                if i + 1 < h && j + 1 < w {
                    zero(i + 1, j + 1);
                }
            }
        }
    }
    Ok(Tensor::from_vec(new, (b, c, h, w), masks.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img2img21_timestep_matches_python_indexing() {
        assert_eq!(img2img21_timestep(1000, 1.0).unwrap(), 998);
        assert_eq!(img2img21_timestep(1000, 0.3).unwrap(), 298);
        // int(1000·0.001) − 2 = −1 indexes the last entry in torch.
        assert_eq!(img2img21_timestep(1000, 0.001).unwrap(), 999);
        let e = img2img21_timestep(2000, 1.0).unwrap_err().to_string();
        assert!(e.contains("strength") && e.contains("1998"), "{e}");
    }
}
