//! A `DenoiseRequest` into a [`Plan`]: the wire tensors decoded into
//! [`kd_models::decoder::DecoderInputs`], which own every model rule
//! ([`DecoderInputs::validate`]); this module adds only the service's limits, the wire-only
//! fields (seeds, scheduler, options, the pixel mask, the attention mask, which wire fields
//! combine into a mode) and the wire path of each field (`image_embeds` →
//! `conditioning.image_embeds`). Errors name the field and the allowed values.

use crate::model::{DecoderModel, Schedule};
use crate::wire::invalid;
use candle_core::{DType, Tensor};
use kd_models::decoder::{
    latent_side, prepare_inpaint_mask, DecoderInputs, DecoderMode, DecoderText,
};
use kd_models::schedulers::Scheduler;
use kd_models::ModelError;
use kd_proto::{from_wire, v1, TensorLimits};
use kd_runtime::config::PixelArgs;
use kd_runtime::ServiceError;

/// Allowed image sides in pixels: multiples of [`SIZE_MULTIPLE`] in `MIN_SIDE..=MAX_SIDE`.
pub const MIN_SIDE: u32 = 64;
/// Largest image side in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Image sides must be multiples of this.
pub const SIZE_MULTIPLE: u32 = 64;
/// Most denoising steps per request.
pub const MAX_STEPS: u32 = 1000;

/// A validated request, ready to run.
pub struct Plan {
    /// The decoder inputs, validated against the loaded UNet and `scheduler`.
    pub inputs: DecoderInputs,
    /// A fresh scheduler for this request.
    pub scheduler: Box<dyn Scheduler>,
    /// One per row.
    pub seeds: Vec<u64>,
    /// Emit preview latents every N steps (0 = never).
    pub preview_every: usize,
    /// Scheduler steps (as in `inputs`, for logs and deadline errors).
    pub steps: usize,
    /// Pixels (as in `inputs`).
    pub height: usize,
    /// Pixels (as in `inputs`).
    pub width: usize,
    /// CFG scale (as in `inputs`).
    pub guidance_scale: f64,
}

/// Service-side bounds on a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most rows (images) per request.
    pub max_batch: usize,
    /// `--max-pixels` (the default depends on the model's device).
    pub pixels: PixelArgs,
    /// Wire tensor bounds.
    pub tensors: TensorLimits,
}

/// The wire path of a [`DecoderInputs`] field: the conditioning tensors live in
/// `conditioning` / `negative_conditioning`, the rest at the top level.
fn wire_field(field: &str) -> String {
    let cond = ["image_embeds", "text_embeds", "text_hidden_states"];
    match field.strip_prefix("negative_") {
        Some(f) if cond.contains(&f) => format!("negative_conditioning.{f}"),
        _ if cond.contains(&field) => format!("conditioning.{field}"),
        _ => field.to_string(),
    }
}

/// A model error as the service reports it, with the field's wire path.
fn on_wire(e: ModelError) -> ServiceError {
    crate::wire::on_wire(e, wire_field)
}

/// "1" for one row, "1 or B" otherwise.
fn one_or(b: usize) -> String {
    if b > 1 {
        format!("1 or {b}")
    } else {
        "1".into()
    }
}

/// Decodes a wire tensor of a float dtype to f32.
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
    Ok(x.to_dtype(DType::F32)?)
}

