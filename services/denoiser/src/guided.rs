//! The denoiser stage for a Kandinsky 2.0 folder: the official guided sampling
//! ([`kd_models::kd20::Kd20Denoiser`]: classifier-free guidance on the doubled batch, the
//! p / DDIM / PLMS samplers, dynamic thresholding) behind the same `Denoiser.Denoise` API.
//!
//! The request's conditioning is the first text encoder's pooled projection (`text_embeds`) and
//! hidden states (`text_hidden_states`) and the second's (`text_hidden_states_2`); the
//! negative conditioning (the empty prompt, as the official pipeline, or the client's negative
//! prompt) is always required, because the official pipeline always guides. `image_latents` is
//! the autoencoder's scaled posterior sample of an init image (image-to-image with `strength`;
//! with `mask`, inpainting on the inpainting checkpoint). Schedulers: `SCHEDULER_UNSPECIFIED` and
//! `SCHEDULER_DDIM` = the official DDIM sampler, `SCHEDULER_DDPM` = the p-sampler,
//! `SCHEDULER_PLMS`. The result is the latents (B, 4, h, w) in the UNet's scaled space, which
//! the movq stage (the KL autoencoder for this family) decodes.

use crate::denoise::{preview_latents, send_progress};
use crate::request::{Limits, MAX_STEPS, MIN_SIDE};
use crate::wire::{broadcast, float, invalid, side};
use candle_core::{DType, Device, Tensor};
use kd_models::kd20::{Kd20Denoiser, Kd20Sampling, Kd20Step, Kd20Task, Kd20Text};
use kd_models::noise::SeededNoise;
use kd_models::schedulers::guided::SamplerKind;
use kd_models::{CheckpointDir, ModelError};
use kd_proto::v1::{self, DenoiseEvent};
use kd_runtime::budget::{self, Cost};
use kd_runtime::config::{PixelArgs, StageArgs};
use kd_runtime::model_info::model_info;
use kd_runtime::{Metrics, ServiceError, Sink};
use std::time::Instant;

/// The folder's own files (the `.pt` checkpoints and sidecars) make up the revision.
const COMPONENTS: [&str; 1] = ["."];
/// The official `generate_text2img` default.
pub const DEFAULT_STEPS: usize = 100;
/// The UNet's latents are `⌈side / 64⌉ · 8` (the official `get_new_h_w`); sides are multiples of
/// 64, so no crop is needed after decoding.
const LATENT_PER_64: usize = 8;
/// Largest guidance scale accepted (the gateway's bound).
const MAX_GUIDANCE: f32 = 100.0;
/// What refusals call this model.
const SERVED: &str = "a Kandinsky 2.0 model";

/// The loaded Kandinsky 2.0 UNet and what requests are checked against.
pub struct GuidedModel {
    pub denoiser: Kd20Denoiser,
    pub device: Device,
    pub dtype: DType,
    /// What `Info` returns.
    pub info: v1::ModelInfo,
    /// One guided step's cost (two UNet rows) per latent pixel, calibrated at warm-up, and the
    /// stage's `--admission-safety`.
    pub cost: (Cost, f64),
}

impl std::fmt::Debug for GuidedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuidedModel")
            .field("info", &self.info)
            .finish()
    }
}

