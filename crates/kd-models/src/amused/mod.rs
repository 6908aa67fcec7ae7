//! aMUSEd (<https://arxiv.org/abs/2401.01808>), the open reproduction of Muse: text-to-image by a
//! masked-token transformer over VQ-GAN tokens, as diffusers' `AmusedPipeline`,
//! `AmusedImg2ImgPipeline` and `AmusedInpaintPipeline` (`pipelines/deprecated/amused/`) run it.
//!
//! The stages, each usable alone (the services split them):
//! * text: the CLIP text tower with projection — `text_embeds` (pooled) and the **penultimate**
//!   hidden states ([`ClipTextEncoder`] with [`TextHiddenLayer::Penultimate`]);
//! * tokens: [`TokenGenerator`] — the `UVit2DModel` and the [`AmusedScheduler`] loop, with
//!   classifier-free guidance on the logits and micro-conditioning; a [`TokenRun`] is one
//!   request's loop, stepped one step at a time;
//! * pixels: the VQ-GAN ([`VqModel::decode_indices`], clipped to [0, 1];
//!   [`VqModel::encode_indices`] of a [0, 1] image for image-to-image and inpainting).
//!
//! Behaviour kept from diffusers (each is what its pipeline does):
//! * images are in [0, 1] on both sides of the VQ-GAN (`do_normalize=False`);
//! * the micro-conditioning is `[width, height, crop_top, crop_left, aesthetic_score]`;
//! * image-to-image runs the last `int(steps · strength)` steps after masking the image's tokens
//!   with `add_noise` at `timesteps[start − 1]` — for strength 1 that index wraps to the last
//!   timestep, whose mask ratio is ~0, so nothing is masked;
//! * inpainting masks the tokens under the mask, uses the **linear** schedule whatever the folder
//!   says (the pipeline rewrites its scheduler's config) scaled by the masked share, and runs the
//!   last `int(steps · strength)` steps;
//! * without guidance (`guidance_scale ≤ 1`) no negative prompt is encoded.

use crate::checkpoint::{CheckpointDir, ModelFamily, Variant};
use crate::clip::{ClipTextEncoder, TextConditioning, TextHiddenLayer};
use crate::config::{UVit2DConfig, MICRO_CONDS};
use crate::error::{ModelError, Result};
use crate::interrupt::{self, Stop};
use crate::movq::{MovqOptions, VqModel};
use crate::noise::NoiseSource;
use crate::schedulers::amused::{AmusedScheduler, AmusedSchedulerConfig, MaskingSchedule};
use crate::uvit::UVit2DModel;
use candle_core::{DType, Device, Tensor};

/// diffusers' defaults for `AmusedPipeline.__call__`.
pub const DEFAULT_STEPS: usize = 12;
/// Default guidance scale.
pub const DEFAULT_GUIDANCE: f32 = 10.0;
/// Default temperatures (first step, last step).
pub const DEFAULT_TEMPERATURE: (f32, f32) = (2.0, 0.0);
/// Default aesthetic score of the micro-conditioning.
pub const DEFAULT_AESTHETIC_SCORE: f32 = 6.0;
/// The most steps a request may ask for.
pub const MAX_STEPS: usize = 1000;

/// The micro-conditioning besides the image size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConds {
    /// `micro_conditioning_aesthetic_score` (6).
    pub aesthetic_score: f32,
    /// `micro_conditioning_crop_coord` (0, 0).
    pub crop_coord: (f32, f32),
}

impl Default for MicroConds {
    fn default() -> Self {
        Self {
            aesthetic_score: DEFAULT_AESTHETIC_SCORE,
            crop_coord: (0.0, 0.0),
        }
    }
}

/// Sampling parameters of a token run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenParams {
    /// `num_inference_steps` of the full schedule (image-to-image and inpainting run a share).
    pub steps: usize,
    /// Classifier-free guidance on the logits; ≤ 1 runs without.
    pub guidance_scale: f32,
    /// Temperatures of the first and last step.
    pub temperature: (f32, f32),
    /// Micro-conditioning.
    pub micro: MicroConds,
}

impl Default for TokenParams {
    fn default() -> Self {
        Self {
            steps: DEFAULT_STEPS,
            guidance_scale: DEFAULT_GUIDANCE,
            temperature: DEFAULT_TEMPERATURE,
            micro: MicroConds::default(),
        }
    }
}

