//! Request validation: every field of a `GenerateRequest` is checked and resolved into a
//! [`Plan`] with defaults applied and one seed per image. Errors name the field and the allowed
//! values (INVALID_ARGUMENT).

use crate::models::is_unclip;
use crate::sampling::{check_crop, family_label, DecoderProfile, Requested, Sampling};
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
    /// Largest request message in bytes: the gateway's transport limit (`--max-message-bytes`),
    /// which every input image together must fit in.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_images: 4,
            max_side: 2048,
            max_prompt_chars: 2048,
            max_image_bytes: 32 << 20,
            max_request_bytes: 64 << 20,
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
    TextToImage {
        /// A ControlNet depth hint (encoded image).
        hint: Option<Vec<u8>>,
    },
    ImageToImage {
        image: Vec<u8>,
        strength: f32,
        /// A ControlNet depth hint (encoded image).
        hint: Option<Vec<u8>>,
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
    /// `None` = no negative prompt (the zero-image negative embedding is used; aMUSEd and
    /// Kandinsky 2.0 are guided by the empty prompt instead).
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    /// One per image.
    pub seeds: Vec<u64>,
    /// The sampling fields as the client set them.
    pub requested: Requested,
    /// Those fields resolved for a teacher; [`Plan::for_model`] resolves them for the model
    /// that serves the request.
    pub sampling: Sampling,
    pub format: v1::ImageFormat,
    pub quality: u32,
    pub preview_every: u32,
}

/// Defaults of the public API.
pub const DEFAULT_SIDE: u32 = 512;
pub const DEFAULT_STRENGTH: f32 = 0.3;
pub const DEFAULT_QUALITY: u32 = 90;

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
    let max = limits.max_image_bytes.min(limits.max_request_bytes);
    if bytes.len() > max {
        return Err(bad(
            field,
            format!("{} bytes; at most {max} allowed", bytes.len()),
        ));
    }
    Ok(())
}

/// A side of the output: a multiple of 64 for every family. Kandinsky 2.0 relies on it: its
/// latents are `ceil(side / 64) · 8` and the official pipeline crops the decoded image to the
/// side, so a multiple of 64 needs no crop (its denoiser and movq may assume it).
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

/// Validates `req` and resolves it into a [`Plan`]; `random_seed` supplies seeds the client
/// left unset.
pub fn validate(
    req: &v1::GenerateRequest,
    limits: &Limits,
    random_seed: impl FnMut() -> u64,
) -> Result<Plan, ServiceError> {
    let task = task(req.task.as_ref(), limits)?;
    check_input_bytes(&task, limits)?;
    let needs_prompt = matches!(
        task,
        Task::TextToImage { .. }
            | Task::ImageToImage { .. }
            | Task::Inpaint { .. }
            | Task::Outpaint { .. }
    );
    check_text("prompt", &req.prompt, limits, needs_prompt)?;
    check_text("negative_prompt", &req.negative_prompt, limits, false)?;
    let width = side("width", req.width, limits)?;
    let height = side("height", req.height, limits)?;
    if let Task::Outpaint {
        left,
        top,
        right,
        bottom,
        ..
    } = &task
    {
        outpaint_inner(("outpaint.left", width, *left, *right))?;
        outpaint_inner(("outpaint.top", height, *top, *bottom))?;
    }
    let seeds = seeds(req, limits, random_seed)?;
    let requested = Requested::of(req)?;
    check_crop(requested.masked_tokens.as_ref(), width, height)?;
    let (format, quality) = output(req.output.unwrap_or_default())?;
    // Explicit steps bound the previews now; preset steps once the model is known.
    let explicit = match requested.decoder_timesteps.len() {
        0 => requested.decoder_steps,
        n => u32::try_from(n).ok(),
    };
    if let Some(steps) = explicit {
        check_preview_every(req.preview_every, steps)?;
    }
    let sampling = requested.resolve(&DecoderProfile::teacher())?;
    Ok(Plan {
        model: model(&req.model)?,
        task,
        prompt: req.prompt.clone(),
        negative_prompt: (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone()),
        width,
        height,
        seeds,
        requested,
        sampling,
        format,
        quality,
        preview_every: req.preview_every,
    })
}

/// The task, one function per kind (no task = text-to-image).
fn task(task: Option<&ProtoTask>, limits: &Limits) -> Result<Task, ServiceError> {
    match task {
        None => Ok(Task::TextToImage { hint: None }),
        Some(ProtoTask::TextToImage(t)) => Ok(Task::TextToImage {
            hint: hint("text_to_image.hint", &t.hint, limits)?,
        }),
        Some(ProtoTask::ImageToImage(t)) => image_to_image(t, limits),
        Some(ProtoTask::Inpaint(t)) => inpaint(t, limits),
        Some(ProtoTask::Outpaint(t)) => outpaint(t, limits),
        Some(ProtoTask::Variation(t)) => variation(t, limits),
        Some(ProtoTask::Fusion(f)) => fusion(f, limits),
    }
}

