//! Everything one decoder run needs, owned, and the one place its rules live:
//! [`DecoderInputs::validate`] checks every field against the UNet and the scheduler before a
//! step runs. Errors are [`ModelError::InvalidInput`] naming the field (the names below; a
//! service maps them to its wire paths) and the allowed values.

use super::{img2img21_timestep, latent_side};
use crate::error::{ModelError, Result};
use crate::schedulers::Scheduler;
use crate::unet::UNet2DConditionModel;
use candle_core::{DType, Tensor};

/// Most text tokens per row (XLM-R's position table has 514 entries, 512 usable).
pub const MAX_TEXT_TOKENS: usize = 512;

/// What the loop does besides text-to-image, with its inputs.
#[derive(Debug, Clone)]
pub enum DecoderMode {
    /// Plain text-to-image (from image embeddings).
    Text2Img,
    /// Image-to-image: start from `image_latents` (MoVQ `encode` output, (1 or B, 4, h, w))
    /// and run the last `⌊N·strength⌋` timesteps; `strength` ∈ (0, 1]. 2.2 noises the latents
    /// to the first of them with the scheduler, 2.1 to `int(T·strength) − 2` with its own β table.
    Img2Img {
        /// MoVQ latents of the init image.
        image_latents: Tensor,
        /// How much of the schedule to run.
        strength: f64,
        /// A ControlNet UNet's hint (1 or B, 3, 8h, 8w) in [0, 1], as
        /// `KandinskyV22ControlnetImg2ImgPipeline` takes it; `None` for a plain UNet.
        hint: Option<Tensor>,
    },
    /// Inpainting with a 9-channel UNet: `image_latents` (1 or B, 4, h, w) and the prepared
    /// latent keep-mask (1 or B, 1, h, w) from [`super::prepare_inpaint_mask`] (1 = keep; the
    /// same preparation for 2.1 and 2.2). Only 2.2 blends the known latents back in.
    Inpaint {
        /// MoVQ latents of the init image.
        image_latents: Tensor,
        /// Prepared latent keep-mask.
        mask: Tensor,
    },
    /// ControlNet: `hint` (1 or B, 3, 8h, 8w) in [0, 1] at pixel resolution.
    Controlnet {
        /// The depth hint.
        hint: Tensor,
    },
}

/// Kandinsky 2.1's text conditioning: the M-CLIP outputs of the prompts (B rows, one per image
/// embedding) and of the negative prompts (1 row, shared, or B rows; required with CFG). All
/// empty for a Kandinsky 2.2 UNet. diffusers does not pass the attention mask to the UNet; when
/// given it is only checked against the hidden states.
#[derive(Debug, Clone, Default)]
pub struct DecoderText {
    /// Projected pooled prompt embeddings (B, cross_attention_dim).
    pub text_embeds: Option<Tensor>,
    /// Prompt hidden states (B, L, encoder_hid_dim), L in 1..=[`MAX_TEXT_TOKENS`].
    pub text_hidden_states: Option<Tensor>,
    /// Projected pooled negative-prompt embeddings (1 or B, cross_attention_dim).
    pub negative_text_embeds: Option<Tensor>,
    /// Negative-prompt hidden states (1 or B, L, encoder_hid_dim), L as the prompt's.
    pub negative_text_hidden_states: Option<Tensor>,
}

impl DecoderText {
    /// Positive and negative conditioning (the negative used only with CFG).
    pub fn new(
        text_embeds: Tensor,
        text_hidden_states: Tensor,
        negative_text_embeds: Tensor,
        negative_text_hidden_states: Tensor,
    ) -> Self {
        Self {
            text_embeds: Some(text_embeds),
            text_hidden_states: Some(text_hidden_states),
            negative_text_embeds: Some(negative_text_embeds),
            negative_text_hidden_states: Some(negative_text_hidden_states),
        }
    }

    fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, t)| t.is_none())
    }

    fn fields(&self) -> [(&'static str, &Option<Tensor>); 4] {
        [
            ("text_embeds", &self.text_embeds),
            ("text_hidden_states", &self.text_hidden_states),
            ("negative_text_embeds", &self.negative_text_embeds),
            (
                "negative_text_hidden_states",
                &self.negative_text_hidden_states,
            ),
        ]
    }
}

