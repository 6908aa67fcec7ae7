//! The denoiser stage for an aMUSEd folder: the masked-token generator
//! ([`kd_models::amused::TokenGenerator`]) behind the same `Denoiser.Denoise` API. The request's
//! conditioning is the CLIP text tower's `text_embeds` and penultimate `text_hidden_states`;
//! `image_latents` is an init image's token map and `mask` a token-grid mask; the result is the
//! token map (B, h, w) I64, which the movq stage decodes. Progress is streamed per step, with
//! previews of the step's sampled tokens, and a call stops within one transformer layer when it
//! is cancelled or its deadline passes.

use crate::denoise::{send_progress, PREVIEW_MAX_SIDE};
use crate::request::{Limits, MAX_STEPS, MIN_SIDE};
use crate::wire::{broadcast, float, invalid, side};
use candle_core::{DType, Device, Tensor};
use kd_models::amused::{
    MicroConds, TokenConditioning, TokenGenerator, TokenParams, TokenTask, DEFAULT_STEPS,
    DEFAULT_TEMPERATURE,
};
use kd_models::clip::TextConditioning;
use kd_models::noise::SeededNoise;
use kd_models::{CheckpointDir, ModelError};
use kd_proto::from_wire;
use kd_proto::v1::{self, DenoiseEvent};
use kd_runtime::budget::{self, Cost};
use kd_runtime::config::{PixelArgs, StageArgs};
use kd_runtime::model_info::model_info;
use kd_runtime::{Metrics, ServiceError, Sink};
use std::time::Instant;

/// The components whose files make up the revision.
const COMPONENTS: [&str; 3] = ["transformer", "scheduler", "vqvae"];
/// Largest temperature accepted.
const MAX_TEMPERATURE: f32 = 100.0;
/// Largest aesthetic score accepted (the LAION aesthetic scale).
const MAX_AESTHETIC_SCORE: f32 = 10.0;

/// The loaded token generator and what requests are checked against.
pub struct TokenModel {
    pub generator: TokenGenerator,
    pub device: Device,
    pub dtype: DType,
    /// What `Info` returns.
    pub info: v1::ModelInfo,
    /// One CFG step's cost (two transformer rows) per token, calibrated at warm-up, and the
    /// stage's `--admission-safety`.
    pub cost: (Cost, f64),
}

impl std::fmt::Debug for TokenModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenModel")
            .field("info", &self.info)
            .finish()
    }
}

impl TokenModel {
    /// Opens the device, loads the aMUSEd folder `dir` (opened from `args`' model dir): its
    /// transformer and scheduler; runs one step and calibrates the step cost.
    pub fn load_and_warm(
        args: &StageArgs,
        dir: &CheckpointDir,
        pixels: PixelArgs,
    ) -> Result<Self, ServiceError> {
        let device = args.open_device()?;
        let generator = TokenGenerator::load(dir, args.dtype, &device)?;
        let mut info = model_info(dir, "transformer", &COMPONENTS, args.dtype, &device)?;
        info.default_steps = DEFAULT_STEPS as u32;
        info.decoder_kind = v1::DecoderKind::TextToImage as i32;
        info.native_size = generator.native_size().try_into().unwrap_or(u32::MAX);
        info.max_pixels = pixels.limit(&device);
        let mut m = Self {
            generator,
            dtype: args.dtype,
            device,
            info,
            cost: (Cost::default(), args.admission_safety),
        };
        m.step_at(MIN_SIDE as usize)?;
        let tokens = |side: usize| (side / m.generator.scale_factor()).pow(2) as f64;
        let cost = crate::budget::calibrate(tokens, |side| m.step_at(side))?;
        m.cost.0 = cost;
        tracing::info!(
            model_dir = %args.model_dir.display(),
            info = ?m.info,
            step_fixed_ms = cost.fixed_s * 1e3,
            step_per_token_us = cost.per_unit_s * 1e6,
            "denoiser (aMUSEd token generator) ready"
        );
        Ok(m)
    }

