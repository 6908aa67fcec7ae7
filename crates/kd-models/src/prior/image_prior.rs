//! The sampling half of the Kandinsky 2.2 prior folder as one loadable model: `PriorTransformer`,
//! the UnCLIP scheduler, the CLIP vision tower and its image processor, and the cached zero-image
//! embedding (diffusers `KandinskyV22PriorPipeline` / `KandinskyV22PriorEmb2EmbPipeline` minus
//! the prompt encoding).
//!
//! Every entry point takes explicit conditioning ([`TextConditioning`], as
//! [`crate::clip::ClipTextEncoder`] produces it), so the text encoder can live in another process.
//! CFG batches are laid out `[uncond; cond]` as diffusers does; an unconditional conditioning of
//! one row is broadcast to the batch. All randomness comes from the caller's [`NoiseSource`], in
//! diffusers' draw order (`tools/reference/PRIOR.md` §3.1).

use super::fusion;
use super::transformer::PriorTransformer;
use super::unclip::UnClipScheduler;
use crate::checkpoint::{CheckpointDir, Variant};
use crate::clip::{ClipImageProcessor, ClipVisionModelWithProjection, TextConditioning};
use crate::config::SchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use std::sync::OnceLock;

/// Denoising parameters of one prior sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Steps of the UnCLIP schedule (2..=num_train_timesteps).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; CFG is on iff > 1.
    pub guidance_scale: f32,
}

impl Default for SampleParams {
    /// diffusers' defaults: 25 steps, guidance 4.0.
    fn default() -> Self {
        Self {
            num_inference_steps: 25,
            guidance_scale: 4.0,
        }
    }
}

/// One item of a fusion over explicit inputs ([`ImagePrior::fuse`]).
#[derive(Debug, Clone)]
pub enum FusionInput {
    /// Text conditioning, sampled through the prior.
    Text(TextConditioning),
    /// An image, preprocessed and encoded by the vision tower.
    Image(DynamicImage),
    /// Preprocessed `pixel_values` (k, 3, 224, 224), encoded by the vision tower.
    PixelValues(Tensor),
    /// Ready CLIP image embeddings (k, D).
    Embeds(Tensor),
}

/// The loaded prior sampler and vision tower. Immutable after loading (the zero-image embedding
/// is computed once, lazily), so one instance serves every thread.
#[derive(Debug)]
pub struct ImagePrior {
    prior: PriorTransformer,
    scheduler: UnClipScheduler,
    image_encoder: ClipVisionModelWithProjection,
    image_processor: ClipImageProcessor,
    text_embed_dim: usize,
    device: Device,
    zero_image_embed: OnceLock<Tensor>,
}

/// One prior sampling run: its conditioning (CFG-batched `[uncond; cond]`), latents, schedule and
/// guidance. Runs of several requests share transformer calls ([`ImagePrior::step_runs`]), each
/// with its own timesteps, guidance and noise, ending as it ends alone.
#[derive(Debug)]
pub struct PriorRun {
    cond: TextConditioning,
    latents: Tensor,
    timesteps: Vec<usize>,
    done: usize,
    guidance: Option<f32>,
}

impl PriorRun {
    /// A run at its first step; CFG is on iff `guidance_scale` > 1 (`cond` is then
    /// `[uncond; cond]`).
    fn new(
        cond: TextConditioning,
        latents: Tensor,
        timesteps: Vec<usize>,
        guidance_scale: f32,
    ) -> Self {
        Self {
            cond,
            latents,
            timesteps,
            done: 0,
            guidance: (guidance_scale > 1.0).then_some(guidance_scale),
        }
    }