/// [`decode`] of an optional field.
fn decode_opt(
    model: &DecoderModel,
    limits: &Limits,
    t: Option<&v1::Tensor>,
    field: &str,
) -> Result<Option<Tensor>, ServiceError> {
    t.map(|t| decode(model, limits, t, field)).transpose()
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

/// Decodes and validates `req` against the loaded `model`.
pub fn plan(
    model: &DecoderModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
) -> Result<Plan, ServiceError> {
    let height = check_side("height", req.height)?;
    let width = check_side("width", req.width)?;
    let max_pixels = limits.pixels.limit(&model.device);
    PixelArgs::check("height", height as u64, width as u64, max_pixels)?;
    let schedule = schedule(model, req)?;
    let scheduler = scheduler(model, req)?;
    kd_runtime::model_info::check_requested_dtype(req.options.as_ref(), model.dtype)?;
    let (inputs, mask_dims) = decode_inputs(model, limits, req, height, width, schedule)?;
    let run = inputs
        .validate(&model.unet, scheduler.as_ref())
        .map_err(on_wire)?;
    if run.batch > limits.max_batch {
        return Err(invalid(
            "conditioning.image_embeds",
            format!("{} rows; allowed: 1..={}", run.batch, limits.max_batch),
        ));
    }
    if let Some(dims) = mask_dims {
        let [_, _, lh, lw] = run.latent_shape;
        check_mask_size(&dims, run.batch, (height, width), (lh, lw))?;
    }
    if req.seeds.len() != run.batch {
        return Err(invalid(
            "seeds",
            format!(
                "{} seeds for {} rows; allowed: exactly one seed per conditioning row",
                req.seeds.len(),
                run.batch
            ),
        ));
    }
    Ok(Plan {
        steps: inputs.num_inference_steps,
        guidance_scale: inputs.guidance_scale,
        inputs,
        scheduler,
        seeds: req.seeds.clone(),
        preview_every: req.preview_every as usize,
        height,
        width,
    })
}

/// The request's scheduler (`scheduler`, checkpoint default when unspecified), with the
/// distilled-student guidance rule (`guidance_scale` ≤ 1).
fn scheduler(
    model: &DecoderModel,
    req: &v1::DenoiseRequest,
) -> Result<Box<dyn Scheduler>, ServiceError> {
    let choice = v1::Scheduler::try_from(req.scheduler).map_err(|_| {
        invalid(
            "scheduler",
            format!(
                "unknown value {}; allowed: SCHEDULER_UNSPECIFIED, SCHEDULER_DDPM, SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP, SCHEDULER_LCM, SCHEDULER_TCD",
                req.scheduler
            ),
        )
    })?;
    if model.distilled && req.guidance_scale > 1.0 {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{}; this checkpoint is a distilled student ({}), which runs without \
                 classifier-free guidance: allowed 0..=1",
                req.guidance_scale, model.scheduler_class
            ),
        ));
    }
    model.scheduler(choice)
}

/// The request's schedule: `num_inference_steps`, or `timesteps`, or (neither) the model's
/// default.
fn schedule(model: &DecoderModel, req: &v1::DenoiseRequest) -> Result<Schedule, ServiceError> {
    let (n, ts) = (req.num_inference_steps, &req.timesteps);
    if n > MAX_STEPS {
        return Err(invalid(
            "num_inference_steps",
            format!("{n}; allowed: 1..={MAX_STEPS}, or 0 for the model's default"),
        ));
    }
    if ts.len() > MAX_STEPS as usize {
        return Err(invalid(
            "timesteps",
            format!("{} timesteps; allowed: 1..={MAX_STEPS}", ts.len()),
        ));
    }
    Ok(match (n, ts.is_empty()) {
        (0, true) => model.default_schedule.clone(),
        (n, true) => Schedule::Steps(n as usize),
        (0, false) => Schedule::Timesteps(ts.iter().map(|&t| t as usize).collect()),
        (n, false) => {
            return Err(invalid(
                "timesteps",
                format!(
                    "{} timesteps with num_inference_steps {n}; allowed: one of them (leave \
                     num_inference_steps 0 with an explicit list)",
                    ts.len()
                ),
            ))
        }
    })
}

