//! The whole Kandinsky 2.2 (or 2.1) text-to-image pipeline in one process: prompt → CLIP text
//! conditioning → prior image embeddings → decoder latents (2.1: also conditioned on the
//! multilingual text encoder) → MoVQ pixels.
//!
//! The services run exactly these steps across processes (text-encoder, prior, denoiser, movq
//! behind the gateway), with the same per-image seeds, so an image generated through the services
//! equals the one generated here byte for byte (the end-to-end tests check it). Each stage draws
//! its noise from its own [`SeededNoise`] over the image seeds, so an image depends only on its
//! own seed.

use crate::checkpoint::{CheckpointDir, ModelFamily, Variant};
use crate::config::SchedulerConfig;
use crate::decoder::{
    latent_side, prepare_inpaint_mask, run_decoder, DecoderInputs, DecoderMode, DecoderText,
};
use crate::error::{ModelError, Result};
use crate::image::{
    outpaint_canvas, preprocess_hint, preprocess_img2img, preprocess_inpaint, Margins, MaskImage,
};
use crate::mclip::MultilingualTextEncoder;
use crate::movq::{MovqOptions, VqModel};
use crate::noise::SeededNoise;
use crate::prior::{PriorStack, SampleParams};
use crate::schedulers;
use crate::unet::UNet2DConditionModel;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct Text2ImageRequest {
    /// The prompt.
    pub prompt: String,
    /// Negative prompt; `None` uses the zero-image negative embedding (diffusers' default).
    pub negative_prompt: Option<String>,
    /// Output size in pixels.
    pub height: usize,
    /// Output size in pixels.
    pub width: usize,
    /// One seed per image.
    pub seeds: Vec<u64>,
    /// Prior steps and guidance.
    pub prior: SampleParams,
    /// Decoder steps.
    pub decoder_steps: usize,
    /// Decoder guidance (CFG iff > 1).
    pub decoder_guidance: f64,
    /// An explicit decoder schedule instead of `decoder_steps` steps (whose value must then be
    /// its length); LCM and TCD schedulers only.
    pub decoder_timesteps: Option<Vec<usize>>,
    /// What the decoder does besides text-to-image (what the services' gateway sends to the
    /// MoVQ encoder and the denoiser for the same task).
    pub task: PipelineTask,
}

/// The decoder task of a pipeline run.
#[derive(Debug, Clone, Default)]
pub enum PipelineTask {
    /// Text-to-image.
    #[default]
    Text,
    /// Inpaint `image` where `mask` is white (an inpainting decoder).
    Inpaint { image: RgbImage, mask: MaskImage },
    /// Outpaint: `image` on a canvas of the output size with these margins (an inpainting
    /// decoder; see [`outpaint_canvas`]).
    Outpaint { image: RgbImage, margins: Margins },
    /// Text-to-image with a ControlNet depth hint (a ControlNet decoder).
    Controlnet { hint: RgbImage },
    /// Image-to-image from `image` (resized to the output size) keeping `1 − strength` of it,
    /// with a depth hint on a ControlNet decoder.
    Img2Img {
        image: RgbImage,
        strength: f64,
        hint: Option<RgbImage>,
    },
}

/// What the pipeline produced.
#[derive(Debug, Clone)]
pub struct Text2ImageOutput {
    /// Prior output (n, D).
    pub image_embeds: Tensor,
    /// Final decoder latents (n, 4, h, w).
    pub latents: Tensor,
    /// Post-processed images.
    pub images: Vec<RgbImage>,
}

/// Every component of text-to-image, loaded from the prior and decoder checkpoint folders.
pub struct Text2Image {
    /// The prior folder: CLIP text encoder, prior sampler, vision tower.
    prior: PriorStack,
    /// Kandinsky 2.1: the decoder folder's multilingual text encoder.
    multilingual: Option<MultilingualTextEncoder>,
    unet: UNet2DConditionModel,
    scheduler: SchedulerConfig,
    movq: VqModel,
    device: Device,
}

impl Text2Image {
    /// Loads a prior folder (text encoder, prior, vision tower) and a decoder folder (UNet,
    /// scheduler, MoVQ and, for Kandinsky 2.1, the multilingual text encoder).
    pub fn load(
        prior_dir: &CheckpointDir,
        decoder_dir: &CheckpointDir,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for dir in [prior_dir, decoder_dir] {
            let whole = match dir.family() {
                ModelFamily::Amused => Some(
                    "an aMUSEd folder, which has no prior: load it with \
                     kd_models::amused::AmusedPipeline",
                ),
                ModelFamily::Kandinsky20 => Some(
                    "a Kandinsky 2.0 folder, which has no prior: \
                     load it with kd_models::kd20::Kd20Pipeline",
                ),
                _ => None,
            };
            if let Some(what) = whole {
                return Err(ModelError::invalid(
                    "model_dir",
                    format!("{} is {what}", dir.root().display()),
                ));
            }
        }
        let prior = PriorStack::load(prior_dir, dtype, device)?;
        let unet_dir = decoder_dir.component("unet")?;
        let unet = UNet2DConditionModel::new(
            &unet_dir.unet_config()?,
            unet_dir
                .weights(Variant::Default)?
                .var_builder(dtype, device),
        )?;
        let multilingual = match decoder_dir.family() {
            ModelFamily::Kandinsky21 => {
                Some(MultilingualTextEncoder::load(decoder_dir, dtype, device)?)
            }
            ModelFamily::Kandinsky22 | ModelFamily::Amused | ModelFamily::Kandinsky20 => None,
        };
        let scheduler = decoder_dir.component("scheduler")?.scheduler_config()?;
        let movq = VqModel::load(
            &decoder_dir.component("movq")?,
            MovqOptions::default(),
            dtype,
            device,
        )?;
        Ok(Self {
            multilingual,
            prior,
            unet,
            scheduler,
            movq,
            device: device.clone(),
        })
    }