/// The inputs of one decoder run, owned.
#[derive(Debug, Clone)]
pub struct DecoderInputs {
    /// Prior output (B, embed_dim), B ≥ 1.
    pub image_embeds: Tensor,
    /// Negative prior output (1 or B, embed_dim); required with CFG, unused without.
    pub negative_image_embeds: Option<Tensor>,
    /// Requested image height in pixels.
    pub height: usize,
    /// Requested image width in pixels.
    pub width: usize,
    /// MoVQ scale factor 2^(levels−1) (8 for Kandinsky 2.2).
    pub movq_scale_factor: usize,
    /// Scheduler steps N in 1..=num_train_timesteps (img2img runs the last ⌊N·strength⌋).
    /// With an explicit `timesteps` list, N is that list's length.
    pub num_inference_steps: usize,
    /// An explicit schedule (strictly descending, below `num_train_timesteps`) instead of N
    /// spaced steps; only the consistency schedulers (LCM, TCD) take one.
    pub timesteps: Option<Vec<usize>>,
    /// CFG scale, finite and ≥ 0; guidance (UNet batch 2·B·n) only when > 1.
    pub guidance_scale: f64,
    /// Images per embedding (n ≥ 1).
    pub num_images_per_prompt: usize,
    /// Explicit initial latents (B·n, 4, h, w) instead of a draw (not for img2img).
    pub latents: Option<Tensor>,
    /// Text2img, img2img, inpaint or ControlNet.
    pub mode: DecoderMode,
    /// Kandinsky 2.1's text conditioning; empty for 2.2.
    pub text: DecoderText,
}

/// What [`DecoderInputs::validate`] derived: the sizes the loop runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderPlan {
    /// Embedding rows B.
    pub batch: usize,
    /// Latent shape (B·n, 4, h, w).
    pub latent_shape: [usize; 4],
    /// Whether classifier-free guidance applies (`guidance_scale > 1`).
    pub cfg: bool,
    /// Steps the loop makes (N, or ⌊N·strength⌋ for img2img).
    pub steps: usize,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ModelError {
    ModelError::invalid(field, message)
}

/// "1" for one row, "1 or B" otherwise.
fn one_or(b: usize) -> String {
    if b > 1 {
        format!("1 or {b}")
    } else {
        "1".into()
    }
}

/// Checks `x` is (rows, rest…) with rows = `b`, or also 1 when `one_ok`.
pub(super) fn check_rows(
    x: &Tensor,
    field: &'static str,
    b: usize,
    one_ok: bool,
    rest: &[usize],
) -> Result<()> {
    let dims = x.dims();
    let rows_ok = dims.first().is_some_and(|&r| r == b || (one_ok && r == 1));
    if dims.len() != rest.len() + 1 || !rows_ok || dims[1..] != *rest {
        let mut want = vec![if one_ok { one_or(b) } else { b.to_string() }];
        want.extend(rest.iter().map(usize::to_string));
        return Err(invalid(
            field,
            format!("shape {dims:?}; expected ({})", want.join(", ")),
        ));
    }
    Ok(())
}

/// Min and max of `x`, or an error naming `field` when a value is NaN or ±inf.
fn finite_range(x: &Tensor, field: &'static str) -> Result<(f32, f32)> {
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.iter().any(|e| !e.is_finite()) {
        return Err(invalid(field, "contains a non-finite value (NaN or ±inf)"));
    }
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok((lo, hi))
}

/// Checks that `x` is finite with values in [0, 1].
fn unit_range(x: &Tensor, field: &'static str, meaning: &str) -> Result<()> {
    let (lo, hi) = finite_range(x, field)?;
    if x.elem_count() > 0 && (lo < 0.0 || hi > 1.0) {
        return Err(invalid(
            field,
            format!("values in [{lo}, {hi}]; allowed: [0, 1]{meaning}"),
        ));
    }
    Ok(())
}