/// The wire request as [`DecoderInputs`], plus the pixel mask's shape when one was sent.
fn decode_inputs(
    model: &DecoderModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
    height: usize,
    width: usize,
    schedule: Schedule,
) -> Result<(DecoderInputs, Option<Vec<usize>>), ServiceError> {
    let cond = req.conditioning.as_ref();
    let negative = req.negative_conditioning.as_ref();
    let embeds = cond.and_then(|c| c.image_embeds.as_ref()).ok_or_else(|| {
        invalid(
            "conditioning.image_embeds",
            format!("required: (B, {}) image embeddings", model.unet.embed_dim()),
        )
    })?;
    let image_embeds = decode(model, limits, embeds, "conditioning.image_embeds")?;
    let negative_image_embeds = decode_opt(
        model,
        limits,
        negative.and_then(|c| c.image_embeds.as_ref()),
        "negative_conditioning.image_embeds",
    )?;
    let b = image_embeds.dims().first().copied().unwrap_or(0);
    let (lh, lw) = (
        latent_side(height, model.movq_scale_factor),
        latent_side(width, model.movq_scale_factor),
    );
    let (mode, mask_dims) = decode_mode(model, limits, req, b, (lh, lw))?;
    let inputs = DecoderInputs {
        image_embeds,
        negative_image_embeds,
        height,
        width,
        movq_scale_factor: model.movq_scale_factor,
        num_inference_steps: schedule.steps(),
        timesteps: match schedule {
            Schedule::Steps(_) => None,
            Schedule::Timesteps(ts) => Some(ts),
        },
        guidance_scale: f64::from(req.guidance_scale),
        num_images_per_prompt: 1,
        latents: decode_opt(model, limits, req.latents.as_ref(), "latents")?,
        mode,
        text: decode_text(model, limits, cond, negative)?,
    };
    Ok((inputs, mask_dims))
}

/// Which wire fields make which mode: `mask` (+ `image_latents`) inpaints, `image_latents`
/// alone (+ `strength`) is img2img, `hint` alone is ControlNet, none is text-to-image.
fn decode_mode(
    model: &DecoderModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
    b: usize,
    (lh, lw): (usize, usize),
) -> Result<(DecoderMode, Option<Vec<usize>>), ServiceError> {
    let image_latents = decode_opt(model, limits, req.image_latents.as_ref(), "image_latents")?;
    let strength = f64::from(req.strength);
    let hint = match (&req.hint, req.hint_image.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(
                "hint_image",
                "give either hint (a tensor) or hint_image (an encoded image), not both",
            ))
        }
        (Some(h), true) => Some(decode(model, limits, h, "hint")?),
        (None, false) => Some(hint_from_image(
            &req.hint_image,
            lh * model.movq_scale_factor,
            lw * model.movq_scale_factor,
        )?),
        (None, true) => None,
    };
    match (&req.mask, image_latents, hint) {
        (Some(_), _, Some(_)) => Err(invalid(
            "hint",
            "a hint applies to text-to-image and img2img with a ControlNet UNet, not to inpainting",
        )),
        (Some(_), None, None) => Err(invalid(
            "image_latents",
            format!(
                "required with a mask: the init image's MoVQ latents ({}, 4, {lh}, {lw})",
                one_or(b)
            ),
        )),
        (Some(_), Some(_), None) if strength != 0.0 => Err(invalid(
            "strength",
            format!("{strength}; inpainting runs the whole schedule, allowed: 0 (unset)"),
        )),
        (Some(m), Some(image_latents), None) => {
            let m = decode(model, limits, m, "mask")?;
            let dims = m.dims().to_vec();
            let mask = prepare_inpaint_mask(&m, lh, lw).map_err(on_wire)?;
            let mode = DecoderMode::Inpaint {
                image_latents,
                mask,
            };
            Ok((mode, Some(dims)))
        }
        (None, Some(image_latents), hint) => Ok((
            DecoderMode::Img2Img {
                image_latents,
                strength,
                hint,
            },
            None,
        )),
        (None, None, _) if strength != 0.0 => Err(invalid(
            "strength",
            format!(
                "{strength}; applies only with image_latents (img2img), allowed: 0 (unset) here"
            ),
        )),
        (None, None, Some(hint)) => Ok((DecoderMode::Controlnet { hint }, None)),
        (None, None, None) => Ok((DecoderMode::Text2Img, None)),
    }
}