impl TokenParams {
    /// Whether the run uses classifier-free guidance (and so a negative prompt).
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }

    fn check(&self) -> Result<()> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!("{}; allowed 1..={MAX_STEPS}", self.steps),
            ));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(ModelError::invalid(
                "guidance_scale",
                format!("{}; allowed: a finite value ≥ 0", self.guidance_scale),
            ));
        }
        let m = &self.micro;
        for (field, v) in [
            ("aesthetic_score", m.aesthetic_score),
            ("crop_coord", m.crop_coord.0),
            ("crop_coord", m.crop_coord.1),
        ] {
            if !v.is_finite() {
                return Err(ModelError::invalid(field, format!("{v}: must be finite")));
            }
        }
        Ok(())
    }
}

/// What a token run starts from.
#[derive(Debug, Clone)]
pub enum TokenTask {
    /// Every token masked: an image of `height × width` pixels.
    TextToImage { height: usize, width: usize },
    /// The tokens of an init image (B, h, w), partly re-masked by `strength`.
    ImageToImage { tokens: Tensor, strength: f32 },
    /// The tokens of an init image (B, h, w) with the positions where `mask` (B, h, w, 0/1) is 1
    /// masked, regenerated over the last `int(steps · strength)` steps.
    Inpaint {
        tokens: Tensor,
        mask: Tensor,
        strength: f32,
    },
}

/// The prompt conditioning of a run: the prompts' and, with guidance, the negative prompts'
/// CLIP outputs (`text_embeds` and penultimate hidden states).
#[derive(Debug, Clone)]
pub struct TokenConditioning {
    pub cond: TextConditioning,
    pub uncond: Option<TextConditioning>,
}

/// The token generator: `UVit2DModel` + the scheduler config + the VQ-GAN's scale factor (to map
/// pixel sizes to token grids). What the denoiser stage loads for an aMUSEd folder.
#[derive(Debug, Clone)]
pub struct TokenGenerator {
    transformer: UVit2DModel,
    scheduler: AmusedSchedulerConfig,
    scale_factor: usize,
    codebook_size: usize,
    device: Device,
}