/// An optional hint image (empty = none).
fn hint(field: &str, bytes: &[u8], limits: &Limits) -> Result<Option<Vec<u8>>, ServiceError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    check_image(field, bytes, limits)?;
    Ok(Some(bytes.to_vec()))
}

fn image_to_image(t: &v1::ImageToImage, limits: &Limits) -> Result<Task, ServiceError> {
    check_image("image_to_image.image", &t.image, limits)?;
    let strength = t.strength.unwrap_or(DEFAULT_STRENGTH);
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(bad(
            "image_to_image.strength",
            format!("{strength}; allowed: (0, 1]"),
        ));
    }
    Ok(Task::ImageToImage {
        image: t.image.clone(),
        strength,
        hint: hint("image_to_image.hint", &t.hint, limits)?,
    })
}

fn inpaint(t: &v1::Inpaint, limits: &Limits) -> Result<Task, ServiceError> {
    check_image("inpaint.image", &t.image, limits)?;
    check_image("inpaint.mask", &t.mask, limits)?;
    Ok(Task::Inpaint {
        image: t.image.clone(),
        mask: t.mask.clone(),
    })
}

/// Each margin is bounded on its own (so no sum of margins can overflow), and their sum with
/// the largest side is computed checked.
fn outpaint(t: &v1::Outpaint, limits: &Limits) -> Result<Task, ServiceError> {
    check_image("outpaint.image", &t.image, limits)?;
    let margins = [
        ("outpaint.left", t.left),
        ("outpaint.top", t.top),
        ("outpaint.right", t.right),
        ("outpaint.bottom", t.bottom),
    ];
    for (f, v) in margins {
        if v > limits.max_side {
            return Err(bad(f, format!("{v}; allowed: 0..={}", limits.max_side)));
        }
    }
    for (pair, a, b) in [
        ("left + right", t.left, t.right),
        ("top + bottom", t.top, t.bottom),
    ] {
        let fits = a.checked_add(b).is_some_and(|sum| sum <= limits.max_side);
        if !fits {
            return Err(bad(
                "outpaint",
                format!(
                    "{pair} = {a} + {b}; the margins of one axis may add up to at most {}",
                    limits.max_side
                ),
            ));
        }
    }
    if margins.iter().all(|(_, v)| *v == 0) {
        return Err(bad(
            "outpaint",
            "at least one of left, top, right, bottom must be > 0",
        ));
    }
    Ok(Task::Outpaint {
        image: t.image.clone(),
        left: t.left,
        top: t.top,
        right: t.right,
        bottom: t.bottom,
    })
}

fn variation(t: &v1::Variation, limits: &Limits) -> Result<Task, ServiceError> {
    check_image("variation.image", &t.image, limits)?;
    Ok(Task::Variation {
        image: t.image.clone(),
    })
}

/// Most fusion inputs.
pub const MAX_FUSION_ITEMS: usize = 16;

fn fusion(f: &v1::Fusion, limits: &Limits) -> Result<Task, ServiceError> {
    if f.items.is_empty() {
        return Err(bad("fusion.items", "must hold at least one text or image"));
    }
    if f.items.len() > MAX_FUSION_ITEMS {
        return Err(bad(
            "fusion.items",
            format!(
                "{} items; at most {MAX_FUSION_ITEMS} allowed",
                f.items.len()
            ),
        ));
    }
    let items = f
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| fusion_item(i, it, limits))
        .collect::<Result<_, _>>()?;
    Ok(Task::Fusion { items })
}

fn fusion_item(
    i: usize,
    it: &v1::FusionItem,
    limits: &Limits,
) -> Result<(FusionInput, f32), ServiceError> {
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
        None => return Err(bad(&format!("fusion.items[{i}]"), "must set text or image")),
    };
    Ok((input, it.weight))
}

/// All input images (and the mask) together fit in the request limit, summed checked.
fn check_input_bytes(task: &Task, limits: &Limits) -> Result<(), ServiceError> {
    let sizes: Vec<usize> = match task {
        Task::TextToImage { hint } => hint.iter().map(Vec::len).collect(),
        Task::ImageToImage { image, hint, .. } => std::iter::once(image.len())
            .chain(hint.iter().map(Vec::len))
            .collect(),
        Task::Outpaint { image, .. } | Task::Variation { image } => vec![image.len()],
        Task::Inpaint { image, mask } => vec![image.len(), mask.len()],
        Task::Fusion { items } => items
            .iter()
            .map(|(it, _)| match it {
                FusionInput::Image(b) => b.len(),
                FusionInput::Text(_) => 0,
            })
            .collect(),
    };
    let total = sizes.iter().try_fold(0usize, |acc, n| acc.checked_add(*n));
    match total {
        Some(t) if t <= limits.max_request_bytes => Ok(()),
        _ => Err(bad(
            "task",
            format!(
                "the input images hold more than the gateway's request limit of {} bytes \
                 (--max-message-bytes)",
                limits.max_request_bytes
            ),
        )),
    }
}