/// The wire mask is (1 or B, 1, H, W) at pixel resolution, or at latent resolution.
fn check_mask_size(
    md: &[usize],
    b: usize,
    (height, width): (usize, usize),
    (lh, lw): (usize, usize),
) -> Result<(), ServiceError> {
    let pixel = md.len() == 4 && md[2] == height && md[3] == width;
    let latent = md.len() == 4 && md[2] == lh && md[3] == lw;
    if !(pixel || latent) || md[1] != 1 || !(md[0] == 1 || md[0] == b) {
        let rows = one_or(b);
        return Err(invalid(
            "mask",
            format!(
                "shape {md:?}; expected ({rows}, 1, {height}, {width}) at pixel resolution \
                 (or ({rows}, 1, {lh}, {lw}) at latent resolution)"
            ),
        ));
    }
    Ok(())
}

/// `{conditioning,negative_conditioning}.{text_embeds,text_hidden_states}` (Kandinsky 2.1).
/// The attention mask, when sent, must match the hidden states; like diffusers, the UNet does
/// not use it.
fn decode_text(
    model: &DecoderModel,
    limits: &Limits,
    cond: Option<&v1::DecoderConditioning>,
    negative: Option<&v1::DecoderConditioning>,
) -> Result<DecoderText, ServiceError> {
    let read = |c: Option<&v1::DecoderConditioning>, name: &str| {
        let Some(c) = c else {
            return Ok((None, None));
        };
        let te = decode_opt(
            model,
            limits,
            c.text_embeds.as_ref(),
            &format!("{name}.text_embeds"),
        )?;
        let f = format!("{name}.text_hidden_states");
        let hs = decode_opt(model, limits, c.text_hidden_states.as_ref(), &f)?;
        if let Some(m) = &c.text_attention_mask {
            let f = format!("{name}.text_attention_mask");
            check_attention_mask(model, limits, m, hs.as_ref(), &f)?;
        }
        Ok::<_, ServiceError>((te, hs))
    };
    let (text_embeds, text_hidden_states) = read(cond, "conditioning")?;
    let (negative_text_embeds, negative_text_hidden_states) =
        read(negative, "negative_conditioning")?;
    Ok(DecoderText {
        text_embeds,
        text_hidden_states,
        negative_text_embeds,
        negative_text_hidden_states,
    })
}

/// The attention mask must be (rows, L) of the hidden states it came with; without hidden
/// states it is not used (the decoder's rules report missing text conditioning).
fn check_attention_mask(
    model: &DecoderModel,
    limits: &Limits,
    m: &v1::Tensor,
    hs: Option<&Tensor>,
    field: &str,
) -> Result<(), ServiceError> {
    let m = from_wire(m, &model.device, &limits.tensors)
        .map_err(|err| ServiceError::tensor(field, err))?;
    match hs.map(Tensor::dims) {
        Some(&[r, l, _]) if m.dims() != [r, l] => Err(invalid(
            field,
            format!(
                "shape {:?}; expected ({r}, {l}) like text_hidden_states",
                m.dims()
            ),
        )),
        _ => Ok(()),
    }
}

/// An encoded hint image as the ControlNet takes it: resized (bicubic) to `h × w` when its size
/// differs, (1, 3, h, w) f32 RGB / 255.
fn hint_from_image(bytes: &[u8], h: usize, w: usize) -> Result<Tensor, ServiceError> {
    let img = kd_models::image::decode_rgb("hint_image", bytes)?;
    Ok(kd_models::image::preprocess_hint(&img, h, w)?)
}

#[cfg(test)]
mod tests {
    use super::wire_field;

    #[test]
    fn model_fields_map_to_wire_paths() {
        for (model, wire) in [
            ("image_embeds", "conditioning.image_embeds"),
            (
                "negative_image_embeds",
                "negative_conditioning.image_embeds",
            ),
            ("text_embeds", "conditioning.text_embeds"),
            ("text_hidden_states", "conditioning.text_hidden_states"),
            ("negative_text_embeds", "negative_conditioning.text_embeds"),
            (
                "negative_text_hidden_states",
                "negative_conditioning.text_hidden_states",
            ),
            ("latents", "latents"),
            ("strength", "strength"),
            ("mask", "mask"),
        ] {
            assert_eq!(wire_field(model), wire);
        }
    }
}
