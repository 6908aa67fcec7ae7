//! Request validation: every field of a `GenerateRequest` is checked and resolved into a
//! [`Plan`] with defaults applied and one seed per image. Errors name the field and the allowed
//! values (INVALID_ARGUMENT).

use kd_proto::v1::{self, fusion_item, generate_request::Task as ProtoTask};
use kd_runtime::model_info::MODEL_NAMES;
use kd_runtime::ServiceError;

/// Server-side bounds on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most images per request.
    pub max_images: u32,
    /// Largest width/height in pixels.
    pub max_side: u32,
    /// Longest prompt in characters.
    pub max_prompt_chars: usize,
    /// Largest encoded input image in bytes.
    pub max_image_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_images: 4,
            max_side: 2048,
            max_prompt_chars: 2048,
            max_image_bytes: 32 << 20,
        }
    }
}

/// One weighted fusion input.
#[derive(Debug, Clone, PartialEq)]
pub enum FusionInput {
    /// A text, sampled through the prior.
    Text(String),
    /// An encoded image, embedded by the CLIP vision tower.
    Image(Vec<u8>),
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    TextToImage,
    ImageToImage {
        image: Vec<u8>,
        strength: f32,
    },
    Inpaint {
        image: Vec<u8>,
        mask: Vec<u8>,
    },
    Outpaint {
        image: Vec<u8>,
        left: u32,
        top: u32,
        right: u32,
        bottom: u32,
    },
    Variation {
        image: Vec<u8>,
    },
    Fusion {
        items: Vec<(FusionInput, f32)>,
    },
}

/// A validated request with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The model the client named (`None` = whatever this gateway serves).
    pub model: Option<String>,
    pub task: Task,
    pub prompt: String,
    /// `None` = no negative prompt (the zero-image negative embedding is used).
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    /// One per image.
    pub seeds: Vec<u64>,
    pub prior_steps: u32,
    pub prior_guidance: f32,
    pub decoder_steps: u32,
    pub decoder_guidance: f32,
    pub scheduler: v1::Scheduler,
    pub format: v1::ImageFormat,
    pub quality: u32,
    pub preview_every: u32,
}

/// Defaults of the public API.
pub const DEFAULT_SIDE: u32 = 512;
pub const DEFAULT_PRIOR_STEPS: u32 = 25;
pub const DEFAULT_DECODER_STEPS: u32 = 50;
pub const DEFAULT_GUIDANCE: f32 = 4.0;
pub const DEFAULT_STRENGTH: f32 = 0.3;
pub const DEFAULT_QUALITY: u32 = 90;
const MAX_STEPS: u32 = 1000;
const MAX_GUIDANCE: f32 = 100.0;

fn bad(field: &str, msg: impl Into<String>) -> ServiceError {
    ServiceError::invalid(field, msg)
}

fn check_text(
    field: &str,
    text: &str,
    limits: &Limits,
    required: bool,
) -> Result<(), ServiceError> {
    if required && text.trim().is_empty() {
        return Err(bad(field, "must not be empty"));
    }
    let n = text.chars().count();
    if n > limits.max_prompt_chars {
        return Err(bad(
            field,
            format!(
                "{n} characters; at most {} allowed",
                limits.max_prompt_chars
            ),
        ));
    }
    Ok(())
}

fn check_image(field: &str, bytes: &[u8], limits: &Limits) -> Result<(), ServiceError> {
    if bytes.is_empty() {
        return Err(bad(field, "must hold an encoded PNG, JPEG or WebP image"));
    }
    if bytes.len() > limits.max_image_bytes {
        return Err(bad(
            field,
            format!(
                "{} bytes; at most {} allowed",
                bytes.len(),
                limits.max_image_bytes
            ),
        ));
    }
    Ok(())
}

fn side(field: &str, v: Option<u32>, limits: &Limits) -> Result<u32, ServiceError> {
    let v = v.unwrap_or(DEFAULT_SIDE);
    if v < 64 || v > limits.max_side || !v.is_multiple_of(64) {
        return Err(bad(
            field,
            format!("{v}; allowed: a multiple of 64 in 64..={}", limits.max_side),
        ));
    }
    Ok(v)
}