impl TokenGenerator {
    /// Loads `transformer/`, `scheduler/` and the VQ-GAN config of an aMUSEd folder.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        expect_amused(dir)?;
        let t = dir.component("transformer")?;
        let transformer = UVit2DModel::new(
            &t.uvit_config()?,
            t.weights(Variant::Default)?.var_builder(dtype, device),
        )?;
        let sched_path = dir.root().join("scheduler/scheduler_config.json");
        let scheduler = AmusedSchedulerConfig::load(&sched_path)?;
        let vq = dir.component("vqvae")?.vq_config()?;
        let cfg = transformer.config();
        if vq.num_vq_embeddings != cfg.codebook_size {
            return Err(ModelError::Config {
                path: dir.root().join("vqvae/config.json"),
                message: format!(
                    "num_vq_embeddings ({}) must equal the transformer's codebook_size ({})",
                    vq.num_vq_embeddings, cfg.codebook_size
                ),
            });
        }
        if scheduler.mask_token_id as usize >= cfg.vocab_size
            || (scheduler.mask_token_id as usize) < cfg.codebook_size
        {
            return Err(ModelError::Config {
                path: sched_path,
                message: format!(
                    "mask_token_id {} must lie in the transformer's vocabulary above the codebook ({}..{})",
                    scheduler.mask_token_id, cfg.codebook_size, cfg.vocab_size
                ),
            });
        }
        Ok(Self {
            codebook_size: cfg.codebook_size,
            transformer,
            scheduler,
            scale_factor: vq.scale_factor(),
            device: device.clone(),
        })
    }

    /// The transformer's config.
    pub fn config(&self) -> &UVit2DConfig {
        self.transformer.config()
    }

    /// Pixels per token along each side (the VQ-GAN's 2^(levels − 1)).
    pub fn scale_factor(&self) -> usize {
        self.scale_factor
    }

    /// The image side the checkpoint was trained at: `sample_size × scale_factor`.
    pub fn native_size(&self) -> usize {
        self.config().sample_size * self.scale_factor
    }

    /// The mask token.
    pub fn mask_token_id(&self) -> u32 {
        self.scheduler.mask_token_id
    }

    /// The granularity of image sides: a token is `scale_factor` pixels, and a transformer that
    /// downsamples halves the token grid.
    pub fn size_multiple(&self) -> usize {
        self.scale_factor * if self.config().downsample { 2 } else { 1 }
    }

    /// Checks a run and sets it up: its schedule, its first token map (masked as the task says,
    /// drawing from `noise` for image-to-image) and its conditioning batch.
    pub fn prepare(
        &self,
        text: &TokenConditioning,
        task: &TokenTask,
        params: &TokenParams,
        noise: &mut dyn NoiseSource,
    ) -> Result<TokenRun> {
        params.check()?;
        let rows = text.cond.rows()?;
        let mask_id = self.mask_token_id();
        let schedule = match task {
            TokenTask::Inpaint { .. } => MaskingSchedule::Linear,
            _ => MaskingSchedule::parse(&self.scheduler.masking_schedule)?,
        };
        let scheduler = AmusedScheduler::new(mask_id, schedule, params.steps, params.temperature)?;
        let n = params.steps;
        let (tokens, start, starting_mask_ratio) = match task {
            TokenTask::TextToImage { height, width } => {
                let (h, w) = self.token_grid(*height, *width)?;
                let tokens = Tensor::full(mask_id, (rows, h, w), &Device::Cpu)?;
                (tokens, 0, 1.0)
            }
            TokenTask::ImageToImage { tokens, strength } => {
                let tokens = self.check_tokens(tokens, rows)?;
                let start = n - steps_run(n, *strength)?;
                // diffusers indexes timesteps[start − 1]: −1 wraps to the last step.
                let at = if start == 0 { n - 1 } else { start - 1 };
                (scheduler.add_noise(&tokens, at, noise)?, start, 1.0)
            }
            TokenTask::Inpaint {
                tokens,
                mask,
                strength,
            } => {
                let tokens = self.check_tokens(tokens, rows)?;
                let start = n - steps_run(n, *strength)?;
                let (masked, ratio) = mask_tokens(&tokens, mask, mask_id)?;
                (masked, start, ratio)
            }
        };
        let (_, h, w) = tokens.dims3()?;
        let micro = [
            (w * self.scale_factor) as f32,
            (h * self.scale_factor) as f32,
            params.micro.crop_coord.0,
            params.micro.crop_coord.1,
            params.micro.aesthetic_score,
        ];
        let (embeds, hidden) = match (&text.uncond, params.guided()) {
            (Some(u), true) => {
                if u.rows()? != rows {
                    return Err(ModelError::invalid(
                        "negative_prompt",
                        format!("{} negative rows for {rows} prompts", u.rows()?),
                    ));
                }
                (
                    Tensor::cat(&[&u.text_embeds, &text.cond.text_embeds], 0)?,
                    Tensor::cat(&[&u.hidden_states, &text.cond.hidden_states], 0)?,
                )
            }
            (None, true) => {
                return Err(ModelError::invalid(
                    "negative_prompt",
                    "guidance_scale > 1 needs the negative prompt's conditioning",
                ))
            }
            (_, false) => (
                text.cond.text_embeds.clone(),
                text.cond.hidden_states.clone(),
            ),
        };
        let batch = embeds.dim(0)?;
        let micro = Tensor::new(&micro, &Device::Cpu)?
            .reshape((1, MICRO_CONDS))?
            .repeat((batch, 1))?;
        Ok(TokenRun {
            scheduler,
            tokens,
            predicted: None,
            index: start,
            start,
            starting_mask_ratio,
            embeds: embeds.to_device(&self.device)?,
            hidden: hidden.to_device(&self.device)?,
            micro: micro.to_device(&self.device)?,
            guidance: params.guided().then_some(params.guidance_scale),
        })
    }

    /// The token grid of an image of `height × width` pixels.
    pub fn token_grid(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let m = self.size_multiple();
        for (field, v) in [("height", height), ("width", width)] {
            if v == 0 || !v.is_multiple_of(m) {
                return Err(ModelError::invalid(
                    field,
                    format!("{v}: must be a positive multiple of {m}"),
                ));
            }
        }
        Ok((height / self.scale_factor, width / self.scale_factor))
    }

    fn check_tokens(&self, tokens: &Tensor, rows: usize) -> Result<Tensor> {
        let (b, h, w) = tokens.dims3().map_err(|_| {
            ModelError::invalid(
                "tokens",
                format!("expected a (B, h, w) token map, got {:?}", tokens.dims()),
            )
        })?;
        if b != rows {
            return Err(ModelError::invalid(
                "tokens",
                format!("{b} token maps for {rows} prompts"),
            ));
        }
        self.token_grid(h * self.scale_factor, w * self.scale_factor)?;
        let tokens = tokens.to_device(&Device::Cpu)?.to_dtype(DType::U32)?;
        let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.codebook_size {
            return Err(ModelError::invalid(
                "tokens",
                format!(
                    "token {max} is outside the codebook (0..{})",
                    self.codebook_size
                ),
            ));
        }
        Ok(tokens)
    }

    /// The transformer's logits for a run's current tokens, guided.
    fn logits(&self, run: &TokenRun, stop: Stop) -> Result<Tensor> {
        let tokens = run.tokens.to_device(&self.device)?;
        let input = match run.guidance {
            Some(_) => Tensor::cat(&[&tokens, &tokens], 0)?,
            None => tokens,
        };
        let logits =
            self.transformer
                .forward(&input, &run.hidden, &run.embeds, &run.micro, stop)?;
        Ok(match run.guidance {
            Some(g) => {
                let b = run.tokens.dim(0)?;
                let uncond = logits.narrow(0, 0, b)?;
                let cond = logits.narrow(0, b, b)?;
                (&uncond + ((cond - &uncond)? * g as f64)?)?
            }
            None => logits,
        })
    }
}

