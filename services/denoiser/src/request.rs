//! Validation of a `DenoiseRequest` into a [`Plan`]: every wire tensor decoded, every field
//! checked against the loaded checkpoint. Errors name the field and the allowed values.

use crate::model::DecoderModel;
use candle_core::{DType, Tensor};
use kd_models::decoder::{latent_side, prepare_inpaint_mask};
use kd_models::schedulers::Scheduler;
use kd_proto::{from_wire, v1, TensorLimits};
use kd_runtime::ServiceError;

/// Allowed image sides in pixels: multiples of [`SIZE_MULTIPLE`] in `MIN_SIDE..=MAX_SIDE`.
pub const MIN_SIDE: u32 = 64;
/// Largest image side in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Image sides must be multiples of this.
pub const SIZE_MULTIPLE: u32 = 64;
/// Most denoising steps per request.
pub const MAX_STEPS: u32 = 1000;

/// What the loop does besides text-to-image, with its decoded inputs.
pub enum Mode {
    /// Plain text-to-image.
    Text2Img,
    /// Image-to-image from MoVQ latents.
    Img2Img {
        /// (1 or B, 4, h, w).
        image_latents: Tensor,
        /// In (0, 1].
        strength: f64,
    },
    /// Inpainting (9-channel UNet).
    Inpaint {
        /// (1 or B, 4, h, w).
        image_latents: Tensor,
        /// The prepared latent keep-mask (1 or B, 1, h, w).
        mask: Tensor,
    },
    /// ControlNet.
    Controlnet {
        /// (1 or B, 3, 8h, 8w) in [0, 1].
        hint: Tensor,
    },
}

/// A validated request, ready to run.
pub struct Plan {
    /// (B, D).
    pub image_embeds: Tensor,
    /// (B, D) (a 1-row negative is broadcast).
    pub negative_image_embeds: Tensor,
    /// Pixels.
    pub height: usize,
    /// Pixels.
    pub width: usize,
    /// Scheduler steps.
    pub steps: usize,
    /// CFG scale.
    pub guidance_scale: f64,
    /// A fresh scheduler for this request.
    pub scheduler: Box<dyn Scheduler>,
    /// One per row.
    pub seeds: Vec<u64>,
    /// Explicit initial latents (B, 4, h, w).
    pub latents: Option<Tensor>,
    /// The mode and its inputs.
    pub mode: Mode,
    /// Emit preview latents every N steps (0 = never).
    pub preview_every: usize,
    /// Kandinsky 2.1: the multilingual text conditioning (None for 2.2).
    pub text: Option<Text21>,
}

/// Kandinsky 2.1's multilingual text conditioning of a request, decoded and checked (f32).
pub struct Text21 {
    /// (B, cross_attention_dim).
    pub text_embeds: Tensor,
    /// (B, L, encoder_hid_dim).
    pub hidden_states: Tensor,
    /// (1 or B, cross_attention_dim); the positive rows when there is no CFG.
    pub negative_text_embeds: Tensor,
    /// (1 or B, L, encoder_hid_dim).
    pub negative_hidden_states: Tensor,
}

/// Most text tokens accepted per row (XLM-R's position table has 514 entries, 512 usable).
pub const MAX_TEXT_TOKENS: usize = 512;