    /// One guided step of a text-to-image run at `side`² pixels: how long it took.
    fn step_at(&self, side: usize) -> Result<std::time::Duration, ServiceError> {
        let cfg = self.generator.config();
        let (d, e) = (cfg.cond_embed_dim, cfg.encoder_hidden_size);
        let zeros = || -> Result<TextConditioning, ServiceError> {
            Ok(TextConditioning {
                text_embeds: Tensor::zeros((1, d), DType::F32, &self.device)?,
                hidden_states: Tensor::zeros((1, 77, e), DType::F32, &self.device)?,
                mask: Tensor::ones((1, 77), DType::U32, &self.device)?,
            })
        };
        let text = TokenConditioning {
            cond: zeros()?,
            uncond: Some(zeros()?),
        };
        let task = TokenTask::TextToImage {
            height: side,
            width: side,
        };
        let params = TokenParams {
            steps: 2,
            ..Default::default()
        };
        let mut noise = SeededNoise::new(&[0]);
        let mut run = self.generator.prepare(&text, &task, &params, &mut noise)?;
        budget::time_to_host(|| {
            run.step(&self.generator, &mut noise, &kd_models::interrupt::never)?;
            Ok(run.tokens().to_dtype(DType::F32)?)
        })
    }

    /// Estimated seconds of `plan`.
    fn estimate(&self, plan: &TokenPlan) -> f64 {
        let rows = plan.rows as f64 * if plan.params.guided() { 2.0 } else { 1.0 };
        let sf = self.generator.scale_factor() as f64;
        let tokens = (plan.height as f64 / sf) * (plan.width as f64 / sf);
        plan.steps as f64 * self.cost.0.seconds(tokens * rows / 2.0)
    }
}

/// A checked request.
pub struct TokenPlan {
    text: TokenConditioning,
    task: TokenTask,
    params: TokenParams,
    seeds: Vec<u64>,
    preview_every: usize,
    rows: usize,
    height: usize,
    width: usize,
    /// Steps the run makes (a share of the schedule for image-to-image and inpainting).
    steps: usize,
}

/// Refuses a Kandinsky-only field that is set.
fn refuse_if(set: bool, field: &str, what: &str) -> Result<(), ServiceError> {
    crate::wire::refuse_if(set, field, what, "an aMUSEd (masked-token) model")
}

/// The wire field of a model error's field.
fn on_wire(e: ModelError) -> ServiceError {
    crate::wire::on_wire(e, |field| {
        match field {
            "tokens" => "image_latents",
            "negative_prompt" => "negative_conditioning",
            "temperature" => "masked_tokens.temperature_start",
            "aesthetic_score" => "masked_tokens.aesthetic_score",
            "crop_coord" => "masked_tokens.crop_top",
            f => f,
        }
        .to_string()
    })
}

/// `{name}.text_embeds` (R, D) and `{name}.text_hidden_states` (R, L, E) of the model's widths.
fn text_rows(
    m: &TokenModel,
    limits: &Limits,
    c: &v1::DecoderConditioning,
    name: &str,
) -> Result<TextConditioning, ServiceError> {
    let cfg = m.generator.config();
    let (d, e) = (cfg.cond_embed_dim, cfg.encoder_hidden_size);
    refuse_if(
        c.image_embeds.is_some(),
        &format!("{name}.image_embeds"),
        "image embeddings were sent",
    )?;
    let embeds_field = format!("{name}.text_embeds");
    let te = c.text_embeds.as_ref().ok_or_else(|| {
        invalid(
            &embeds_field,
            format!("required: (B, {d}) pooled CLIP text embeddings"),
        )
    })?;
    let te = float(limits, te, &embeds_field)?;
    let hidden_field = format!("{name}.text_hidden_states");
    let hs = c.text_hidden_states.as_ref().ok_or_else(|| {
        invalid(
            &hidden_field,
            format!("required: (B, L, {e}) penultimate CLIP hidden states"),
        )
    })?;
    let hs = float(limits, hs, &hidden_field)?;
    let rows = match te.dims() {
        &[r, dd] if r > 0 && dd == d => r,
        other => {
            return Err(invalid(
                &embeds_field,
                format!("shape {other:?}; expected (B, {d}) with B ≥ 1"),
            ))
        }
    };
    match hs.dims() {
        &[r, l, ee] if r == rows && (1..=77).contains(&l) && ee == e => {}
        other => {
            return Err(invalid(
                &hidden_field,
                format!("shape {other:?}; expected ({rows}, L, {e}) with L in 1..=77"),
            ))
        }
    }
    let mask = Tensor::ones((rows, hs.dim(1)?), DType::U32, &Device::Cpu)?;
    Ok(TextConditioning {
        text_embeds: te,
        hidden_states: hs,
        mask,
    })
}