impl GuidedModel {
    /// Opens the device, loads the folder's UNet (`Kandinsky-2-0.pt`, else
    /// `Kandinsky-2-0-inpainting.pt`), runs one step and calibrates the step cost.
    pub fn load_and_warm(
        args: &StageArgs,
        dir: &CheckpointDir,
        pixels: PixelArgs,
    ) -> Result<Self, ServiceError> {
        let device = args.open_device()?;
        let denoiser = Kd20Denoiser::load(dir.root(), args.dtype, &device).map_err(|e| {
            ServiceError::Unavailable(format!("loading {}: {e}", args.model_dir.display()))
        })?;
        let mut info = model_info(dir, "unet", &COMPONENTS, args.dtype, &device)?;
        info.default_steps = DEFAULT_STEPS as u32;
        info.decoder_kind = if denoiser.is_inpaint() {
            v1::DecoderKind::Inpaint
        } else {
            v1::DecoderKind::TextToImage
        } as i32;
        info.max_pixels = pixels.limit(&device);
        let mut m = Self {
            denoiser,
            dtype: args.dtype,
            device,
            info,
            cost: (Cost::default(), args.admission_safety),
        };
        m.step_at(MIN_SIDE as usize)?;
        let cost =
            crate::budget::calibrate(|side| latent_pixels(side, side), |side| m.step_at(side))?;
        m.cost.0 = cost;
        tracing::info!(
            model_dir = %args.model_dir.display(),
            info = ?m.info,
            step_fixed_ms = cost.fixed_s * 1e3,
            step_per_latent_pixel_us = cost.per_unit_s * 1e6,
            "denoiser (Kandinsky 2.0) ready"
        );
        Ok(m)
    }

    /// One guided DDIM step of one image at `side`² pixels: how long it took.
    fn step_at(&self, side: usize) -> Result<std::time::Duration, ServiceError> {
        let cfg = self.denoiser.unet().config();
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &self.device);
        let text = Kd20Text {
            full1: zeros(&[2, 77, cfg.text_encoder_in_dim1])?,
            pooled1: zeros(&[2, cfg.text_encoder_in_dim2])?,
            full2: zeros(&[2, 77, cfg.text_encoder2_dim])?,
        };
        let l = side / 64 * LATENT_PER_64;
        let task = if self.denoiser.is_inpaint() {
            let c = self.denoiser.latent_channels();
            Kd20Task::Inpaint {
                latents: zeros(&[1, c, l, l])?,
                keep_mask: Tensor::ones((1, 1, l, l), DType::F32, &self.device)?,
            }
        } else {
            Kd20Task::TextToImage {
                latent_height: l,
                latent_width: l,
            }
        };
        let params = Kd20Sampling::new(SamplerKind::Ddim, 1, 7.0);
        let mut noise = SeededNoise::new(&[0]);
        budget::time_to_host(|| {
            Ok(self.denoiser.sample(
                &text,
                &task,
                &params,
                &mut noise,
                &mut |_| Ok(()),
                &kd_models::interrupt::never,
            )?)
        })
    }

    /// Estimated seconds of `plan`: its steps, each two UNet rows per image.
    fn estimate(&self, plan: &GuidedPlan) -> f64 {
        let px = latent_pixels(plan.height, plan.width);
        plan.total as f64 * self.cost.0.seconds(px * plan.rows as f64)
    }
}

/// Latent pixels of an image (the calibration unit: one image's two guided rows).
fn latent_pixels(height: usize, width: usize) -> f64 {
    ((height / 64 * LATENT_PER_64) * (width / 64 * LATENT_PER_64)) as f64
}

/// A checked request.
pub struct GuidedPlan {
    pub text: Kd20Text,
    pub task: Kd20Task,
    pub params: Kd20Sampling,
    pub seeds: Vec<u64>,
    pub preview_every: usize,
    /// Images (B); the UNet runs on 2B rows.
    pub rows: usize,
    /// Sampler steps that run.
    pub total: usize,
    pub height: usize,
    pub width: usize,
}

/// Refuses a field this family does not take.
fn refuse_if(set: bool, field: &str, what: &str) -> Result<(), ServiceError> {
    crate::wire::refuse_if(set, field, what, SERVED)
}

/// The wire field of a model error's field.
fn on_wire(e: ModelError) -> ServiceError {
    crate::wire::on_wire(e, |field| {
        match field {
            "num_steps" | "timestep_respacing" => "num_inference_steps",
            "init_step" => "strength",
            "keep_mask" | "img_mask" => "mask",
            "latents" | "init_latents" => "image_latents",
            f => f,
        }
        .to_string()
    })
}