/// Decodes `{conditioning,negative_conditioning}.{text_embeds,text_hidden_states}` for a 2.1 UNet.
/// The attention mask, when sent, must match the hidden states; like diffusers, the UNet does
/// not use it.
fn text_conditioning(
    model: &DecoderModel,
    limits: &Limits,
    cond: Option<&v1::DecoderConditioning>,
    negative: Option<&v1::DecoderConditioning>,
    b: usize,
    cfg: bool,
) -> Result<Text21, ServiceError> {
    let e = model.unet.text_embed_dim().unwrap_or(0);
    let h = model.unet.text_hidden_dim().unwrap_or(0);
    let read = |c: Option<&v1::DecoderConditioning>,
                name: &str,
                rows_one: bool|
     -> Result<Option<(Tensor, Tensor)>, ServiceError> {
        let Some(c) = c else { return Ok(None) };
        let (Some(te), Some(hs)) = (&c.text_embeds, &c.text_hidden_states) else {
            return match (&c.text_embeds, &c.text_hidden_states) {
                (None, None) => Ok(None),
                (None, _) => Err(invalid(
                    &format!("{name}.text_embeds"),
                    format!("required with text_hidden_states: ({}, {e})", one_or(b)),
                )),
                _ => Err(invalid(
                    &format!("{name}.text_hidden_states"),
                    format!("required with text_embeds: ({}, L, {h})", one_or(b)),
                )),
            };
        };
        let f = format!("{name}.text_embeds");
        let te = decode(model, limits, te, &f)?;
        check_rows(&te, &f, b, rows_one, &[e])?;
        finite_range(&te, &f)?;
        let f = format!("{name}.text_hidden_states");
        let hs = decode(model, limits, hs, &f)?;
        let hd = hs.dims().to_vec();
        if hd.len() != 3
            || hd[2] != h
            || hd[1] == 0
            || hd[1] > MAX_TEXT_TOKENS
            || hd[0] != te.dims()[0]
        {
            return Err(invalid(
                &f,
                format!(
                    "shape {hd:?}; expected ({}, L, {h}) with L in 1..={MAX_TEXT_TOKENS}, one row per text_embeds row",
                    te.dims()[0]
                ),
            ));
        }
        finite_range(&hs, &f)?;
        if let Some(m) = &c.text_attention_mask {
            let f = format!("{name}.text_attention_mask");
            let m = from_wire(m, &model.device, &limits.tensors)
                .map_err(|err| ServiceError::tensor(&f, err))?;
            if m.dims() != [hd[0], hd[1]] {
                return Err(invalid(
                    &f,
                    format!("shape {:?}; expected ({}, {})", m.dims(), hd[0], hd[1]),
                ));
            }
        }
        Ok(Some((te, hs)))
    };
    let (text_embeds, hidden_states) = read(cond, "conditioning", false)?.ok_or_else(|| {
        invalid(
            "conditioning.text_embeds",
            format!(
                "required: this denoiser serves a Kandinsky 2.1 decoder, conditioned on the \
                 multilingual text encoder's (B, {e}) text_embeds and (B, L, {h}) text_hidden_states"
            ),
        )
    })?;
    let (negative_text_embeds, negative_hidden_states) =
        match read(negative, "negative_conditioning", true)? {
            Some((te, hs)) => {
                if hs.dims()[1] != hidden_states.dims()[1] {
                    return Err(invalid(
                        "negative_conditioning.text_hidden_states",
                        format!(
                            "{} tokens; expected {} like conditioning.text_hidden_states",
                            hs.dims()[1],
                            hidden_states.dims()[1]
                        ),
                    ));
                }
                (te, hs)
            }
            None if cfg => {
                return Err(invalid(
                    "negative_conditioning.text_embeds",
                    format!(
                        "required when guidance_scale > 1: the multilingual encoding of the \
                         negative (or empty) prompt, ({}, {e}) and ({}, L, {h})",
                        one_or(b),
                        one_or(b)
                    ),
                ))
            }
            None => (text_embeds.clone(), hidden_states.clone()),
        };
    Ok(Text21 {
        text_embeds,
        hidden_states,
        negative_text_embeds,
        negative_hidden_states,
    })
}

/// Service-side bounds on a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most rows (images) per request.
    pub max_batch: usize,
    /// Wire tensor bounds.
    pub tensors: TensorLimits,
}

fn invalid(field: &str, message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(field, message)
}

fn internal(e: candle_core::Error) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

/// "1" for one row, "1 or B" otherwise.
fn one_or(b: usize) -> String {
    if b > 1 {
        format!("1 or {b}")
    } else {
        "1".into()
    }
}

fn shape_str(dims: &[String]) -> String {
    format!("({})", dims.join(", "))
}