fn negative_rows(t: TextConditioning, rows: usize) -> Result<TextConditioning, ServiceError> {
    Ok(TextConditioning {
        text_embeds: broadcast(t.text_embeds, rows, "negative_conditioning.text_embeds")?,
        hidden_states: broadcast(
            t.hidden_states,
            rows,
            "negative_conditioning.text_hidden_states",
        )?,
        mask: broadcast(t.mask, rows, "negative_conditioning.text_hidden_states")?,
    })
}

/// The sampling parameters of `masked_tokens`, range-checked.
fn params(req: &v1::DenoiseRequest, steps: usize) -> Result<TokenParams, ServiceError> {
    let mt = req.masked_tokens.unwrap_or_default();
    let temp = |v: Option<f32>, default: f32, field: &str| match v {
        None => Ok(default),
        Some(t) if t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t) => Ok(t),
        Some(t) => Err(invalid(
            field,
            format!("{t}; allowed: a finite number in 0..={MAX_TEMPERATURE}"),
        )),
    };
    let aesthetic_score = match mt.aesthetic_score {
        None => MicroConds::default().aesthetic_score,
        Some(a) if a.is_finite() && (0.0..=MAX_AESTHETIC_SCORE).contains(&a) => a,
        Some(a) => {
            return Err(invalid(
                "masked_tokens.aesthetic_score",
                format!("{a}; allowed: a finite number in 0..={MAX_AESTHETIC_SCORE}"),
            ))
        }
    };
    let crop = |v: u32, side: u32, field: &str| {
        if v > side {
            return Err(invalid(
                field,
                format!("{v}; allowed: 0..={side} (within the image)"),
            ));
        }
        Ok(v as f32)
    };
    Ok(TokenParams {
        steps,
        guidance_scale: req.guidance_scale,
        temperature: (
            temp(
                mt.temperature_start,
                DEFAULT_TEMPERATURE.0,
                "masked_tokens.temperature_start",
            )?,
            temp(
                mt.temperature_end,
                DEFAULT_TEMPERATURE.1,
                "masked_tokens.temperature_end",
            )?,
        ),
        micro: MicroConds {
            aesthetic_score,
            crop_coord: (
                crop(mt.crop_top, req.height, "masked_tokens.crop_top")?,
                crop(mt.crop_left, req.width, "masked_tokens.crop_left")?,
            ),
        },
    })
}

/// `image_latents` as a token map (1 or B, h, w) of the request's grid, broadcast to B rows.
fn tokens(
    limits: &Limits,
    t: &v1::Tensor,
    rows: usize,
    grid: (usize, usize),
) -> Result<Tensor, ServiceError> {
    let field = "image_latents";
    let x =
        from_wire(t, &Device::Cpu, &limits.tensors).map_err(|e| ServiceError::tensor(field, e))?;
    if x.dtype().is_float() {
        return Err(invalid(
            field,
            format!(
                "dtype {:?}; allowed: an integer token map (I64, U32, U8) from the movq stage",
                x.dtype()
            ),
        ));
    }
    match x.dims() {
        &[_, h, w] if (h, w) == grid => {}
        other => {
            return Err(invalid(
                field,
                format!(
                    "shape {other:?}; expected ({}, {}, {}) (the token grid of height × width)",
                    if rows > 1 {
                        format!("1 or {rows}")
                    } else {
                        "1".into()
                    },
                    grid.0,
                    grid.1
                ),
            ))
        }
    }
    let x = x.to_dtype(DType::I64)?;
    if x.flatten_all()?.min(0)?.to_scalar::<i64>()? < 0 {
        return Err(invalid(field, "negative token ids"));
    }
    broadcast(x.to_dtype(DType::U32)?, rows, field)
}