/// The official sampler a request's scheduler names.
fn sampler(s: i32) -> Result<SamplerKind, ServiceError> {
    match v1::Scheduler::try_from(s) {
        Ok(v1::Scheduler::Unspecified | v1::Scheduler::Ddim) => Ok(SamplerKind::Ddim),
        Ok(v1::Scheduler::Ddpm) => Ok(SamplerKind::P),
        Ok(v1::Scheduler::Plms) => Ok(SamplerKind::Plms),
        _ => Err(invalid(
            "scheduler",
            format!(
                "{}; allowed for Kandinsky 2.0: SCHEDULER_UNSPECIFIED or SCHEDULER_DDIM (the \
                 official DDIM sampler), SCHEDULER_DDPM (the p-sampler), SCHEDULER_PLMS",
                v1::Scheduler::try_from(s)
                    .map(|s| s.as_str_name().to_string())
                    .unwrap_or_else(|_| s.to_string())
            ),
        )),
    }
}

/// One side of the text conditioning, `(R, L, width)` or `(R, width)`; `None` = unset.
fn text_tensor(
    limits: &Limits,
    t: Option<&v1::Tensor>,
    field: &str,
    shape: &str,
) -> Result<Tensor, ServiceError> {
    let t = t.ok_or_else(|| invalid(field, format!("required: {shape}")))?;
    float(limits, t, field)
}

/// `{name}`'s three tensors checked against the UNet's widths; rows R ≥ 1.
fn text_rows(
    m: &GuidedModel,
    limits: &Limits,
    c: &v1::DecoderConditioning,
    name: &str,
) -> Result<[Tensor; 3], ServiceError> {
    let cfg = m.denoiser.unet().config();
    let (h1, d1, h2) = (
        cfg.text_encoder_in_dim1,
        cfg.text_encoder_in_dim2,
        cfg.text_encoder2_dim,
    );
    refuse_if(
        c.image_embeds.is_some(),
        &format!("{name}.image_embeds"),
        "image embeddings were sent",
    )?;
    refuse_if(
        c.text_attention_mask.is_some(),
        &format!("{name}.text_attention_mask"),
        "an attention mask was sent (the UNet attends to every token, as upstream)",
    )?;
    let f = |s: &str| format!("{name}.{s}");
    let pooled = text_tensor(
        limits,
        c.text_embeds.as_ref(),
        &f("text_embeds"),
        &format!("(B, {d1}) the first text encoder's pooled projection"),
    )?;
    let full1 = text_tensor(
        limits,
        c.text_hidden_states.as_ref(),
        &f("text_hidden_states"),
        &format!("(B, 77, {h1}) the first text encoder's hidden states"),
    )?;
    let full2 = text_tensor(
        limits,
        c.text_hidden_states_2.as_ref(),
        &f("text_hidden_states_2"),
        &format!("(B, 77, {h2}) the second text encoder's (mT5) hidden states"),
    )?;
    let rows = match pooled.dims() {
        &[r, d] if r > 0 && d == d1 => r,
        other => {
            return Err(invalid(
                &f("text_embeds"),
                format!("shape {other:?}; expected (B, {d1}) with B ≥ 1"),
            ))
        }
    };
    for (t, field, width) in [
        (&full1, "text_hidden_states", h1),
        (&full2, "text_hidden_states_2", h2),
    ] {
        if t.dims() != [rows, 77, width] {
            return Err(invalid(
                &f(field),
                format!("shape {:?}; expected ({rows}, 77, {width})", t.dims()),
            ));
        }
    }
    Ok([pooled, full1, full2])
}

/// `image_latents` (1 or B, C, h, w) at the request's latent size, broadcast to B rows.
fn init_latents(
    m: &GuidedModel,
    limits: &Limits,
    t: &v1::Tensor,
    rows: usize,
    latent: (usize, usize),
) -> Result<Tensor, ServiceError> {
    let x = float(limits, t, "image_latents")?;
    let c = m.denoiser.latent_channels();
    match x.dims() {
        &[_, cc, h, w] if cc == c && (h, w) == latent => broadcast(x, rows, "image_latents"),
        other => Err(invalid(
            "image_latents",
            format!(
                "shape {other:?}; expected (1 or {rows}, {c}, {}, {}): the movq stage's latents of \
                 the init image at height × width",
                latent.0, latent.1
            ),
        )),
    }
}