/// One seed per image: the client's, or random ones.
fn seeds(
    req: &v1::GenerateRequest,
    limits: &Limits,
    mut random_seed: impl FnMut() -> u64,
) -> Result<Vec<u64>, ServiceError> {
    let n = req.num_images.unwrap_or(1);
    if n == 0 || n > limits.max_images {
        return Err(bad(
            "num_images",
            format!("{n}; allowed: 1..={}", limits.max_images),
        ));
    }
    if req.seeds.is_empty() {
        return Ok((0..n).map(|_| random_seed()).collect());
    }
    if usize::try_from(n).is_ok_and(|n| n == req.seeds.len()) {
        return Ok(req.seeds.clone());
    }
    Err(bad(
        "seeds",
        format!(
            "{} seeds for {n} images; give none (random) or exactly one per image",
            req.seeds.len()
        ),
    ))
}

/// `preview_every` in 0 (none) ..= the decoder's steps.
fn check_preview_every(every: u32, steps: u32) -> Result<(), ServiceError> {
    if every > steps {
        return Err(bad(
            "preview_every",
            format!("{every}; allowed: 0 (none) ..= decoder steps ({steps})"),
        ));
    }
    Ok(())
}

/// Smallest inner rectangle of an outpainting canvas, per side (the MoVQ stage's
/// `OUTPAINT_MIN_INNER`).
pub const OUTPAINT_MIN_INNER: u32 = 64;

/// The kept image of an outpainting canvas: `side − a − b` ≥ [`OUTPAINT_MIN_INNER`], checked.
fn outpaint_inner((field, side, a, b): (&str, u32, u32, u32)) -> Result<(), ServiceError> {
    let inner = a.checked_add(b).and_then(|m| side.checked_sub(m));
    match inner {
        Some(v) if v >= OUTPAINT_MIN_INNER => Ok(()),
        _ => Err(bad(
            field,
            format!(
                "margins {a} + {b} leave less than {OUTPAINT_MIN_INNER} pixels of the \
                 {side}-pixel canvas for the image; allowed: margins summing to at most {}",
                side.saturating_sub(OUTPAINT_MIN_INNER)
            ),
        )),
    }
}

impl Task {
    /// The task's kind (`ModelDescription.tasks`).
    pub fn kind(&self) -> v1::TaskKind {
        match self {
            Task::TextToImage { .. } => v1::TaskKind::TextToImage,
            Task::ImageToImage { .. } => v1::TaskKind::ImageToImage,
            Task::Inpaint { .. } => v1::TaskKind::Inpaint,
            Task::Outpaint { .. } => v1::TaskKind::Outpaint,
            Task::Variation { .. } => v1::TaskKind::Variation,
            Task::Fusion { .. } => v1::TaskKind::Fusion,
        }
    }

    /// The task's ControlNet hint, if it carries one.
    pub fn hint(&self) -> Option<&Vec<u8>> {
        match self {
            Task::TextToImage { hint } | Task::ImageToImage { hint, .. } => hint.as_ref(),
            _ => None,
        }
    }

    /// Whether the task carries a ControlNet hint.
    pub fn has_hint(&self) -> bool {
        self.hint().is_some()
    }

    /// The request field of the task's hint.
    fn hint_field(&self) -> &'static str {
        match self {
            Task::ImageToImage { .. } => "image_to_image.hint",
            _ => "text_to_image.hint",
        }
    }
}

impl Plan {
    /// Refuses, before any stage runs, the options the family of the model that serves the
    /// plan lacks, naming the field and the family (see [`Requested::check_family`]; aMUSEd
    /// and Kandinsky 2.0 take no ControlNet hint either).
    pub fn check_family(&self, profile: &DecoderProfile) -> Result<(), ServiceError> {
        self.requested.check_family(profile)?;
        if !is_unclip(profile.family) && self.task.has_hint() {
            return Err(bad(
                self.task.hint_field(),
                format!(
                    "set; {} models take no ControlNet hint; allowed: empty",
                    family_label(profile.family)
                ),
            ));
        }
        Ok(())
    }