    /// Transformer rows per step: B, or 2B under CFG.
    pub fn rows(&self) -> usize {
        self.cond.text_embeds.dims().first().copied().unwrap_or(0)
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// Steps of its schedule.
    pub fn total_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether its last step ran.
    pub fn is_done(&self) -> bool {
        self.done >= self.timesteps.len()
    }
}

fn check_guidance(g: f32) -> Result<()> {
    if !g.is_finite() {
        return Err(ModelError::invalid(
            "guidance_scale",
            format!("{g}, must be a finite number"),
        ));
    }
    Ok(())
}

impl ImagePrior {
    /// Loads `prior/`, `scheduler/`, `image_encoder/` and `image_processor/` of a prior folder.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        let vb = |name: &str| -> Result<_> {
            Ok(dir
                .component(name)?
                .weights(Variant::Default)?
                .var_builder(dtype, device))
        };
        let prior_cfg = dir.component("prior")?.prior_config()?;
        let prior = PriorTransformer::new(&prior_cfg, vb("prior")?)?;
        let image_encoder = ClipVisionModelWithProjection::new(
            &dir.component("image_encoder")?.clip_vision_config()?,
            vb("image_encoder")?,
        )?;
        let image_processor =
            ClipImageProcessor::new(&dir.component("image_processor")?.image_processor_config()?);
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
            text_embed_dim: prior_cfg
                .embedding_proj_dim
                .unwrap_or(prior_cfg.embedding_dim),
            prior,
            scheduler,
            image_encoder,
            image_processor,
            device: device.clone(),
            zero_image_embed: OnceLock::new(),
        })
    }

    /// Width D of the CLIP image embeddings (and of the text hidden states).
    pub fn embedding_dim(&self) -> usize {
        self.prior.embedding_dim()
    }

    /// Width of the `text_embeds` the prior is conditioned on.
    pub fn text_embed_dim(&self) -> usize {
        self.text_embed_dim
    }

    /// Text tokens per conditioning row (77).
    pub fn num_embeddings(&self) -> usize {
        self.prior.num_embeddings()
    }

    /// The device the models run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The prior transformer.
    pub fn prior(&self) -> &PriorTransformer {
        &self.prior
    }

    /// The UnCLIP scheduler.
    pub fn scheduler(&self) -> &UnClipScheduler {
        &self.scheduler
    }

    /// The CLIP image processor.
    pub fn image_processor(&self) -> &ClipImageProcessor {
        &self.image_processor
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

    /// Checks one conditioning's shapes and mask values (`rows` = required rows, or any ≥ 1)
    /// and brings it to f32 (mask u32) on this device.
    fn checked(
        &self,
        field: &'static str,
        c: &TextConditioning,
        rows: Option<usize>,
    ) -> Result<TextConditioning> {
        let (p, n, d) = (
            self.text_embed_dim,
            self.num_embeddings(),
            self.embedding_dim(),
        );
        let bad = |what: &str, dims: &[usize], expected: String| {
            ModelError::invalid(
                field,
                format!("{what} has shape {dims:?}, expected {expected}"),
            )
        };
        let te = c.text_embeds.dims();
        let b = match (te, rows) {
            ([b, w], Some(r)) if *b == r && *w == p => *b,
            ([b, w], None) if *b >= 1 && *w == p => *b,
            _ => {
                let rows = rows.map_or("B ≥ 1".to_string(), |r| r.to_string());
                return Err(bad("text_embeds", te, format!("({rows}, {p})")));
            }
        };
        let hs = c.hidden_states.dims();
        if hs != [b, n, d] {
            return Err(bad("hidden_states", hs, format!("({b}, {n}, {d})")));
        }
        let m = c.mask.dims();
        if m != [b, n] {
            return Err(bad("mask", m, format!("({b}, {n})")));
        }
        let mask = c.mask.to_dtype(DType::U32)?.to_device(&self.device)?;
        let values: Vec<Vec<u32>> = mask.to_device(&Device::Cpu)?.to_vec2()?;
        if values.iter().flatten().any(|&v| v > 1) {
            return Err(ModelError::invalid(
                field,
                "mask values must be 0 (padding) or 1 (token)",
            ));
        }
        Ok(TextConditioning {
            text_embeds: c
                .text_embeds
                .to_dtype(DType::F32)?
                .to_device(&self.device)?,
            hidden_states: c
                .hidden_states
                .to_dtype(DType::F32)?
                .to_device(&self.device)?,
            mask,
        })
    }

    /// The prior's batch: `cond` alone, or `[uncond; cond]` under CFG (uncond broadcast from one
    /// row when needed). Returns the latent rows B and the batch.
    fn batch(
        &self,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        guidance_scale: f32,
    ) -> Result<(usize, TextConditioning)> {
        let cond = self.checked("conditioning", cond, None)?;
        let b = cond.rows()?;
        if guidance_scale <= 1.0 {
            return Ok((b, cond));
        }
        let uncond = uncond.ok_or_else(|| {
            ModelError::invalid(
                "unconditional",
                format!("required when guidance_scale > 1 (got {guidance_scale}); give 1 or {b} rows, e.g. the empty prompt"),
            )
        })?;
        let u_rows = uncond.text_embeds.dim(0).unwrap_or(0);
        let uncond = self.checked(
            "unconditional",
            uncond,
            Some(if u_rows == 1 { 1 } else { b }),
        )?;
        let uncond = if u_rows == 1 && b > 1 {
            TextConditioning {
                text_embeds: uncond.text_embeds.repeat((b, 1))?,
                hidden_states: uncond.hidden_states.repeat((b, 1, 1))?,
                mask: uncond.mask.repeat((b, 1))?,
            }
        } else {
            uncond
        };
        Ok((b, TextConditioning::cat(&uncond, &cond)?))
    }

    fn check_latents(&self, field: &'static str, latents: &Tensor, rows: usize) -> Result<Tensor> {
        let d = self.embedding_dim();
        if latents.dims() != [rows, d] {
            return Err(ModelError::invalid(
                field,
                format!("shape {:?}, expected ({rows}, {d})", latents.dims()),
            ));
        }
        Ok(latents.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// Runs `run` to its end alone; returns the post-processed latents (B, D).
    fn run_alone(&self, mut run: PriorRun, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        while !run.is_done() {
            self.step_runs(&mut [(&mut run, noise)])?;
        }
        self.finish(run)
    }

    /// The post-processed latents (B, D) of a finished run.
    pub fn finish(&self, run: PriorRun) -> Result<Tensor> {
        self.prior.post_process_latents(&run.latents)
    }

    /// One step of every unfinished run in ONE transformer call (each row with its run's
    /// timestep), then each run's guidance and scheduler step with its own noise. A run's rows
    /// are computed as alone: the transformer attends within a row.
    pub fn step_runs(&self, runs: &mut [(&mut PriorRun, &mut dyn NoiseSource)]) -> Result<()> {
        let active: Vec<usize> = (0..runs.len()).filter(|&i| !runs[i].0.is_done()).collect();
        let mut inputs = Vec::with_capacity(active.len());
        let mut ts = Vec::new();
        for &i in &active {
            let run = &runs[i].0;
            let t = run.timesteps[run.done];
            inputs.push(match run.guidance {
                Some(_) => Tensor::cat(&[&run.latents, &run.latents], 0)?,
                None => run.latents.clone(),
            });
            ts.extend(std::iter::repeat_n(t as f32, run.rows()));
        }
        let pred = match active.as_slice() {
            [] => return Ok(()),
            [one] => {
                let c = &runs[*one].0.cond;
                self.prior.forward(
                    &inputs[0],
                    &ts,
                    &c.text_embeds,
                    &c.hidden_states,
                    Some(&c.mask),
                )?
            }
            _ => {
                let cat = |f: &dyn Fn(&PriorRun) -> &Tensor| -> Result<Tensor> {
                    let parts: Vec<&Tensor> = active.iter().map(|&i| f(runs[i].0)).collect();
                    Ok(Tensor::cat(&parts, 0)?)
                };
                let text = cat(&|r| &r.cond.text_embeds)?;
                let hidden = cat(&|r| &r.cond.hidden_states)?;
                let mask = cat(&|r| &r.cond.mask)?;
                self.prior
                    .forward(&Tensor::cat(&inputs, 0)?, &ts, &text, &hidden, Some(&mask))?
            }
        };
        let mut offset = 0;
        for &i in &active {
            let (run, noise) = &mut runs[i];
            let rows = run.rows();
            let own = pred.narrow(0, offset, rows)?;
            offset += rows;
            let b = run.latents.dim(0)?;
            let pred = match run.guidance {
                Some(g) => {
                    let u = own.narrow(0, 0, b)?;
                    let c = own.narrow(0, b, b)?;
                    (&u + ((c - &u)? * g as f64)?)?
                }
                None => own,
            };
            let t = run.timesteps[run.done];
            let prev = run.timesteps.get(run.done + 1).copied();
            run.latents = self
                .scheduler
                .step(&pred, t, &run.latents, prev, &mut **noise)?;
            run.done += 1;
        }
        Ok(())
    }

    /// Samples image embeddings (B, D) for B conditioning rows: starts from `latents` (B, D) or,
    /// when `None`, from one noise draw, then runs the UnCLIP schedule. `uncond` (1 or B rows) is
    /// required iff `guidance_scale > 1`.
    pub fn sample(
        &self,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        params: &SampleParams,
        latents: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let run = self.start_sample(cond, uncond, params, latents, noise)?;
        self.run_alone(run, noise)
    }

    /// [`Self::sample`]'s run, checked and at its start (the start noise drawn), to be stepped
    /// with [`Self::step_runs`] and ended with [`Self::finish`].
    pub fn start_sample(
        &self,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        params: &SampleParams,
        latents: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
    ) -> Result<PriorRun> {
        check_guidance(params.guidance_scale)?;
        let timesteps = self.scheduler.timesteps(params.num_inference_steps)?;
        let (rows, batch) = self.batch(cond, uncond, params.guidance_scale)?;
        let latents = match latents {
            Some(l) => self.check_latents("latents", l, rows)?,
            None => noise.randn(&[rows, self.embedding_dim()], &self.device)?,
        };
        Ok(PriorRun::new(
            batch,
            latents,
            timesteps,
            params.guidance_scale,
        ))
    }

    /// The timesteps Emb2Emb runs: the last `int(N·strength)` of the N-step schedule; strength
    /// must be in (0, 1] and leave at least one step.
    pub fn emb2emb_timesteps(
        &self,
        num_inference_steps: usize,
        strength: f64,
    ) -> Result<Vec<usize>> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(ModelError::invalid(
                "strength",
                format!("{strength}, allowed (0, 1]"),
            ));
        }
        let n = num_inference_steps;
        let all = self.scheduler.timesteps(n)?;
        let init = ((n as f64 * strength) as usize).min(n);
        if init == 0 {
            return Err(ModelError::invalid(
                "strength",
                format!(
                    "{strength} runs int({n}·{strength}) = 0 of {n} steps; raise strength or num_inference_steps"
                ),
            ));
        }
        Ok(all[n - init..].to_vec())
    }

    /// Emb2Emb: noises the **raw** image embeddings `init_image_embeds` (B or 1 rows, D) to the
    /// first Emb2Emb timestep (one noise draw) and denoises from there, conditioned as
    /// [`Self::sample`].
    pub fn emb2emb(
        &self,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        init_image_embeds: &Tensor,
        strength: f64,
        params: &SampleParams,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let run = self.start_emb2emb(cond, uncond, init_image_embeds, strength, params, noise)?;
        self.run_alone(run, noise)
    }

    /// [`Self::emb2emb`]'s run at its start (the init embeddings noised), as
    /// [`Self::start_sample`].
    pub fn start_emb2emb(
        &self,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        init_image_embeds: &Tensor,
        strength: f64,
        params: &SampleParams,
        noise: &mut dyn NoiseSource,
    ) -> Result<PriorRun> {
        check_guidance(params.guidance_scale)?;
        let timesteps = self.emb2emb_timesteps(params.num_inference_steps, strength)?;
        let (rows, batch) = self.batch(cond, uncond, params.guidance_scale)?;
        let d = self.embedding_dim();
        let init = match init_image_embeds.dims() {
            [1, w] if *w == d && rows > 1 => self
                .check_latents("init_image_embeds", init_image_embeds, 1)?
                .repeat((rows, 1))?,
            _ => self.check_latents("init_image_embeds", init_image_embeds, rows)?,
        };
        let z = noise.randn(&[rows, d], &self.device)?;
        let latents = self
            .scheduler
            .add_noise(&init, &z, &vec![timesteps[0]; rows])?;
        Ok(PriorRun::new(
            batch,
            latents,
            timesteps,
            params.guidance_scale,
        ))
    }

    /// Weighted fusion over explicit inputs (`interpolate` without its negative output): text
    /// items are sampled in item order with the same `noise` (and `latents`, if given) — as
    /// diffusers reuses one generator — image items are embedded by the vision tower, and the
    /// result is `Σ wᵢ·embᵢ`. Items of one row are broadcast to the rows of the others.
    pub fn fuse(
        &self,
        items: &[FusionInput],
        weights: &[f32],
        uncond: Option<&TextConditioning>,
        params: &SampleParams,
        latents: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        fusion::check_weights(items.len(), weights)?;
        check_guidance(params.guidance_scale)?;
        let mut embeds = Vec::with_capacity(items.len());
        for item in items {
            embeds.push(match item {
                FusionInput::Text(c) => self.sample(c, uncond, params, latents, noise)?,
                FusionInput::Image(img) => self.encode_images(std::slice::from_ref(img))?,
                FusionInput::PixelValues(px) => self.encode_pixels(px)?,
                FusionInput::Embeds(e) => {
                    let k = e.dim(0).unwrap_or(0).max(1);
                    self.check_latents("items", e, k)?
                }
            });
        }
        let rows = embeds
            .iter()
            .map(|e| e.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let max = rows.iter().copied().max().unwrap_or(1);
        let embeds = embeds
            .into_iter()
            .zip(&rows)
            .map(|(e, &r)| match r {
                1 if max > 1 => Ok(e.repeat((max, 1))?),
                _ => Ok(e),
            })
            .collect::<Result<Vec<_>>>()?;
        fusion::weighted_sum(&embeds, weights)
    }
}
