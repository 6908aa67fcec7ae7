//! The Kandinsky 2.2 prior pipelines as library functions (diffusers
//! `KandinskyV22PriorPipeline.__call__` / `.interpolate` and `KandinskyV22PriorEmb2EmbPipeline`):
//! prompts → CLIP image embeddings (+ negative image embeddings) for the decoder.
//!
//! A [`PriorStack`] holds the loaded components and is immutable after loading (all methods take
//! `&self`), so a service can share one across threads; the only lazily filled state is the
//! zero-image negative embedding, computed once in a `OnceLock`. All randomness comes from the
//! caller's [`NoiseSource`], drawn in diffusers' order (see `tools/reference/PRIOR.md` §3.1).

use super::transformer::PriorTransformer;
use super::unclip::UnClipScheduler;
use crate::checkpoint::{CheckpointDir, Variant};
use crate::clip::{
    ClipImageProcessor, ClipTextModelWithProjection, ClipTokenizer, ClipVisionModelWithProjection,
};
use crate::config::SchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use std::sync::OnceLock;

/// Sampling options shared by every prior entry point.
#[derive(Debug, Clone)]
pub struct PriorOptions {
    /// Images per prompt (≥ 1).
    pub num_images_per_prompt: usize,
    /// Denoising steps of the UnCLIP schedule (≥ 2).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; CFG is on iff > 1.
    pub guidance_scale: f32,
}

impl Default for PriorOptions {
    /// diffusers' defaults: 1 image, 25 steps, guidance 4.0.
    fn default() -> Self {
        Self {
            num_images_per_prompt: 1,
            num_inference_steps: 25,
            guidance_scale: 4.0,
        }
    }
}

/// A text → image-embedding request (`KandinskyV22PriorPipeline.__call__`).
#[derive(Debug, Clone)]
pub struct PriorRequest {
    /// Prompts (≥ 1).
    pub prompts: Vec<String>,
    /// Optional negative prompts, one per prompt; each is itself sampled by the prior and becomes
    /// the negative image embedding. `None` ⇒ the zero-image embedding.
    pub negative_prompts: Option<Vec<String>>,
    /// Sampling options.
    pub options: PriorOptions,
    /// Explicit initial latents (B_lat, D); `None` ⇒ drawn from the noise source.
    pub latents: Option<Tensor>,
}

/// Pipeline output, each (B·n, D) f32.
#[derive(Debug, Clone)]
pub struct PriorOutput {
    /// The image embeddings for the decoder.
    pub image_embeds: Tensor,
    /// The negative image embeddings for the decoder's CFG.
    pub negative_image_embeds: Tensor,
}

/// One item of a weighted fusion (`interpolate`).
#[derive(Debug, Clone)]
pub enum FusionItem {
    /// A prompt, sampled through the prior.
    Text(String),
    /// An image, preprocessed and encoded by the CLIP vision tower.
    Image(DynamicImage),
    /// Preprocessed `pixel_values` (1, 3, 224, 224).
    PixelValues(Tensor),
}

/// Options of a fusion (`interpolate`).
#[derive(Debug, Clone, Default)]
pub struct FusionOptions {
    /// Sampling options (also used by every internal prior call).
    pub options: PriorOptions,
    /// `negative_prior_prompt`: the negative prompt of every internal prior call.
    pub negative_prior_prompt: Option<String>,
    /// `negative_prompt` (default ""): "" ⇒ zero-image embedding, else the prior sample of it.
    pub negative_prompt: String,
    /// Explicit latents reused by every internal prior call.
    pub latents: Option<Tensor>,
}

/// The starting image of Emb2Emb.
#[derive(Debug, Clone)]
pub enum Emb2EmbImage {
    /// Ready CLIP image embeddings (k, D).
    Embeds(Tensor),
    /// Images to preprocess and encode.
    Images(Vec<DynamicImage>),
    /// Preprocessed `pixel_values` (k, 3, 224, 224).
    PixelValues(Tensor),
}