/// A tensor the rules above made required; an error, never a panic, if it is missing.
pub(super) fn required<'a>(t: &'a Option<Tensor>, field: &'static str) -> Result<&'a Tensor> {
    t.as_ref().ok_or_else(|| invalid(field, "required"))
}

impl DecoderInputs {
    /// Checks every input against `unet` and `scheduler` (not stepped, not mutated) and returns
    /// the sizes the loop runs at. [`super::run_decoder`] calls it first; a service may call it
    /// before queueing work.
    pub fn validate(
        &self,
        unet: &UNet2DConditionModel,
        scheduler: &dyn Scheduler,
    ) -> Result<DecoderPlan> {
        let b = self.check_embeds(unet)?;
        self.check_scalars(scheduler)?;
        let n = self.num_images_per_prompt;
        let (lh, lw) = self.latent_size(unet)?;
        let shape = [b * n, 4, lh, lw];
        let cfg = self.guidance_scale > 1.0;
        self.check_text(unet, b, cfg)?;
        if let Some(l) = &self.latents {
            if matches!(self.mode, DecoderMode::Img2Img { .. }) {
                return Err(invalid(
                    "latents",
                    "not allowed with img2img (it starts from the noised image latents)",
                ));
            }
            check_rows(l, "latents", b * n, false, &shape[1..])?;
            finite_range(l, "latents")?;
        }
        let steps = self.check_mode(unet, scheduler, b, lh, lw)?;
        Ok(DecoderPlan {
            batch: b,
            latent_shape: shape,
            cfg,
            steps,
        })
    }

    /// `image_embeds` (B, D) and `negative_image_embeds` (1 or B, D); returns B.
    fn check_embeds(&self, unet: &UNet2DConditionModel) -> Result<usize> {
        let d = unet.embed_dim();
        let dims = self.image_embeds.dims();
        if dims.len() != 2 || dims[1] != d || dims[0] == 0 {
            return Err(invalid(
                "image_embeds",
                format!("shape {dims:?}; expected (B, {d}) with B ≥ 1"),
            ));
        }
        finite_range(&self.image_embeds, "image_embeds")?;
        let b = dims[0];
        match &self.negative_image_embeds {
            Some(neg) => {
                check_rows(neg, "negative_image_embeds", b, true, &[d])?;
                finite_range(neg, "negative_image_embeds")?;
            }
            None if self.guidance_scale > 1.0 => {
                return Err(invalid(
                    "negative_image_embeds",
                    format!("required when guidance_scale > 1: ({}, {d})", one_or(b)),
                ))
            }
            None => {}
        }
        Ok(b)
    }

    fn check_scalars(&self, scheduler: &dyn Scheduler) -> Result<()> {
        let g = self.guidance_scale;
        if !g.is_finite() || g < 0.0 {
            return Err(invalid(
                "guidance_scale",
                format!("{g}; allowed: a finite number ≥ 0 (CFG applies when > 1)"),
            ));
        }
        let steps = self.num_inference_steps;
        if let Some(ts) = &self.timesteps {
            if steps != ts.len() {
                return Err(invalid(
                    "num_inference_steps",
                    format!(
                        "{steps} with an explicit timesteps list of {}; allowed: the list's length",
                        ts.len()
                    ),
                ));
            }
            scheduler.check_custom_timesteps(ts)?;
        } else {
            let (max, name) = scheduler.max_inference_steps();
            if !(1..=max).contains(&steps) {
                return Err(invalid(
                    "num_inference_steps",
                    format!("{steps}; allowed: 1..={max} (the scheduler's {name})"),
                ));
            }
        }
        if self.num_images_per_prompt == 0 {
            return Err(invalid("num_images_per_prompt", "0; allowed: ≥ 1"));
        }
        Ok(())
    }