/// `mask` (1 or B, 1, H, W) at pixel or latent resolution, 1 = repaint, as the keep mask the
/// official pipeline takes (1 − mask), broadcast to B rows.
fn keep_mask(
    limits: &Limits,
    t: &v1::Tensor,
    rows: usize,
    (height, width): (usize, usize),
    latent: (usize, usize),
) -> Result<Tensor, ServiceError> {
    let m = float(limits, t, "mask")?;
    match m.dims() {
        &[_, 1, h, w] if (h, w) == (height, width) || (h, w) == latent => {}
        other => {
            return Err(invalid(
                "mask",
                format!(
                    "shape {other:?}; expected (1 or {rows}, 1, H, W) at pixel ({height}×{width}) \
                     or latent ({}×{}) resolution",
                    latent.0, latent.1
                ),
            ))
        }
    }
    broadcast(m.affine(-1.0, 1.0)?, rows, "mask")
}

/// Decodes and checks a request against the loaded model (before admission).
pub fn plan(
    m: &GuidedModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
) -> Result<GuidedPlan, ServiceError> {
    kd_runtime::model_info::check_requested_dtype(req.options.as_ref(), m.dtype)?;
    let (height, width) = (
        side("height", req.height, 64)?,
        side("width", req.width, 64)?,
    );
    PixelArgs::check("height", height as u64, width as u64, m.info.max_pixels)?;
    let sampler = sampler(req.scheduler)?;
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
    refuse_if(
        req.masked_tokens.is_some(),
        "masked_tokens",
        "masked-token parameters were sent",
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
    let g = req.guidance_scale;
    if !(g.is_finite() && (0.0..=MAX_GUIDANCE).contains(&g)) {
        return Err(invalid(
            "guidance_scale",
            format!("{g}; allowed: a finite number in 0..={MAX_GUIDANCE}"),
        ));
    }
    let cond = req.conditioning.as_ref().ok_or_else(|| {
        invalid(
            "conditioning",
            "required: the prompt's text_embeds, text_hidden_states and text_hidden_states_2",
        )
    })?;
    let [pooled, full1, full2] = text_rows(m, limits, cond, "conditioning")?;
    let rows = pooled.dim(0)?;
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
    let neg = req.negative_conditioning.as_ref().ok_or_else(|| {
        invalid(
            "negative_conditioning",
            "required: Kandinsky 2.0 always samples with classifier-free guidance; send the \
             empty (or negative) prompt's text_embeds, text_hidden_states and \
             text_hidden_states_2",
        )
    })?;
    let [npooled, nfull1, nfull2] = text_rows(m, limits, neg, "negative_conditioning")?;
    let nb = |t: Tensor, f: &str| broadcast(t, rows, &format!("negative_conditioning.{f}"));
    let (npooled, nfull1, nfull2) = (
        nb(npooled, "text_embeds")?,
        nb(nfull1, "text_hidden_states")?,
        nb(nfull2, "text_hidden_states_2")?,
    );
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
    let dev = &m.device;
    let text = Kd20Text {
        full1: cat(&full1, &nfull1)?.to_device(dev)?,
        pooled1: cat(&pooled, &npooled)?.to_device(dev)?,
        full2: cat(&full2, &nfull2)?.to_device(dev)?,
    };
    let latent = (height / 64 * LATENT_PER_64, width / 64 * LATENT_PER_64);
    let inpaint_model = m.denoiser.is_inpaint();
    let task = match (&req.image_latents, &req.mask) {
        (None, None) => {
            refuse_if(
                req.strength != 0.0,
                "strength",
                "a strength without image_latents (image-to-image) was sent",
            )?;
            if inpaint_model {
                return Err(invalid(
                    "mask",
                    "required: this denoiser serves the Kandinsky 2.0 inpainting model (send \
                     image_latents and a mask; text-to-image and image-to-image are served by \
                     the text-to-image model)",
                ));
            }
            Kd20Task::TextToImage {
                latent_height: latent.0,
                latent_width: latent.1,
            }
        }
        (None, Some(_)) => {
            return Err(invalid(
                "image_latents",
                "required with a mask: the init image's latents from the movq stage",
            ))
        }
        (Some(t), None) => {
            if inpaint_model {
                return Err(invalid(
                    "mask",
                    "required: this denoiser serves the Kandinsky 2.0 inpainting model, which \
                     takes image_latents with a mask (image-to-image is served by the \
                     text-to-image model)",
                ));
            }
            Kd20Task::ImageToImage {
                latents: init_latents(m, limits, t, rows, latent)?.to_device(dev)?,
                strength: f64::from(req.strength),
            }
        }
        (Some(t), Some(mk)) => {
            if !inpaint_model {
                return Err(invalid(
                    "mask",
                    "an inpainting mask was sent; this denoiser serves the Kandinsky 2.0 \
                     text-to-image model (inpainting needs the inpainting checkpoint)",
                ));
            }
            refuse_if(
                req.strength != 0.0,
                "strength",
                "a strength with a mask was sent (the official inpainting runs every step)",
            )?;
            Kd20Task::Inpaint {
                latents: init_latents(m, limits, t, rows, latent)?.to_device(dev)?,
                keep_mask: keep_mask(limits, mk, rows, (height, width), latent)?.to_device(dev)?,
            }
        }
    };
    let params = Kd20Sampling::new(sampler, steps, f64::from(g));
    let total = m.denoiser.total_steps(&params, &task).map_err(on_wire)?;
    Ok(GuidedPlan {
        text,
        task,
        params,
        seeds: req.seeds.clone(),
        preview_every: req.preview_every as usize,
        rows,
        total,
        height,
        width,
    })
}

/// Checks a request against the loaded model and its deadline (before admission).
pub fn check(
    m: &GuidedModel,
    limits: &Limits,
    req: &v1::DenoiseRequest,
    deadline: Option<Instant>,
) -> Result<GuidedPlan, ServiceError> {
    let plan = plan(m, limits, req)?;
    let work = format!(
        "Kandinsky 2.0 sampling ({} {} steps, {} rows, {}×{} pixels)",
        plan.total,
        plan.params.sampler.name(),
        plan.rows,
        plan.height,
        plan.width
    );
    budget::check(m.estimate(&plan), m.cost.1, deadline, work)?;
    Ok(plan)
}

/// Runs one checked request on the calling (blocking-pool) thread; returns the latents.
pub fn generate(
    m: &GuidedModel,
    plan: GuidedPlan,
    sink: &Sink<DenoiseEvent>,
    metrics: &Metrics,
) -> Result<Tensor, ServiceError> {
    let cancel = sink.cancel();
    let mut noise = SeededNoise::new(&plan.seeds);
    // The observer's own error (the caller went away, a preview failed) is kept here: the
    // sampler only sees that it must stop.
    let mut stopped: Option<ServiceError> = None;
    let mut observer = |s: Kd20Step<'_>| -> kd_models::Result<()> {
        metrics.steps(1);
        let preview = || preview_latents(s.pred_x0, 64 / LATENT_PER_64);
        send_progress((s.done, s.total), plan.preview_every, &preview, sink).map_err(|e| {
            stopped = Some(e);
            ModelError::Interrupted {
                piece: "a sampler step",
            }
        })
    };
    let out = m.denoiser.sample(
        &plan.text,
        &plan.task,
        &plan.params,
        &mut noise,
        &mut observer,
        &|| cancel.should_stop(),
    );
    match (out, stopped) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(cancel.model_error(e)),
        (Ok(latents), None) => {
            let total = plan.total;
            cancel.check_at(format_args!("after {total} of {total} denoising steps"))?;
            Ok(latents.to_dtype(DType::F32)?)
        }
    }
}

/// The tracing span of one run.
pub fn span(plan: &GuidedPlan) -> tracing::Span {
    tracing::info_span!(
        "denoise_kd20",
        rows = plan.rows,
        steps = plan.total,
        sampler = plan.params.sampler.name(),
        height = plan.height,
        width = plan.width,
    )
}