/// An Emb2Emb request (`KandinskyV22PriorEmb2EmbPipeline.__call__`).
#[derive(Debug, Clone)]
pub struct Emb2EmbRequest {
    /// Prompts (≥ 1).
    pub prompts: Vec<String>,
    /// Optional negative prompts, one per prompt (as [`PriorRequest::negative_prompts`]).
    pub negative_prompts: Option<Vec<String>>,
    /// The image (embedding) to start from.
    pub image: Emb2EmbImage,
    /// How much of the schedule to run, in (0, 1]; `int(N·strength)` steps must be ≥ 1.
    pub strength: f64,
    /// Sampling options.
    pub options: PriorOptions,
}

/// Text conditioning of the prior: CLIP `text_embeds`, `last_hidden_state` and the token mask.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (B, D)
    pub text_embeds: Tensor,
    /// (B, 77, D)
    pub hidden_states: Tensor,
    /// (B, 77) u32 0/1
    pub mask: Tensor,
}

impl TextConditioning {
    fn repeat_interleave(&self, n: usize) -> Result<Self> {
        Ok(Self {
            text_embeds: repeat_interleave(&self.text_embeds, n)?,
            hidden_states: repeat_interleave(&self.hidden_states, n)?,
            mask: repeat_interleave(&self.mask, n)?,
        })
    }

    fn cat(a: &Self, b: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
            hidden_states: Tensor::cat(&[&a.hidden_states, &b.hidden_states], 0)?,
            mask: Tensor::cat(&[&a.mask, &b.mask], 0)?,
        })
    }
}

/// `x.repeat_interleave(n, dim=0)`.
fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    let b = dims[0];
    let mut expanded = vec![b, n];
    expanded.extend_from_slice(&dims[1..]);
    let y = x.unsqueeze(1)?.broadcast_as(expanded)?.contiguous()?;
    dims[0] = b * n;
    Ok(y.reshape(dims)?)
}

/// The loaded prior stack: tokenizer, CLIP text and vision towers, image processor, prior and
/// scheduler.
#[derive(Debug)]
pub struct PriorStack {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModelWithProjection,
    image_encoder: ClipVisionModelWithProjection,
    image_processor: ClipImageProcessor,
    prior: PriorTransformer,
    scheduler: UnClipScheduler,
    device: Device,
    zero_image_embed: OnceLock<Tensor>,
}

/// One denoising run's conditioning and start point.
struct Sampling<'a> {
    cond: &'a TextConditioning,
    latents: Tensor,
    timesteps: &'a [usize],
    guidance: Option<f32>,
}