    /// Latent (h, w) for the requested size, multiples of what the UNet needs.
    fn latent_size(&self, unet: &UNet2DConditionModel) -> Result<(usize, usize)> {
        let (h, w, sf) = (self.height, self.width, self.movq_scale_factor);
        if h == 0 || w == 0 || sf == 0 {
            return Err(invalid(
                "height/width",
                format!("{h}×{w} with MoVQ scale factor {sf}; allowed: ≥ 1 pixel, factor ≥ 1"),
            ));
        }
        let (lh, lw) = (latent_side(h, sf), latent_side(w, sf));
        let m = unet.latent_multiple();
        if lh % m != 0 || lw % m != 0 {
            return Err(invalid(
                "height/width",
                format!(
                    "{h}×{w} gives latents {lh}×{lw}, which the UNet needs to be multiples of {m}"
                ),
            ));
        }
        Ok((lh, lw))
    }

    /// The mode against the UNet (inpaint ⇔ 9-channel UNet, ControlNet ⇔ hint UNet) and its
    /// tensors; returns the number of steps the loop makes.
    fn check_mode(
        &self,
        unet: &UNet2DConditionModel,
        scheduler: &dyn Scheduler,
        b: usize,
        lh: usize,
        lw: usize,
    ) -> Result<usize> {
        self.check_unet_mode(unet, b, lh, lw)?;
        let steps = self.num_inference_steps;
        match &self.mode {
            DecoderMode::Text2Img => Ok(steps),
            DecoderMode::Img2Img {
                image_latents,
                strength,
                hint,
            } => {
                check_rows(image_latents, "image_latents", b, true, &[4, lh, lw])?;
                finite_range(image_latents, "image_latents")?;
                if let Some(hint) = hint {
                    check_rows(hint, "hint", b, true, &[3, 8 * lh, 8 * lw])?;
                    unit_range(hint, "hint", "")?;
                }
                img2img_steps(*strength, steps, unet.takes_text(), scheduler)
            }
            DecoderMode::Inpaint {
                image_latents,
                mask,
            } => {
                check_rows(image_latents, "image_latents", b, true, &[4, lh, lw])?;
                finite_range(image_latents, "image_latents")?;
                check_rows(mask, "mask", b, true, &[1, lh, lw])?;
                unit_range(mask, "mask", " with 1 = keep")?;
                Ok(steps)
            }
            DecoderMode::Controlnet { hint } => {
                check_rows(hint, "hint", b, true, &[3, 8 * lh, 8 * lw])?;
                unit_range(hint, "hint", "")?;
                Ok(steps)
            }
        }
    }

    /// Inpaint ⇔ a 9-channel UNet, ControlNet ⇔ a UNet with a hint embedding.
    fn check_unet_mode(
        &self,
        unet: &UNet2DConditionModel,
        b: usize,
        lh: usize,
        lw: usize,
    ) -> Result<()> {
        let ch = unet.sample_channels();
        let inpaint_unet = ch == 9;
        let is_inpaint = matches!(self.mode, DecoderMode::Inpaint { .. });
        if is_inpaint && !inpaint_unet {
            return Err(invalid(
                "mask",
                format!(
                    "inpainting needs a 9-channel inpaint UNet; this UNet has in_channels {ch}"
                ),
            ));
        }
        if inpaint_unet && !is_inpaint {
            return Err(invalid(
                "mask",
                format!(
                    "required: this UNet is an inpaint UNet (in_channels {ch}); give image_latents and mask"
                ),
            ));
        }
        let is_controlnet = matches!(
            self.mode,
            DecoderMode::Controlnet { .. } | DecoderMode::Img2Img { hint: Some(_), .. }
        );
        if is_controlnet && !unet.takes_hint() {
            return Err(invalid(
                "hint",
                "this UNet is not a ControlNet UNet (no image_hint embedding)",
            ));
        }
        if unet.takes_hint() && !is_controlnet {
            return Err(invalid(
                "hint",
                format!(
                    "required: this is a ControlNet UNet; give a ({}, 3, {}, {}) hint in [0, 1]",
                    one_or(b),
                    8 * lh,
                    8 * lw
                ),
            ));
        }
        Ok(())
    }