/// `int(steps · strength)`, which must leave at least one step.
fn steps_run(steps: usize, strength: f32) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(ModelError::invalid(
            "strength",
            format!("{strength}; allowed: (0, 1]"),
        ));
    }
    let run = (steps as f64 * strength as f64) as usize;
    if run == 0 {
        return Err(ModelError::invalid(
            "strength",
            format!(
                "{strength} × {steps} steps runs no step; allowed: at least {:.4}",
                1.0 / steps as f64
            ),
        ));
    }
    Ok(run)
}

/// Masks `tokens` where `mask` (B, h, w) or (B, 1, h, w) is ≥ 0.5; returns the masked map and the
/// masked share (float32, as `mask.sum() / numel`).
fn mask_tokens(tokens: &Tensor, mask: &Tensor, mask_id: u32) -> Result<(Tensor, f32)> {
    let mask = match mask.rank() {
        4 if mask.dim(1)? == 1 => mask.squeeze(1)?,
        _ => mask.clone(),
    };
    if mask.dims() != tokens.dims() {
        return Err(ModelError::invalid(
            "mask",
            format!(
                "expected a token-grid mask of shape {:?}, got {:?}",
                tokens.dims(),
                mask.dims()
            ),
        ));
    }
    let m: Vec<f32> = mask
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let t: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
    let masked = m.iter().filter(|&&v| v >= 0.5).count();
    if masked == 0 {
        return Err(ModelError::invalid(
            "mask",
            "masks no token: nothing to inpaint",
        ));
    }
    let out: Vec<u32> = t
        .iter()
        .zip(&m)
        .map(|(&t, &m)| if m >= 0.5 { mask_id } else { t })
        .collect();
    Ok((
        Tensor::from_vec(out, tokens.dims(), &Device::Cpu)?,
        masked as f32 / t.len() as f32,
    ))
}

/// One request's token loop.
#[derive(Debug, Clone)]
pub struct TokenRun {
    scheduler: AmusedScheduler,
    tokens: Tensor,
    /// The last step's sampled tokens at every position (no mask token): what a preview shows.
    predicted: Option<Tensor>,
    index: usize,
    start: usize,
    starting_mask_ratio: f32,
    embeds: Tensor,
    hidden: Tensor,
    micro: Tensor,
    guidance: Option<f32>,
}

impl TokenRun {
    /// Steps this run makes in all.
    pub fn total_steps(&self) -> usize {
        self.scheduler.steps() - self.start
    }

    /// Steps made so far.
    pub fn steps_done(&self) -> usize {
        self.index - self.start
    }

    /// Whether every step has been made.
    pub fn done(&self) -> bool {
        self.index >= self.scheduler.steps()
    }

    /// The current token map (B, h, w) u32 (masked positions hold the mask token).
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    /// The mask token.
    pub fn mask_token_id(&self) -> u32 {
        self.scheduler.mask_token_id()
    }