fn decode(
    model: &DecoderModel,
    limits: &Limits,
    t: &v1::Tensor,
    field: &str,
) -> Result<Tensor, ServiceError> {
    let x =
        from_wire(t, &model.device, &limits.tensors).map_err(|e| ServiceError::tensor(field, e))?;
    if !x.dtype().is_float() {
        return Err(invalid(
            field,
            format!("dtype {:?}; allowed: f32, f16, bf16", x.dtype()),
        ));
    }
    x.to_dtype(DType::F32).map_err(internal)
}

/// Min and max of a tensor (f32), or an error naming `field` when it has a non-finite value.
fn finite_range(x: &Tensor, field: &str) -> Result<(f32, f32), ServiceError> {
    let v = x
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(internal)?;
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &e in &v {
        if !e.is_finite() {
            return Err(invalid(field, "contains a non-finite value (NaN or ±inf)"));
        }
        lo = lo.min(e);
        hi = hi.max(e);
    }
    Ok((lo, hi))
}

/// Checks `x` is (1 or B, rest…) (`one_ok`) or (B, rest…).
fn check_rows(
    x: &Tensor,
    field: &str,
    b: usize,
    one_ok: bool,
    rest: &[usize],
) -> Result<(), ServiceError> {
    let dims = x.dims();
    let rows_ok = dims.first().is_some_and(|&r| r == b || (one_ok && r == 1));
    if dims.len() != rest.len() + 1 || !rows_ok || dims[1..] != *rest {
        let rows = if one_ok { one_or(b) } else { b.to_string() };
        let mut want = vec![rows];
        want.extend(rest.iter().map(|d| d.to_string()));
        return Err(invalid(
            field,
            format!("shape {dims:?}; expected {}", shape_str(&want)),
        ));
    }
    Ok(())
}

fn check_side(name: &str, v: u32) -> Result<usize, ServiceError> {
    if !(MIN_SIDE..=MAX_SIDE).contains(&v) || !v.is_multiple_of(SIZE_MULTIPLE) {
        return Err(invalid(
            name,
            format!("{v}; allowed: a multiple of {SIZE_MULTIPLE} in {MIN_SIDE}..={MAX_SIDE}"),
        ));
    }
    Ok(v as usize)
}