    /// 2.1 text conditioning: present exactly for a 2.1 UNet, with matching shapes.
    fn check_text(&self, unet: &UNet2DConditionModel, b: usize, cfg: bool) -> Result<()> {
        let t = &self.text;
        let (Some(h), Some(e)) = (unet.text_hidden_dim(), unet.text_embed_dim()) else {
            if let Some((field, _)) = t.fields().into_iter().find(|(_, x)| x.is_some()) {
                return Err(invalid(
                    field,
                    "Kandinsky 2.1 only; this is a Kandinsky 2.2 UNet (image_embeds only)",
                ));
            }
            return Ok(());
        };
        if t.is_empty() || t.text_embeds.is_none() {
            return Err(invalid(
                "text_embeds",
                format!(
                    "required: this is a Kandinsky 2.1 UNet, conditioned on the multilingual text \
                     encoder's (B, {e}) text_embeds and (B, L, {h}) text_hidden_states"
                ),
            ));
        }
        let len = check_text_pair(
            t.text_embeds.as_ref(),
            t.text_hidden_states.as_ref(),
            b,
            false,
            e,
            h,
            None,
        )?;
        let neg = (
            t.negative_text_embeds.as_ref(),
            t.negative_text_hidden_states.as_ref(),
        );
        if neg.0.is_none() && neg.1.is_none() {
            if cfg {
                return Err(invalid(
                    "negative_text_embeds",
                    format!(
                        "required when guidance_scale > 1: the multilingual encoding of the \
                         negative (or empty) prompt, ({b1}, {e}) and ({b1}, L, {h})",
                        b1 = one_or(b)
                    ),
                ));
            }
            return Ok(());
        }
        check_text_pair(neg.0, neg.1, b, true, e, h, Some(len)).map(|_| ())
    }
}

/// Checks one (text_embeds, text_hidden_states) pair (negative when `one_ok`); returns L.
fn check_text_pair(
    te: Option<&Tensor>,
    hs: Option<&Tensor>,
    b: usize,
    one_ok: bool,
    e: usize,
    h: usize,
    want_len: Option<usize>,
) -> Result<usize> {
    let (te_f, hs_f) = if one_ok {
        ("negative_text_embeds", "negative_text_hidden_states")
    } else {
        ("text_embeds", "text_hidden_states")
    };
    let rows = if one_ok { one_or(b) } else { b.to_string() };
    let te = te.ok_or_else(|| {
        invalid(
            te_f,
            format!("required with text_hidden_states: ({rows}, {e})"),
        )
    })?;
    let hs =
        hs.ok_or_else(|| invalid(hs_f, format!("required with text_embeds: ({rows}, L, {h})")))?;
    check_rows(te, te_f, b, one_ok, &[e])?;
    finite_range(te, te_f)?;
    let hd = hs.dims();
    let len = hd.get(1).copied().unwrap_or(0);
    let len_ok = want_len.map_or((1..=MAX_TEXT_TOKENS).contains(&len), |l| l == len);
    if hd.len() != 3 || hd[2] != h || hd[0] != te.dims()[0] || !len_ok {
        let (r, want) = (
            te.dims()[0],
            match want_len {
                Some(l) => format!("{l}, {h}) like text_hidden_states"),
                None => format!("L, {h}) with L in 1..={MAX_TEXT_TOKENS}"),
            },
        );
        return Err(invalid(
            hs_f,
            format!("shape {hd:?}; expected ({r}, {want}, one row per {te_f} row"),
        ));
    }
    finite_range(hs, hs_f)?;
    Ok(len)
}

/// img2img's `strength` in (0, 1] running at least one of `steps`; returns ⌊steps·strength⌋.
fn img2img_steps(
    strength: f64,
    steps: usize,
    is21: bool,
    scheduler: &dyn Scheduler,
) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(invalid(
            "strength",
            format!("{strength}; allowed: (0, 1] (img2img)"),
        ));
    }
    let init = ((steps as f64 * strength) as usize).min(steps);
    if init == 0 {
        return Err(invalid(
            "strength",
            format!("{strength} × {steps} steps runs no step; allowed: ≥ 1/num_inference_steps"),
        ));
    }
    if is21 {
        img2img21_timestep(scheduler.num_train_timesteps(), strength)?;
    }
    Ok(init)
}