fn steps(field: &str, v: Option<u32>, min: u32, default: u32) -> Result<u32, ServiceError> {
    let v = v.unwrap_or(default);
    if !(min..=MAX_STEPS).contains(&v) {
        return Err(bad(field, format!("{v}; allowed: {min}..={MAX_STEPS}")));
    }
    Ok(v)
}

fn guidance(field: &str, v: Option<f32>) -> Result<f32, ServiceError> {
    let v = v.unwrap_or(DEFAULT_GUIDANCE);
    if !v.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&v) {
        return Err(bad(
            field,
            format!(
                "{v}; allowed: a finite number in 0..={MAX_GUIDANCE} (guidance applies when > 1)"
            ),
        ));
    }
    Ok(v)
}

/// Validates `req` and resolves it into a [`Plan`]; `random_seed` supplies seeds the client
/// left unset.
pub fn validate(
    req: &v1::GenerateRequest,
    limits: &Limits,
    mut random_seed: impl FnMut() -> u64,
) -> Result<Plan, ServiceError> {
    let task = match &req.task {
        None | Some(ProtoTask::TextToImage(_)) => Task::TextToImage,
        Some(ProtoTask::ImageToImage(t)) => {
            check_image("image_to_image.image", &t.image, limits)?;
            let strength = t.strength.unwrap_or(DEFAULT_STRENGTH);
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(bad(
                    "image_to_image.strength",
                    format!("{strength}; allowed: (0, 1]"),
                ));
            }
            Task::ImageToImage {
                image: t.image.clone(),
                strength,
            }
        }
        Some(ProtoTask::Inpaint(t)) => {
            check_image("inpaint.image", &t.image, limits)?;
            check_image("inpaint.mask", &t.mask, limits)?;
            Task::Inpaint {
                image: t.image.clone(),
                mask: t.mask.clone(),
            }
        }
        Some(ProtoTask::Outpaint(t)) => {
            check_image("outpaint.image", &t.image, limits)?;
            if t.left + t.top + t.right + t.bottom == 0 {
                return Err(bad(
                    "outpaint",
                    "at least one of left, top, right, bottom must be > 0",
                ));
            }
            for (f, v) in [
                ("outpaint.left", t.left),
                ("outpaint.top", t.top),
                ("outpaint.right", t.right),
                ("outpaint.bottom", t.bottom),
            ] {
                if v > limits.max_side {
                    return Err(bad(f, format!("{v}; allowed: 0..={}", limits.max_side)));
                }
            }
            Task::Outpaint {
                image: t.image.clone(),
                left: t.left,
                top: t.top,
                right: t.right,
                bottom: t.bottom,
            }
        }
        Some(ProtoTask::Variation(t)) => {
            check_image("variation.image", &t.image, limits)?;
            Task::Variation {
                image: t.image.clone(),
            }
        }
        Some(ProtoTask::Fusion(f)) => {
            if f.items.is_empty() {
                return Err(bad("fusion.items", "must hold at least one text or image"));
            }
            if f.items.len() > 16 {
                return Err(bad(
                    "fusion.items",
                    format!("{} items; at most 16 allowed", f.items.len()),
                ));
            }
            let mut items = Vec::with_capacity(f.items.len());
            for (i, it) in f.items.iter().enumerate() {
                if !it.weight.is_finite() {
                    return Err(bad(
                        &format!("fusion.items[{i}].weight"),
                        format!("{}; must be a finite number", it.weight),
                    ));
                }
                let input = match &it.item {
                    Some(fusion_item::Item::Text(t)) => {
                        check_text(&format!("fusion.items[{i}].text"), t, limits, false)?;
                        FusionInput::Text(t.clone())
                    }
                    Some(fusion_item::Item::Image(b)) => {
                        check_image(&format!("fusion.items[{i}].image"), b, limits)?;
                        FusionInput::Image(b.clone())
                    }
                    None => {
                        return Err(bad(&format!("fusion.items[{i}]"), "must set text or image"))
                    }
                };
                items.push((input, it.weight));
            }
            Task::Fusion { items }
        }
    };
    let needs_prompt = matches!(
        task,
        Task::TextToImage
            | Task::ImageToImage { .. }
            | Task::Inpaint { .. }
            | Task::Outpaint { .. }
    );
    check_text("prompt", &req.prompt, limits, needs_prompt)?;
    check_text("negative_prompt", &req.negative_prompt, limits, false)?;

    let width = side("width", req.width, limits)?;
    let height = side("height", req.height, limits)?;
    let n = req.num_images.unwrap_or(1);
    if n == 0 || n > limits.max_images {
        return Err(bad(
            "num_images",
            format!("{n}; allowed: 1..={}", limits.max_images),
        ));
    }
    let seeds = if req.seeds.is_empty() {
        (0..n).map(|_| random_seed()).collect()
    } else if req.seeds.len() == n as usize {
        req.seeds.clone()
    } else {
        return Err(bad(
            "seeds",
            format!(
                "{} seeds for {n} images; give none (random) or exactly one per image",
                req.seeds.len()
            ),
        ));
    };

    let prior = req.prior.unwrap_or_default();
    let decoder = req.decoder.unwrap_or_default();
    // The UnCLIP schedule needs two timesteps at least (diffusers divides by N − 1).
    let prior_steps = steps(
        "prior.num_inference_steps",
        prior.num_inference_steps,
        2,
        DEFAULT_PRIOR_STEPS,
    )?;
    let prior_guidance = guidance("prior.guidance_scale", prior.guidance_scale)?;
    let decoder_steps = steps(
        "decoder.num_inference_steps",
        decoder.num_inference_steps,
        1,
        DEFAULT_DECODER_STEPS,
    )?;
    let decoder_guidance = guidance("decoder.guidance_scale", decoder.guidance_scale)?;
    let scheduler = v1::Scheduler::try_from(decoder.scheduler).map_err(|_| {
        bad("decoder.scheduler", format!("{}; allowed: SCHEDULER_UNSPECIFIED (checkpoint default), SCHEDULER_DDPM, SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP", decoder.scheduler))
    })?;

    let output = req.output.unwrap_or_default();
    let format = match v1::ImageFormat::try_from(output.format) {
        Ok(v1::ImageFormat::Unspecified) | Ok(v1::ImageFormat::Png) => v1::ImageFormat::Png,
        Ok(f) => f,
        Err(_) => {
            return Err(bad(
                "output.format",
                format!(
                    "{}; allowed: IMAGE_FORMAT_PNG, IMAGE_FORMAT_JPEG, IMAGE_FORMAT_WEBP",
                    output.format
                ),
            ))
        }
    };
    let quality = match output.quality {
        0 => DEFAULT_QUALITY,
        q @ 1..=100 => q,
        q => {
            return Err(bad(
                "output.quality",
                format!("{q}; allowed: 1..=100 (0 = default {DEFAULT_QUALITY})"),
            ))
        }
    };
    if req.preview_every > decoder_steps {
        return Err(bad(
            "preview_every",
            format!(
                "{}; allowed: 0 (none) ..= decoder steps ({decoder_steps})",
                req.preview_every
            ),
        ));
    }
    let negative_prompt = (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone());
    let model = match req.model.trim() {
        "" => None,
        m if MODEL_NAMES.contains(&m) => Some(m.to_string()),
        m => {
            return Err(bad(
                "model",
                format!(
                    "{m:?}; allowed: {} (or empty for the default)",
                    MODEL_NAMES.join(", ")
                ),
            ))
        }
    };
    Ok(Plan {
        model,
        task,
        prompt: req.prompt.clone(),
        negative_prompt,
        width,
        height,
        seeds,
        prior_steps,
        prior_guidance,
        decoder_steps,
        decoder_guidance,
        scheduler,
        format,
        quality,
        preview_every: req.preview_every,
    })
}