    /// The last step's sampled token at every position (the scheduler's
    /// `pred_original_sample`; no mask token), `None` before the first step.
    pub fn predicted(&self) -> Option<&Tensor> {
        self.predicted.as_ref()
    }

    /// Makes the next step: one transformer call (both CFG halves in one batch), then the
    /// scheduler's sampling and re-masking.
    pub fn step(
        &mut self,
        generator: &TokenGenerator,
        noise: &mut dyn NoiseSource,
        stop: Stop,
    ) -> Result<()> {
        if self.done() {
            return Err(ModelError::invalid("step", "the run has made every step"));
        }
        let logits = generator.logits(self, stop)?;
        let out = self.scheduler.step(
            &logits,
            self.index,
            &self.tokens,
            self.starting_mask_ratio,
            noise,
        )?;
        self.tokens = out.prev_sample;
        self.predicted = Some(out.pred_original_sample);
        self.index += 1;
        Ok(())
    }
}

fn expect_amused(dir: &CheckpointDir) -> Result<()> {
    if dir.family() != ModelFamily::Amused {
        return Err(ModelError::invalid(
            "model_dir",
            format!(
                "{} is a {} folder, not an aMUSEd one",
                dir.root().display(),
                dir.pipeline_class()
            ),
        ));
    }
    Ok(())
}

/// The whole aMUSEd pipeline in one process: text encoder, token generator, VQ-GAN.
#[derive(Debug)]
pub struct AmusedPipeline {
    text: ClipTextEncoder,
    generator: TokenGenerator,
    vqvae: VqModel,
}

impl AmusedPipeline {
    /// Loads an aMUSEd folder (`AmusedPipeline` / `AmusedImg2ImgPipeline` /
    /// `AmusedInpaintPipeline`).
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        expect_amused(dir)?;
        Ok(Self {
            text: ClipTextEncoder::load(dir, dtype, device)?
                .with_hidden_layer(TextHiddenLayer::Penultimate),
            generator: TokenGenerator::load(dir, dtype, device)?,
            vqvae: VqModel::load(
                &dir.component("vqvae")?,
                MovqOptions::default(),
                dtype,
                device,
            )?,
        })
    }

    /// The token generator.
    pub fn generator(&self) -> &TokenGenerator {
        &self.generator
    }

    /// The VQ-GAN.
    pub fn vqvae(&self) -> &VqModel {
        &self.vqvae
    }

    /// The prompt encoder (penultimate hidden states).
    pub fn text_encoder(&self) -> &ClipTextEncoder {
        &self.text
    }

    /// Encodes prompts and, when `guided`, the negative prompts (`""` for each prompt when
    /// `negative` is empty).
    pub fn encode_text<S: AsRef<str>>(
        &self,
        prompts: &[S],
        negative: &[S],
        guided: bool,
    ) -> Result<TokenConditioning> {
        let cond = self.text.encode(prompts)?;
        let uncond = if guided {
            Some(if negative.is_empty() {
                self.text.encode(&vec![""; prompts.len()])?
            } else {
                self.text.encode(negative)?
            })
        } else {
            None
        };
        Ok(TokenConditioning { cond, uncond })
    }

    /// Tokens of images (B, 3, H, W) in [0, 1].
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        self.vqvae.encode_indices(image, &interrupt::never)
    }

    /// Images (B, 3, H, W) in [0, 1] of token maps (B, h, w).
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self
            .vqvae
            .decode_indices(tokens, &interrupt::never)?
            .to_dtype(DType::F32)?
            .clamp(0f32, 1f32)?)
    }

    /// 8-bit RGB images of token maps (B, h, w), as diffusers' `output_type="pil"`.
    pub fn images(&self, tokens: &Tensor) -> Result<Vec<image::RgbImage>> {
        crate::image::rgb_images(&self.decode(tokens)?.permute((0, 2, 3, 1))?)
    }

    /// Runs a whole token loop; `on_step(done, total, tokens)` after each step.
    pub fn generate_tokens(
        &self,
        text: &TokenConditioning,
        task: &TokenTask,
        params: &TokenParams,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let mut run = self.generator.prepare(text, task, params, noise)?;
        while !run.done() {
            run.step(&self.generator, noise, &interrupt::never)?;
            on_step(run.steps_done(), run.total_steps(), run.tokens());
        }
        Ok(run.tokens().clone())
    }
}