impl PriorStack {
    /// Loads every component of a `kandinsky-2-2-prior` folder in `dtype` on `device`.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        let vb = |name: &str| -> Result<_> {
            Ok(dir
                .component(name)?
                .weights(Variant::Default)?
                .var_builder(dtype, device))
        };
        let tok_dir = dir.component("tokenizer")?;
        let max_len = tok_dir.tokenizer_config()?.model_max_length;
        let tokenizer = ClipTokenizer::from_dir(dir.root().join("tokenizer"), max_len)?;
        let text_encoder = ClipTextModelWithProjection::new(
            &dir.component("text_encoder")?.clip_text_config()?,
            vb("text_encoder")?,
        )?;
        let image_encoder = ClipVisionModelWithProjection::new(
            &dir.component("image_encoder")?.clip_vision_config()?,
            vb("image_encoder")?,
        )?;
        let image_processor =
            ClipImageProcessor::new(&dir.component("image_processor")?.image_processor_config()?);
        let prior = PriorTransformer::new(&dir.component("prior")?.prior_config()?, vb("prior")?)?;
        let scheduler = match dir.component("scheduler")?.scheduler_config()? {
            SchedulerConfig::UnClip(c) => UnClipScheduler::new(&c)?,
            other => {
                return Err(ModelError::Unsupported {
                    path: dir.root().join("scheduler/scheduler_config.json"),
                    field: "_class_name".into(),
                    value: format!("{other:?}").split('(').next().unwrap_or("?").into(),
                    supported: "UnCLIPScheduler".into(),
                })
            }
        };
        Ok(Self {
            tokenizer,
            text_encoder,
            image_encoder,
            image_processor,
            prior,
            scheduler,
            device: device.clone(),
            zero_image_embed: OnceLock::new(),
        })
    }

    /// Width D of the CLIP image embeddings.
    pub fn embedding_dim(&self) -> usize {
        self.prior.embedding_dim()
    }

    /// The prior transformer.
    pub fn prior(&self) -> &PriorTransformer {
        &self.prior
    }

    /// The UnCLIP scheduler.
    pub fn scheduler(&self) -> &UnClipScheduler {
        &self.scheduler
    }

    /// The CLIP tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The CLIP image processor.
    pub fn image_processor(&self) -> &ClipImageProcessor {
        &self.image_processor
    }

    /// Tokenises and encodes prompts (no attention mask for the text tower, as diffusers).
    pub fn encode_text<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TextConditioning> {
        let tokens = self.tokenizer.encode(prompts)?;
        let out = self
            .text_encoder
            .forward(&tokens.ids_tensor(&self.device)?)?;
        Ok(TextConditioning {
            text_embeds: out.text_embeds.to_dtype(DType::F32)?,
            hidden_states: out.last_hidden_state.to_dtype(DType::F32)?,
            mask: tokens.mask_tensor(&self.device)?,
        })
    }

    /// CLIP image embeddings (k, D) of preprocessed `pixel_values` (k, 3, 224, 224).
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self
            .image_encoder
            .forward(&pixel_values.to_device(&self.device)?)?
            .image_embeds
            .to_dtype(DType::F32)?)
    }

    /// CLIP image embeddings (k, D) of images (preprocessed as `CLIPImageProcessor`).
    pub fn encode_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(ModelError::invalid(
                "images",
                "must hold at least one image",
            ));
        }
        let px = images
            .iter()
            .map(|img| self.image_processor.preprocess(img, &self.device))
            .collect::<Result<Vec<_>>>()?;
        self.encode_pixels(&Tensor::cat(&px, 0)?)
    }

    /// The zero-image embedding (1, D) — the vision tower on raw zeros — computed once.
    pub fn zero_image_embed(&self) -> Result<Tensor> {
        if let Some(z) = self.zero_image_embed.get() {
            return Ok(z.clone());
        }
        let (c, h, w) = self.image_encoder.input_shape();
        let zeros = Tensor::zeros((1, c, h, w), DType::F32, &self.device)?;
        let z = self.encode_pixels(&zeros)?;
        Ok(self.zero_image_embed.get_or_init(|| z).clone())
    }

    fn zero_embeds(&self, rows: usize) -> Result<Tensor> {
        Ok(self.zero_image_embed()?.repeat((rows, 1))?)
    }

    fn check_options(o: &PriorOptions) -> Result<()> {
        if o.num_images_per_prompt == 0 {
            return Err(ModelError::invalid(
                "num_images_per_prompt",
                "0, must be ≥ 1",
            ));
        }
        if !o.guidance_scale.is_finite() {
            return Err(ModelError::invalid(
                "guidance_scale",
                format!("{}, must be a finite number", o.guidance_scale),
            ));
        }
        Ok(())
    }

    /// Prompt list with appended negatives and the conditioning (CFG: `[uncond; cond]`).
    fn conditioning(
        &self,
        prompts: &[String],
        negative_prompts: Option<&[String]>,
        o: &PriorOptions,
    ) -> Result<(usize, TextConditioning)> {
        Self::check_options(o)?;
        if prompts.is_empty() {
            return Err(ModelError::invalid(
                "prompts",
                "must hold at least one prompt",
            ));
        }
        let mut all: Vec<String> = prompts.to_vec();
        let uncond: Vec<String> = match negative_prompts {
            Some(neg) => {
                if neg.len() != prompts.len() {
                    return Err(ModelError::invalid(
                        "negative_prompts",
                        format!(
                            "{} negative prompts for {} prompts; give one per prompt",
                            neg.len(),
                            prompts.len()
                        ),
                    ));
                }
                all.extend_from_slice(neg);
                [neg, neg].concat()
            }
            None => vec![String::new(); all.len()],
        };
        let n = o.num_images_per_prompt;
        let cond = self.encode_text(&all)?.repeat_interleave(n)?;
        let cond = if o.guidance_scale > 1.0 {
            let u = self.encode_text(&uncond)?.repeat_interleave(n)?;
            TextConditioning::cat(&u, &cond)?
        } else {
            cond
        };
        Ok((all.len() * n, cond))
    }

    fn check_latents(&self, latents: &Tensor, rows: usize) -> Result<Tensor> {
        let d = self.embedding_dim();
        if latents.dims() != [rows, d] {
            return Err(ModelError::invalid(
                "latents",
                format!("shape {:?}, expected ({rows}, {d})", latents.dims()),
            ));
        }
        Ok(latents.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// The denoising loop; returns the post-processed latents (B_lat, D).
    fn denoise(&self, s: Sampling<'_>, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let mut latents = s.latents;
        for (i, &t) in s.timesteps.iter().enumerate() {
            let input = match s.guidance {
                Some(_) => Tensor::cat(&[&latents, &latents], 0)?,
                None => latents.clone(),
            };
            let pred = self.prior.forward(
                &input,
                &[t as f32],
                &s.cond.text_embeds,
                &s.cond.hidden_states,
                Some(&s.cond.mask),
            )?;
            let pred = match s.guidance {
                Some(g) => {
                    let b = latents.dim(0)?;
                    let u = pred.narrow(0, 0, b)?;
                    let c = pred.narrow(0, b, b)?;
                    (&u + ((c - &u)? * g as f64)?)?
                }
                None => pred,
            };
            let prev = s.timesteps.get(i + 1).copied();
            latents = self.scheduler.step(&pred, t, &latents, prev, noise)?;
        }
        self.prior.post_process_latents(&latents)
    }

    fn split_output(&self, embeds: Tensor, has_negative: bool) -> Result<PriorOutput> {
        if has_negative {
            let half = embeds.dim(0)? / 2;
            Ok(PriorOutput {
                image_embeds: embeds.narrow(0, 0, half)?,
                negative_image_embeds: embeds.narrow(0, half, half)?,
            })
        } else {
            let rows = embeds.dim(0)?;
            Ok(PriorOutput {
                negative_image_embeds: self.zero_embeds(rows)?,
                image_embeds: embeds,
            })
        }
    }

    /// Text → image embeddings (`KandinskyV22PriorPipeline.__call__`).
    pub fn generate(&self, req: &PriorRequest, noise: &mut dyn NoiseSource) -> Result<PriorOutput> {
        let o = &req.options;
        let (rows, cond) = self.conditioning(&req.prompts, req.negative_prompts.as_deref(), o)?;
        let timesteps = self.scheduler.timesteps(o.num_inference_steps)?;
        let latents = match &req.latents {
            Some(l) => self.check_latents(l, rows)?,
            None => noise.randn(&[rows, self.embedding_dim()], &self.device)?,
        };
        let embeds = self.denoise(
            Sampling {
                cond: &cond,
                latents,
                timesteps: &timesteps,
                guidance: (o.guidance_scale > 1.0).then_some(o.guidance_scale),
            },
            noise,
        )?;
        self.split_output(embeds, req.negative_prompts.is_some())
    }

    /// Weighted fusion of texts and images (`KandinskyV22PriorPipeline.interpolate`):
    /// `image_embeds = Σ wᵢ·embᵢ`. Weights are not normalised (as diffusers).
    pub fn interpolate(
        &self,
        items: &[FusionItem],
        weights: &[f32],
        opts: &FusionOptions,
        noise: &mut dyn NoiseSource,
    ) -> Result<PriorOutput> {
        if items.is_empty() {
            return Err(ModelError::invalid(
                "items",
                "must hold at least one text or image",
            ));
        }
        if items.len() != weights.len() {
            return Err(ModelError::invalid(
                "weights",
                format!(
                    "{} weights for {} items; give exactly one weight per item",
                    weights.len(),
                    items.len()
                ),
            ));
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(ModelError::invalid(
                "weights",
                format!("weights[{i}] = {w}; every weight must be a finite number"),
            ));
        }
        Self::check_options(&opts.options)?;
        let n = opts.options.num_images_per_prompt;
        let call = |prompt: &str, noise: &mut dyn NoiseSource| {
            self.generate(
                &PriorRequest {
                    prompts: vec![prompt.to_string()],
                    negative_prompts: opts.negative_prior_prompt.clone().map(|p| vec![p]),
                    options: opts.options.clone(),
                    latents: opts.latents.clone(),
                },
                noise,
            )
        };
        let mut sum: Option<Tensor> = None;
        for (item, &w) in items.iter().zip(weights) {
            let emb = match item {
                FusionItem::Text(p) => call(p, noise)?.image_embeds,
                FusionItem::Image(img) => self
                    .encode_images(std::slice::from_ref(img))?
                    .repeat((n, 1))?,
                FusionItem::PixelValues(px) => {
                    let e = self.encode_pixels(px)?;
                    if e.dim(0)? != 1 {
                        return Err(ModelError::invalid(
                            "items",
                            format!("pixel_values hold {} images, expected 1", e.dim(0)?),
                        ));
                    }
                    e.repeat((n, 1))?
                }
            };
            let emb = (emb * w as f64)?;
            sum = Some(match sum {
                None => emb,
                Some(s) => (s + emb)?,
            });
        }
        let image_embeds = sum.expect("at least one item");
        let out_zero = call(&opts.negative_prompt, noise)?;
        let negative_image_embeds = if opts.negative_prompt.is_empty() {
            out_zero.negative_image_embeds
        } else {
            out_zero.image_embeds
        };
        Ok(PriorOutput {
            image_embeds,
            negative_image_embeds,
        })
    }

    /// Emb2Emb (`KandinskyV22PriorEmb2EmbPipeline.__call__`): noise the **raw** image embedding to
    /// the first of the last `int(N·strength)` timesteps and denoise from there.
    pub fn emb2emb(
        &self,
        req: &Emb2EmbRequest,
        noise: &mut dyn NoiseSource,
    ) -> Result<PriorOutput> {
        let o = &req.options;
        if !(req.strength > 0.0 && req.strength <= 1.0) {
            return Err(ModelError::invalid(
                "strength",
                format!("{}, allowed (0, 1]", req.strength),
            ));
        }
        let n_steps = o.num_inference_steps;
        let all_timesteps = self.scheduler.timesteps(n_steps)?;
        let init = ((n_steps as f64 * req.strength) as usize).min(n_steps);
        if init == 0 {
            return Err(ModelError::invalid(
                "strength",
                format!(
                    "{} runs int({n_steps}·{}) = 0 of {n_steps} steps; raise strength or num_inference_steps",
                    req.strength, req.strength
                ),
            ));
        }
        let timesteps = &all_timesteps[n_steps - init..];
        let (rows, cond) = self.conditioning(&req.prompts, req.negative_prompts.as_deref(), o)?;
        let d = self.embedding_dim();
        let embeds = match &req.image {
            Emb2EmbImage::Embeds(e) => {
                if e.rank() != 2 || e.dim(1)? != d || e.dim(0)? == 0 {
                    return Err(ModelError::invalid(
                        "image",
                        format!("embedding shape {:?}, expected (k ≥ 1, {d})", e.dims()),
                    ));
                }
                e.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            Emb2EmbImage::Images(imgs) => self.encode_images(imgs)?,
            Emb2EmbImage::PixelValues(px) => self.encode_pixels(px)?,
        };
        let embeds = repeat_interleave(&embeds, o.num_images_per_prompt)?;
        let k = embeds.dim(0)?;
        if k == 0 || !rows.is_multiple_of(k) || rows < k {
            return Err(ModelError::invalid(
                "image",
                format!("{k} image embeddings cannot be tiled to {rows} latent rows"),
            ));
        }
        let init_latents = embeds.repeat((rows / k, 1))?;
        let z = noise.randn(&[rows, d], &self.device)?;
        let latents = self
            .scheduler
            .add_noise(&init_latents, &z, &vec![timesteps[0]; rows])?;
        let out = self.denoise(
            Sampling {
                cond: &cond,
                latents,
                timesteps,
                guidance: (o.guidance_scale > 1.0).then_some(o.guidance_scale),
            },
            noise,
        )?;
        self.split_output(out, req.negative_prompts.is_some())
    }
}