/// Validates `req` against the loaded `model` and decodes its tensors.
pub fn plan(
    model: &DecoderModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
) -> Result<Plan, ServiceError> {
    let d = model.unet.embed_dim();
    // Conditioning.
    let cond = req.conditioning.as_ref();
    let embeds_wire = cond.and_then(|c| c.image_embeds.as_ref()).ok_or_else(|| {
        invalid(
            "conditioning.image_embeds",
            format!("required: (B, {d}) image embeddings"),
        )
    })?;
    let image_embeds = decode(model, limits, embeds_wire, "conditioning.image_embeds")?;
    let dims = image_embeds.dims().to_vec();
    if dims.len() != 2 || dims[1] != d || dims[0] == 0 || dims[0] > limits.max_batch {
        return Err(invalid(
            "conditioning.image_embeds",
            format!(
                "shape {dims:?}; expected (B, {d}) with B in 1..={}",
                limits.max_batch
            ),
        ));
    }
    finite_range(&image_embeds, "conditioning.image_embeds")?;
    let b = dims[0];
    if !model.unet.takes_text() {
        for (name, c) in [
            ("conditioning", cond),
            ("negative_conditioning", req.negative_conditioning.as_ref()),
        ] {
            if let Some(c) = c {
                for (field, t) in [
                    ("text_embeds", &c.text_embeds),
                    ("text_hidden_states", &c.text_hidden_states),
                    ("text_attention_mask", &c.text_attention_mask),
                ] {
                    if t.is_some() {
                        return Err(invalid(
                            &format!("{name}.{field}"),
                            "Kandinsky 2.1 only; this denoiser serves a Kandinsky 2.2 decoder (image_embeds only)",
                        ));
                    }
                }
            }
        }
    }

    // Scalars.
    let height = check_side("height", req.height)?;
    let width = check_side("width", req.width)?;
    if !(1..=MAX_STEPS).contains(&req.num_inference_steps) {
        return Err(invalid(
            "num_inference_steps",
            format!("{}; allowed: 1..={MAX_STEPS}", req.num_inference_steps),
        ));
    }
    let steps = req.num_inference_steps as usize;
    let guidance_scale = f64::from(req.guidance_scale);
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{}; allowed: a finite number ≥ 0 (CFG applies when > 1)",
                req.guidance_scale
            ),
        ));
    }
    if req.seeds.len() != b {
        return Err(invalid(
            "seeds",
            format!(
                "{} seeds for {b} rows; allowed: exactly one seed per conditioning row",
                req.seeds.len()
            ),
        ));
    }
    let choice = v1::Scheduler::try_from(req.scheduler).map_err(|_| {
        invalid(
            "scheduler",
            format!(
                "unknown value {}; allowed: SCHEDULER_UNSPECIFIED, SCHEDULER_DDPM, SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP",
                req.scheduler
            ),
        )
    })?;
    let scheduler = model.scheduler(choice)?;
    if steps > scheduler.num_train_timesteps() {
        return Err(invalid(
            "num_inference_steps",
            format!(
                "{steps}; allowed: 1..={} (the scheduler's num_train_timesteps)",
                scheduler.num_train_timesteps()
            ),
        ));
    }
    kd_runtime::model_info::check_requested_dtype(req.options.as_ref(), model.dtype)?;

    // Negative conditioning: 1 row (broadcast) or B rows; optional without CFG.
    let negative_image_embeds = match req
        .negative_conditioning
        .as_ref()
        .and_then(|c| c.image_embeds.as_ref())
    {
        Some(t) => {
            let field = "negative_conditioning.image_embeds";
            let n = decode(model, limits, t, field)?;
            check_rows(&n, field, b, true, &[d])?;
            finite_range(&n, field)?;
            if n.dim(0).map_err(internal)? == 1 && b > 1 {
                n.repeat((b, 1)).map_err(internal)?
            } else {
                n
            }
        }
        None if guidance_scale > 1.0 => {
            return Err(invalid(
                "negative_conditioning.image_embeds",
                format!("required when guidance_scale > 1: ({}, {d})", one_or(b)),
            ))
        }
        None => image_embeds.clone(),
    };

    let text = if model.unet.takes_text() {
        let negative = req.negative_conditioning.as_ref();
        Some(text_conditioning(
            model,
            limits,
            cond,
            negative,
            b,
            guidance_scale > 1.0,
        )?)
    } else {
        None
    };

    // Latent-space inputs.
    let sf = model.movq_scale_factor;
    let (lh, lw) = (latent_side(height, sf), latent_side(width, sf));
    let latents = match &req.latents {
        Some(t) => {
            let x = decode(model, limits, t, "latents")?;
            check_rows(&x, "latents", b, false, &[4, lh, lw])?;
            finite_range(&x, "latents")?;
            Some(x)
        }
        None => None,
    };
    let image_latents = match &req.image_latents {
        Some(t) => {
            let x = decode(model, limits, t, "image_latents")?;
            check_rows(&x, "image_latents", b, true, &[4, lh, lw])?;
            finite_range(&x, "image_latents")?;
            Some(x)
        }
        None => None,
    };
    let strength = f64::from(req.strength);
    let inpaint_unet = model.is_inpaint();
    let mode = match (&req.mask, image_latents) {
        (Some(mask), image_latents) => {
            if !inpaint_unet {
                return Err(invalid(
                    "mask",
                    format!(
                        "inpainting needs a 9-channel inpaint UNet; this checkpoint's UNet has in_channels {}",
                        model.in_channels
                    ),
                ));
            }
            let image_latents = image_latents.ok_or_else(|| {
                invalid(
                    "image_latents",
                    format!(
                        "required with a mask: the init image's MoVQ latents ({}, 4, {lh}, {lw})",
                        one_or(b)
                    ),
                )
            })?;
            if strength != 0.0 {
                return Err(invalid(
                    "strength",
                    format!("{strength}; inpainting runs the whole schedule, allowed: 0 (unset)"),
                ));
            }
            let m = decode(model, limits, mask, "mask")?;
            let md = m.dims().to_vec();
            let pixel = md.len() == 4 && md[2] == height && md[3] == width;
            let latent = md.len() == 4 && md[2] == lh && md[3] == lw;
            if !(pixel || latent) || md[1] != 1 || !(md[0] == 1 || md[0] == b) {
                let rows = one_or(b);
                return Err(invalid(
                    "mask",
                    format!("shape {md:?}; expected ({rows}, 1, {height}, {width}) at pixel resolution (or ({rows}, 1, {lh}, {lw}) at latent resolution)"),
                ));
            }
            let (lo, hi) = finite_range(&m, "mask")?;
            if lo < 0.0 || hi > 1.0 {
                return Err(invalid(
                    "mask",
                    format!("values in [{lo}, {hi}]; allowed: [0, 1] with 1 = repaint, 0 = keep"),
                ));
            }
            let mask = prepare_inpaint_mask(&m, lh, lw)?;
            Mode::Inpaint {
                image_latents,
                mask,
            }
        }
        (None, Some(image_latents)) => {
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(invalid(
                    "strength",
                    format!("{strength}; allowed with image_latents and no mask: (0, 1]"),
                ));
            }
            if (steps as f64 * strength) < 1.0 {
                return Err(invalid(
                    "strength",
                    format!(
                        "{strength} × {steps} steps runs no step; allowed: ≥ 1/num_inference_steps"
                    ),
                ));
            }
            if latents.is_some() {
                return Err(invalid(
                    "latents",
                    "not allowed with image_latents (img2img starts from the noised image latents)",
                ));
            }
            if req.hint.is_some() {
                return Err(invalid(
                    "hint",
                    "ControlNet image-to-image is not served; send hint without image_latents",
                ));
            }
            Mode::Img2Img {
                image_latents,
                strength,
            }
        }
        (None, None) => {
            if strength != 0.0 {
                return Err(invalid(
                    "strength",
                    format!("{strength}; applies only with image_latents (img2img), allowed: 0 (unset) here"),
                ));
            }
            match &req.hint {
                Some(h) => {
                    if !model.unet.takes_hint() {
                        return Err(invalid(
                            "hint",
                            "this checkpoint's UNet is not a ControlNet UNet (no image_hint embedding)",
                        ));
                    }
                    let x = decode(model, limits, h, "hint")?;
                    check_rows(&x, "hint", b, true, &[3, 8 * lh, 8 * lw])?;
                    let (lo, hi) = finite_range(&x, "hint")?;
                    if lo < 0.0 || hi > 1.0 {
                        return Err(invalid(
                            "hint",
                            format!("values in [{lo}, {hi}]; allowed: [0, 1]"),
                        ));
                    }
                    Mode::Controlnet { hint: x }
                }
                None => Mode::Text2Img,
            }
        }
    };
    if inpaint_unet && !matches!(mode, Mode::Inpaint { .. }) {
        return Err(invalid(
            "mask",
            format!(
                "required: this checkpoint's UNet is an inpaint UNet (in_channels {}); send image_latents and mask",
                model.in_channels
            ),
        ));
    }
    if model.unet.takes_hint() && !matches!(mode, Mode::Controlnet { .. }) {
        return Err(invalid(
            "hint",
            format!("required: this checkpoint's UNet is a ControlNet UNet; send a ({b}, 3, {}, {}) hint in [0, 1]", 8 * lh, 8 * lw),
        ));
    }
    if req.hint.is_some() && !matches!(mode, Mode::Controlnet { .. }) {
        return Err(invalid(
            "hint",
            "a hint applies only to text-to-image with a ControlNet UNet",
        ));
    }
    Ok(Plan {
        image_embeds,
        negative_image_embeds,
        height,
        width,
        steps,
        guidance_scale,
        scheduler,
        seeds: req.seeds.clone(),
        latents,
        mode,
        preview_every: req.preview_every as usize,
        text,
    })
}