    /// This plan with its sampling resolved for the model that serves it (a distilled student
    /// gets its own schedule and no CFG by default), and checked against what that model's
    /// denoiser reports: its largest image, and image-to-image's steps.
    pub fn for_model(&self, profile: &DecoderProfile) -> Result<Plan, ServiceError> {
        self.check_family(profile)?;
        let sampling = self.requested.resolve(profile)?;
        check_preview_every(self.preview_every, sampling.decoder_steps)?;
        let pixels = u64::from(self.width) * u64::from(self.height);
        if profile.max_pixels > 0 && pixels > profile.max_pixels {
            return Err(bad(
                "width",
                format!(
                    "{}×{} = {pixels} pixels; this model's denoiser allows width × height ≤ {} \
                     (its --max-pixels)",
                    self.width, self.height, profile.max_pixels
                ),
            ));
        }
        if let Task::ImageToImage { strength, .. } = &self.task {
            // The denoiser runs the last floor(steps × strength) steps, as diffusers.
            let runs = (f64::from(sampling.decoder_steps) * f64::from(*strength)).floor();
            if runs < 1.0 {
                return Err(bad(
                    "image_to_image.strength",
                    format!(
                        "{strength} × {} decoder steps runs no step; allowed: strength ≥ 1 / \
                         decoder steps ({:.4})",
                        sampling.decoder_steps,
                        1.0 / f64::from(sampling.decoder_steps.max(1))
                    ),
                ));
            }
        }
        Ok(Plan {
            sampling,
            ..self.clone()
        })
    }
}

/// The output format and quality, defaults resolved.
fn output(output: v1::OutputOptions) -> Result<(v1::ImageFormat, u32), ServiceError> {
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
    Ok((format, quality))
}

/// The named model (`None` = the default), one of the public names.
fn model(name: &str) -> Result<Option<String>, ServiceError> {
    match name.trim() {
        "" => Ok(None),
        m if MODEL_NAMES.contains(&m) => Ok(Some(m.to_string())),
        m => Err(bad(
            "model",
            format!(
                "{m:?}; allowed: {} (or empty for the default)",
                MODEL_NAMES.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amused() -> DecoderProfile {
        DecoderProfile {
            family: v1::ModelFamily::Amused,
            default_steps: 12,
            ..DecoderProfile::teacher()
        }
    }

    fn request(task: Option<ProtoTask>) -> v1::GenerateRequest {
        v1::GenerateRequest {
            prompt: "a cat".into(),
            width: Some(128),
            height: Some(64),
            task,
            ..Default::default()
        }
    }

    fn plan(req: &v1::GenerateRequest) -> Result<Plan, ServiceError> {
        validate(req, &Limits::default(), || 7)
    }

    #[test]
    fn amused_refuses_hints_naming_the_field_and_the_family() {
        let hinted = [
            (
                ProtoTask::TextToImage(v1::TextToImage { hint: vec![1] }),
                "text_to_image.hint",
            ),
            (
                ProtoTask::ImageToImage(v1::ImageToImage {
                    image: vec![1],
                    strength: None,
                    hint: vec![1],
                }),
                "image_to_image.hint",
            ),
        ];
        for (task, field) in hinted {
            let p = plan(&request(Some(task))).unwrap();
            let e = p.for_model(&amused()).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "invalid `{field}`: set; aMUSEd models take no ControlNet hint; allowed: empty"
                )
            );
            assert_eq!(p.check_family(&amused()).unwrap_err().to_string(), e);
        }
    }

    #[test]
    fn an_amused_plan_gets_its_presets_and_keeps_its_masked_tokens() {
        let mut req = request(Some(ProtoTask::Inpaint(v1::Inpaint {
            image: vec![1],
            mask: vec![2],
        })));
        let params = v1::MaskedTokenParams {
            temperature_start: Some(3.0),
            crop_top: 64,
            crop_left: 128,
            ..Default::default()
        };
        req.decoder = Some(v1::DecoderParams {
            masked_tokens: Some(params),
            ..Default::default()
        });
        let p = plan(&req).unwrap().for_model(&amused()).unwrap();
        assert_eq!(
            (p.sampling.decoder_steps, p.sampling.decoder_guidance),
            (12, 10.0)
        );
        assert_eq!(p.requested.masked_tokens, Some(params));
        // The same request on a Kandinsky model names the field.
        let e = plan(&req)
            .unwrap()
            .for_model(&DecoderProfile::teacher())
            .unwrap_err();
        assert!(
            e.to_string().starts_with("invalid `decoder.masked_tokens`"),
            "{e}"
        );
        // Crop coordinates beyond the image are refused at validation.
        req.decoder.as_mut().unwrap().masked_tokens = Some(v1::MaskedTokenParams {
            crop_top: 65,
            ..Default::default()
        });
        let e = plan(&req).unwrap_err().to_string();
        assert!(e.contains("decoder.masked_tokens.crop_top"), "{e}");
    }
}