    /// The decoder mode of `req.task`: the init image encoded by the MoVQ, the repaint mask
    /// prepared at latent resolution, or the hint.
    fn decoder_mode(&self, req: &Text2ImageRequest) -> Result<DecoderMode> {
        let sf = self.movq.scale_factor();
        let dev = self.movq_device();
        let (image, mask) = match &req.task {
            PipelineTask::Text => return Ok(DecoderMode::Text2Img),
            PipelineTask::Img2Img {
                image,
                strength,
                hint,
            } => {
                let px = preprocess_img2img(image, req.height, req.width, sf)?;
                let hint = match hint {
                    Some(h) => Some(preprocess_hint(h, req.height, req.width)?.to_device(dev)?),
                    None => None,
                };
                return Ok(DecoderMode::Img2Img {
                    image_latents: self.encode(&px)?,
                    strength: *strength,
                    hint,
                });
            }
            PipelineTask::Controlnet { hint } => {
                let hint = preprocess_hint(hint, req.height, req.width)?;
                return Ok(DecoderMode::Controlnet {
                    hint: hint.to_device(self.movq_device())?,
                });
            }
            PipelineTask::Inpaint { image, mask } => (image.clone(), mask.clone()),
            PipelineTask::Outpaint { image, margins } => {
                let (w, h) = (req.width as u32, req.height as u32);
                let (canvas, mask) = outpaint_canvas(image, w, h, *margins)?;
                (canvas, MaskImage::Luma(mask))
            }
        };
        let (keep, px) = preprocess_inpaint(&image, &mask, req.height, req.width, sf)?;
        let image_latents = self.encode(&px)?;
        let repaint = (1.0 - keep)?.to_device(dev)?;
        let (lh, lw) = (latent_side(req.height, sf), latent_side(req.width, sf));
        Ok(DecoderMode::Inpaint {
            image_latents,
            mask: prepare_inpaint_mask(&repaint, lh, lw)?,
        })
    }

    fn movq_device(&self) -> &Device {
        &self.device
    }

    /// MoVQ latents (f32) of pre-processed pixels (B, 3, H, W) in [-1, 1].
    fn encode(&self, px: &Tensor) -> Result<Tensor> {
        let x = px.to_device(&self.device)?.to_dtype(self.movq.dtype())?;
        Ok(self.movq.encode(&x)?.to_dtype(DType::F32)?)
    }

    /// Runs the pipeline.
    pub fn generate(&self, req: &Text2ImageRequest) -> Result<Text2ImageOutput> {
        let n = req.seeds.len();
        if n == 0 {
            return Err(ModelError::invalid(
                "seeds",
                "give one seed per image (at least one)",
            ));
        }
        let uncond_prompt = req.negative_prompt.clone().unwrap_or_default();
        let text = self
            .prior
            .encode_text(&[req.prompt.as_str(), uncond_prompt.as_str()])?;
        let (cond, uncond) = (text.row(0)?, text.row(1)?);
        let image_prior = self.prior.image_prior();
        let image_embeds = image_prior.sample(
            &cond.repeat_interleave(n)?,
            Some(&uncond),
            &req.prior,
            None,
            &mut SeededNoise::new(&req.seeds),
        )?;
        let negative_image_embeds = match &req.negative_prompt {
            // As diffusers: the negative prompt is sampled through the prior (cond = uncond).
            Some(_) => image_prior.sample(
                &uncond.repeat_interleave(n)?,
                Some(&uncond),
                &req.prior,
                None,
                &mut SeededNoise::new(&req.seeds),
            )?,
            None => self.prior.zero_image_embed()?.repeat((n, 1))?,
        };
        let mut scheduler =
            schedulers::from_config(&self.scheduler, schedulers::pipeline_eta(&self.scheduler))?;
        // Kandinsky 2.1: the decoder also sees the multilingual encoding of [prompt, negative].
        let text21 = match &self.multilingual {
            Some(m) => {
                let t = m.encode(&[req.prompt.as_str(), uncond_prompt.as_str()])?;
                let (c, u) = (t.row(0)?, t.row(1)?);
                Some((c.repeat_interleave(n)?, u))
            }
            None => None,
        };
        let text = match text21 {
            Some((c, u)) => DecoderText::new(
                c.text_embeds,
                c.hidden_states,
                u.text_embeds,
                u.hidden_states,
            ),
            None => DecoderText::default(),
        };
        let inputs = DecoderInputs {
            image_embeds: image_embeds.clone(),
            negative_image_embeds: Some(negative_image_embeds),
            height: req.height,
            width: req.width,
            movq_scale_factor: self.movq.scale_factor(),
            num_inference_steps: req.decoder_steps,
            timesteps: req.decoder_timesteps.clone(),
            guidance_scale: req.decoder_guidance,
            num_images_per_prompt: 1,
            latents: None,
            mode: self.decoder_mode(req)?,
            text,
        };
        let latents = run_decoder(
            &self.unet,
            scheduler.as_mut(),
            &inputs,
            &mut SeededNoise::new(&req.seeds),
            &mut |_| true,
        )?
        .into_latents()?;
        let pixels = self
            .movq
            .decode(&latents.to_dtype(self.movq.dtype())?)?
            .to_dtype(DType::F32)?;
        let images = crate::image::postprocess(&pixels)?;
        Ok(Text2ImageOutput {
            image_embeds,
            latents,
            images,
        })
    }
}
