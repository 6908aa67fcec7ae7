//! The Kandinsky 2.2 prior pipelines as library functions (diffusers
//! `KandinskyV22PriorPipeline.__call__` / `.interpolate` and `KandinskyV22PriorEmb2EmbPipeline`):
//! prompts → CLIP image embeddings (+ negative image embeddings) for the decoder.
//!
//! A [`PriorStack`] composes the two halves a deployment may load separately — the prompt encoder
//! ([`ClipTextEncoder`]) and the sampler with the vision tower ([`ImagePrior`]) — and is immutable
//! after loading (all methods take `&self`), so a service can share one across threads. It is the
//! prior half of the in-process [`crate::pipeline::Text2Image`] (the reference the end-to-end
//! tests compare the services with); the prior service, which takes conditioning from the wire,
//! uses the [`ImagePrior`] half directly. All
//! randomness comes from the caller's [`NoiseSource`], drawn in diffusers' order (see
//! `tools/reference/PRIOR.md` §3.1).

use super::fusion;
use super::image_prior::{ImagePrior, SampleParams};
use super::transformer::PriorTransformer;
use super::unclip::UnClipScheduler;
use crate::checkpoint::CheckpointDir;
use crate::clip::text_encoder::repeat_interleave;
use crate::clip::{ClipImageProcessor, ClipTextEncoder, ClipTokenizer};
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;

pub use crate::clip::TextConditioning;

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

impl PriorOptions {
    /// The per-sample part of the options.
    pub fn sample_params(&self) -> SampleParams {
        SampleParams {
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
        }
    }
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

/// The loaded prior stack: the prompt encoder ([`ClipTextEncoder`]) and the sampler with the
/// vision tower ([`ImagePrior`]), composed into diffusers' prompt-level pipelines.
#[derive(Debug)]
pub struct PriorStack {
    text: ClipTextEncoder,
    image_prior: ImagePrior,
}

impl PriorStack {
    /// Loads every component of a `kandinsky-2-2-prior` folder in `dtype` on `device`.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_parts(
            ClipTextEncoder::load(dir, dtype, device)?,
            ImagePrior::load(dir, dtype, device)?,
        ))
    }

    /// Composes a loaded prompt encoder and sampler.
    pub fn from_parts(text: ClipTextEncoder, image_prior: ImagePrior) -> Self {
        Self { text, image_prior }
    }

    /// The prompt encoder.
    pub fn text_encoder(&self) -> &ClipTextEncoder {
        &self.text
    }

    /// The sampler and vision tower.
    pub fn image_prior(&self) -> &ImagePrior {
        &self.image_prior
    }

    /// Width D of the CLIP image embeddings.
    pub fn embedding_dim(&self) -> usize {
        self.image_prior.embedding_dim()
    }

    /// The prior transformer.
    pub fn prior(&self) -> &PriorTransformer {
        self.image_prior.prior()
    }

    /// The UnCLIP scheduler.
    pub fn scheduler(&self) -> &UnClipScheduler {
        self.image_prior.scheduler()
    }

    /// The CLIP tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        self.text.tokenizer()
    }

    /// The CLIP image processor.
    pub fn image_processor(&self) -> &ClipImageProcessor {
        self.image_prior.image_processor()
    }

    /// Tokenises and encodes prompts (no attention mask for the text tower, as diffusers).
    pub fn encode_text<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TextConditioning> {
        self.text.encode(prompts)
    }

    /// CLIP image embeddings (k, D) of preprocessed `pixel_values` (k, 3, 224, 224).
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_prior.encode_pixels(pixel_values)
    }

    /// CLIP image embeddings (k, D) of images (preprocessed as `CLIPImageProcessor`).
    pub fn encode_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        self.image_prior.encode_images(images)
    }

    /// The zero-image embedding (1, D) — the vision tower on raw zeros — computed once.
    pub fn zero_image_embed(&self) -> Result<Tensor> {
        self.image_prior.zero_image_embed()
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

    /// The conditioning of the prompts with appended negatives, and (under CFG only) the
    /// unconditional rows: `""` per prompt, or the negatives twice.
    fn conditioning(
        &self,
        prompts: &[String],
        negative_prompts: Option<&[String]>,
        o: &PriorOptions,
    ) -> Result<(TextConditioning, Option<TextConditioning>)> {
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
        let uncond = if o.guidance_scale > 1.0 {
            Some(self.encode_text(&uncond)?.repeat_interleave(n)?)
        } else {
            None
        };
        Ok((cond, uncond))
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
        let (cond, uncond) = self.conditioning(&req.prompts, req.negative_prompts.as_deref(), o)?;
        let embeds = self.image_prior.sample(
            &cond,
            uncond.as_ref(),
            &o.sample_params(),
            req.latents.as_ref(),
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
        fusion::check_weights(items.len(), weights)?;
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
        let mut embeds = Vec::with_capacity(items.len());
        for item in items {
            embeds.push(match item {
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
            });
        }
        let image_embeds = fusion::weighted_sum(&embeds, weights)?;
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
        // Fail on strength/steps before any model work.
        self.image_prior
            .emb2emb_timesteps(o.num_inference_steps, req.strength)?;
        let (cond, uncond) = self.conditioning(&req.prompts, req.negative_prompts.as_deref(), o)?;
        let rows = cond.rows()?;
        let d = self.embedding_dim();
        let embeds = match &req.image {
            Emb2EmbImage::Embeds(e) => {
                if e.rank() != 2 || e.dim(1)? != d || e.dim(0)? == 0 {
                    return Err(ModelError::invalid(
                        "image",
                        format!("embedding shape {:?}, expected (k ≥ 1, {d})", e.dims()),
                    ));
                }
                e.to_dtype(DType::F32)?
                    .to_device(self.image_prior.device())?
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
        let out = self.image_prior.emb2emb(
            &cond,
            uncond.as_ref(),
            &init_latents,
            req.strength,
            &o.sample_params(),
            noise,
        )?;
        self.split_output(out, req.negative_prompts.is_some())
    }
}