/// `mask` at token resolution (1 or B, 1, h, w) or (1 or B, h, w), broadcast to B rows.
fn mask(
    limits: &Limits,
    t: &v1::Tensor,
    rows: usize,
    grid: (usize, usize),
) -> Result<Tensor, ServiceError> {
    let m = float(limits, t, "mask")?;
    let m = match m.dims() {
        &[_, 1, h, w] if (h, w) == grid => m.squeeze(1)?,
        &[_, h, w] if (h, w) == grid => m,
        other => {
            return Err(invalid(
                "mask",
                format!(
                    "shape {other:?}; expected (1 or {rows}, 1, {}, {}) at token resolution (the \
                     movq stage's mask of an aMUSEd folder)",
                    grid.0, grid.1
                ),
            ))
        }
    };
    broadcast(m, rows, "mask")
}

/// Decodes and checks a request against the loaded model (before admission).
pub fn plan(
    m: &TokenModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
) -> Result<TokenPlan, ServiceError> {
    kd_runtime::model_info::check_requested_dtype(req.options.as_ref(), m.dtype)?;
    let g = &m.generator;
    let (height, width) = (
        side("height", req.height, g.size_multiple())?,
        side("width", req.width, g.size_multiple())?,
    );
    PixelArgs::check("height", height as u64, width as u64, m.info.max_pixels)?;
    refuse_if(
        req.scheduler != v1::Scheduler::Unspecified as i32,
        "scheduler",
        "a diffusion scheduler was named (allowed: SCHEDULER_UNSPECIFIED, the masked-token \
         scheduler of the folder)",
    )?;
    refuse_if(
        !req.timesteps.is_empty(),
        "timesteps",
        "an explicit schedule was sent",
    )?;
    refuse_if(
        req.latents.is_some(),
        "latents",
        "initial latents were sent",
    )?;
    refuse_if(
        req.hint.is_some() || !req.hint_image.is_empty(),
        "hint",
        "a ControlNet hint was sent",
    )?;
    let steps = match req.num_inference_steps {
        0 => DEFAULT_STEPS,
        n if n <= MAX_STEPS => n as usize,
        n => {
            return Err(invalid(
                "num_inference_steps",
                format!(
                    "{n}; allowed: 1..={MAX_STEPS}, or 0 for the model's default ({DEFAULT_STEPS})"
                ),
            ))
        }
    };
    let params = params(req, steps)?;
    let cond = req.conditioning.as_ref().ok_or_else(|| {
        invalid(
            "conditioning",
            "required: the prompt's text_embeds and text_hidden_states",
        )
    })?;
    let cond = text_rows(m, limits, cond, "conditioning")?;
    let rows = cond.rows()?;
    if rows > limits.max_batch {
        return Err(invalid(
            "conditioning.text_embeds",
            format!("{rows} rows; allowed: 1..={}", limits.max_batch),
        ));
    }
    if req.seeds.len() != rows {
        return Err(invalid(
            "seeds",
            format!(
                "{} seeds for {rows} rows; allowed: exactly one seed per conditioning row",
                req.seeds.len()
            ),
        ));
    }
    let uncond = match (&req.negative_conditioning, params.guided()) {
        (Some(n), true) => Some(negative_rows(
            text_rows(m, limits, n, "negative_conditioning")?,
            rows,
        )?),
        (None, true) => {
            return Err(invalid(
                "negative_conditioning",
                format!(
                    "required with guidance_scale {} > 1: the negative (or empty) prompt's \
                     text_embeds and text_hidden_states",
                    req.guidance_scale
                ),
            ))
        }
        (_, false) => None,
    };
    let grid = (height / g.scale_factor(), width / g.scale_factor());
    let strength = req.strength;
    let task = match (&req.image_latents, &req.mask) {
        (None, None) => {
            refuse_if(
                strength != 0.0,
                "strength",
                "a strength without image_latents (image-to-image) was sent",
            )?;
            TokenTask::TextToImage { height, width }
        }
        (None, Some(_)) => {
            return Err(invalid(
                "image_latents",
                "required with a mask: the init image's token map from the movq stage",
            ))
        }
        (Some(t), None) => TokenTask::ImageToImage {
            tokens: tokens(limits, t, rows, grid)?,
            strength,
        },
        (Some(t), Some(mk)) => TokenTask::Inpaint {
            tokens: tokens(limits, t, rows, grid)?,
            mask: mask(limits, mk, rows, grid)?,
            // Unset = every step, as diffusers' inpainting default strength 1.
            strength: if strength == 0.0 { 1.0 } else { strength },
        },
    };
    let text = TokenConditioning { cond, uncond };
    // Every model rule (strength, codebook, mask, schedule) is checked by preparing the run;
    // image-to-image's draws here come from a throwaway source.
    let run = g
        .prepare(&text, &task, &params, &mut SeededNoise::new(&req.seeds))
        .map_err(on_wire)?;
    Ok(TokenPlan {
        steps: run.total_steps(),
        text,
        task,
        params,
        seeds: req.seeds.clone(),
        preview_every: req.preview_every as usize,
        rows,
        height,
        width,
    })
}

/// DEADLINE_EXCEEDED when `plan` cannot finish before `deadline`.
fn check_budget(
    m: &TokenModel,
    plan: &TokenPlan,
    deadline: Option<Instant>,
) -> Result<(), ServiceError> {
    let work = format!(
        "token generation ({} steps, {} rows, {}×{} pixels)",
        plan.steps, plan.rows, plan.height, plan.width
    );
    budget::check(m.estimate(plan), m.cost.1, deadline, work)
}

/// Every k-th token of each side of `tokens` (B, h, w), k the smallest factor that decodes to
/// at most [`PREVIEW_MAX_SIDE`] pixels on the long side.
pub fn preview_tokens(tokens: &Tensor, scale_factor: usize) -> Result<Tensor, ServiceError> {
    let (_, h, w) = tokens.dims3()?;
    let max_tokens = (PREVIEW_MAX_SIDE / scale_factor.max(1)).max(1);
    let k = h.max(w).div_ceil(max_tokens).max(1);
    let pick = |n: usize| Tensor::arange_step(0u32, n as u32, k as u32, &Device::Cpu);
    let t = tokens.to_device(&Device::Cpu)?;
    Ok(t.index_select(&pick(h)?, 1)?
        .index_select(&pick(w)?, 2)?
        .to_dtype(DType::I64)?)
}

/// Runs one checked request on the calling (blocking-pool) thread; returns the token map.
pub fn generate(
    m: &TokenModel,
    plan: TokenPlan,
    sink: &Sink<DenoiseEvent>,
    metrics: &Metrics,
) -> Result<Tensor, ServiceError> {
    let g = &m.generator;
    let cancel = sink.cancel();
    let mut noise = SeededNoise::new(&plan.seeds);
    let mut run = g
        .prepare(&plan.text, &plan.task, &plan.params, &mut noise)
        .map_err(on_wire)?;
    let total = run.total_steps();
    while !run.done() {
        run.step(g, &mut noise, &|| cancel.should_stop())
            .map_err(|e| cancel.model_error(e))?;
        metrics.steps(1);
        let predicted = run.predicted().unwrap_or(run.tokens());
        send_progress(
            (run.steps_done(), total),
            plan.preview_every,
            &|| preview_tokens(predicted, g.scale_factor()),
            sink,
        )?;
    }
    cancel.check_at(format_args!("after {total} of {total} token steps"))?;
    Ok(run.tokens().to_dtype(DType::I64)?)
}

/// Checks a request against the loaded model and its deadline (before admission).
pub fn check(
    m: &TokenModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
    deadline: Option<Instant>,
) -> Result<TokenPlan, ServiceError> {
    let plan = plan(m, limits, req)?;
    check_budget(m, &plan, deadline)?;
    Ok(plan)
}

/// The tracing span of one token run.
pub fn span(plan: &TokenPlan) -> tracing::Span {
    tracing::info_span!(
        "generate_tokens",
        rows = plan.rows,
        steps = plan.steps,
        height = plan.height,
        width = plan.width,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_decode_to_at_most_256_pixels() {
        for (h, w, sf, want) in [
            (16, 16, 16, (16, 16)),
            (32, 32, 16, (16, 16)),
            (64, 32, 2, (64, 32)),
            (256, 256, 2, (128, 128)),
        ] {
            let t = Tensor::zeros((2, h, w), DType::U32, &Device::Cpu).unwrap();
            let p = preview_tokens(&t, sf).unwrap();
            assert_eq!(p.dims(), &[2, want.0, want.1], "{h}x{w} sf {sf}");
            assert!(want.0.max(want.1) * sf <= PREVIEW_MAX_SIDE);
        }
    }
}
