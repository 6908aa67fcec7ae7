//! The Kandinsky 2.2 and 2.1 decoder loops at the latent level: image embeddings (and, for 2.1,
//! M-CLIP text conditioning) → final latents (the MoVQ `decode` input), as diffusers'
//! `KandinskyV22Pipeline`, `…Img2ImgPipeline`, `…InpaintPipeline` and `…ControlnetPipeline`
//! run it (spec §2.5–2.8), and as `KandinskyPipeline`, `KandinskyImg2ImgPipeline` and
//! `KandinskyInpaintPipeline` (`pipelines/kandinsky/`, spec §9) do. The UNet picks the
//! generation (a 2.1 UNet takes text conditioning, [`DecoderText`]); the 2.1 differences:
//!
//! * the UNet also gets the text conditioning, arranged like the image embeddings
//!   (`[negative…, positive…]` under CFG, each repeat-interleaved per image); diffusers does not
//!   pass the text attention mask to the UNet;
//! * img2img noises the image latents (times `init_noise_sigma`) with the pipeline's own
//!   `add_noise` (linear β 0.0001…0.02, 1000 steps) at `int(num_train_timesteps·strength) − 2`,
//!   not with the scheduler at the first remaining timestep;
//! * inpainting never blends the known latents back in (neither per step nor at the end).
//!
//! * Classifier-free guidance iff `guidance_scale > 1`, batch order `[negative…, positive…]`,
//!   ε = u + s·(c − u); the variance channels come from the conditional half and are dropped
//!   unless the scheduler learns its variance.
//! * Latent size `ceil(H / sf²)·sf` with sf = the MoVQ scale factor (8 for the real MoVQ).
//! * Noise: initial latents (unless given) and every scheduler draw come from one
//!   [`NoiseSource`], in diffusers' draw order.
//! * A per-step callback sees the progress and may stop the loop (cancellation within one step).
//! * Every input rule lives in [`DecoderInputs::validate`], which the loop runs first.

mod inputs;
mod mask;

pub use inputs::{DecoderInputs, DecoderMode, DecoderPlan, DecoderText, MAX_TEXT_TOKENS};
pub use mask::{prepare_inpaint_mask, prepare_mask};

use crate::error::{ModelError, Result};
use crate::interrupt::{self, Stop};
use crate::noise::NoiseSource;
use crate::schedulers::betas::{alphas_cumprod, linspace_f32};
use crate::schedulers::ddpm::add_noise_at;
use crate::schedulers::Scheduler;
use crate::unet::{UNet2DConditionModel, UNetConditioning};
use candle_core::{DType, Tensor};

/// What the per-step callback sees.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress<'a> {
    /// Index of the step just finished (0-based).
    pub step: usize,
    /// Number of steps this run makes.
    pub total: usize,
    /// The timestep just stepped from.
    pub timestep: usize,
    /// Latents after this step (after the inpaint blend).
    pub latents: &'a Tensor,
    /// The scheduler's x0 estimate at this step, when it has one.
    pub pred_original_sample: Option<&'a Tensor>,
}

/// How a decoder run ended.
#[derive(Debug, Clone)]
pub enum DecoderOutcome {
    /// All steps ran; the final latents (B·n, 4, h, w), f32.
    Finished(Tensor),
    /// The callback asked to stop after `steps_done` steps.
    Cancelled {
        /// Steps completed before stopping.
        steps_done: usize,
    },
}

impl DecoderOutcome {
    /// The final latents, or an error if the run was cancelled.
    pub fn into_latents(self) -> Result<Tensor> {
        match self {
            Self::Finished(t) => Ok(t),
            Self::Cancelled { steps_done } => Err(ModelError::invalid(
                "decoder",
                format!("cancelled after {steps_done} steps"),
            )),
        }
    }
}

/// Latent side for an image side: `ceil(side / sf²)·sf`.
pub fn latent_side(side: usize, movq_scale_factor: usize) -> usize {
    let sf2 = movq_scale_factor * movq_scale_factor;
    side.div_ceil(sf2) * movq_scale_factor
}

/// Repeats each batch row `n` times (`repeat_interleave(n, dim=0)`).
fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// Brings a validated (1 or B, …) per-image input to batch B·n (repeat_interleave n), f32.
fn per_image(x: &Tensor, b: usize, n: usize) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let x = if x.dim(0)? == 1 && b > 1 {
        let mut reps = vec![1; x.rank()];
        reps[0] = b;
        x.repeat(reps)?
    } else {
        x
    };
    repeat_interleave(&x, n)
}

/// The loop's fixed inputs: (2·)B·n image embeddings, the 2.1 text conditioning, the
/// ControlNet hint and the inpaint state.
struct Conditioning {
    embeds: Tensor,
    text: Option<(Tensor, Tensor)>,
    hint: Option<Tensor>,
    inpaint: Option<Inpaint>,
}

/// Runs the decoder loop and returns the final latents (or the cancellation point).
/// `scheduler` is a fresh per-request scheduler; `on_step` returns `false` to stop. The inputs
/// are checked first by [`DecoderInputs::validate`].
pub fn run_decoder(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    inputs: &DecoderInputs,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<DecoderOutcome> {
    run_decoder_interruptible(unet, scheduler, inputs, noise, on_step, &interrupt::never)
}

/// [`run_decoder`] whose UNet calls ask `stop` between layers: a step at a large size stops
/// within one layer with [`ModelError::Interrupted`].
pub fn run_decoder_interruptible(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    inputs: &DecoderInputs,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
    stop: Stop,
) -> Result<DecoderOutcome> {
    let mut run = DecoderRun::start(unet, scheduler, inputs, noise)?;
    while !run.is_done() {
        let rows = run.unet_rows()?;
        let mut cond = UNetConditioning::image(rows.embeds).with_hint(rows.hint);
        if let Some((te, hs)) = rows.text {
            cond = cond.with_text(te, hs);
        }
        let out = unet.forward_interruptible(&rows.sample, rows.timestep as f64, &cond, stop)?;
        let step = run.finish_step(&out, scheduler, noise)?;
        if !on_step(run.progress(&step)) {
            return Ok(DecoderOutcome::Cancelled {
                steps_done: run.steps_done(),
            });
        }
    }
    Ok(DecoderOutcome::Finished(run.finish()?))
}

/// One request's decoder loop as a state machine (owning its state, so a serving loop can keep
/// runs of many requests), one UNet call per step: [`DecoderRun::unet_rows`]
/// gives the step's UNet input rows, [`DecoderRun::finish_step`] takes the UNet's output for
/// them. [`run_decoder`] drives one run alone; [`step_runs`] steps several runs (each with its own
/// scheduler, schedule, guidance and noise) in one UNet call.
pub struct DecoderRun {
    guidance_scale: f64,
    timesteps: Vec<usize>,
    done: usize,
    latents: Tensor,
    c: Conditioning,
    bn: usize,
    cfg: bool,
    learned: bool,
    /// The scheduler's x0 estimate at the last step, when it has one.
    pred_original: Option<Tensor>,
}

/// A run's UNet input for its next step.
pub struct UNetRows<'r> {
    /// (rows, C, h, w): the latents (twice under CFG) with the inpaint channels.
    pub sample: Tensor,
    /// The step's timestep (the same for every row of this run).
    pub timestep: usize,
    /// Image embeddings, one per row.
    pub embeds: &'r Tensor,
    /// ControlNet hint rows.
    pub hint: Option<&'r Tensor>,
    /// Kandinsky 2.1 text conditioning rows.
    pub text: Option<(&'r Tensor, &'r Tensor)>,
}

impl DecoderRun {
    /// Validates `inputs`, sets `scheduler`'s timesteps and draws the initial latents.
    pub fn start(
        unet: &UNet2DConditionModel,
        scheduler: &mut dyn Scheduler,
        inputs: &DecoderInputs,
        noise: &mut dyn NoiseSource,
    ) -> Result<Self> {
        let plan = inputs.validate(unet, &*scheduler)?;
        match &inputs.timesteps {
            Some(ts) => scheduler.set_custom_timesteps(ts)?,
            None => scheduler.set_timesteps(inputs.num_inference_steps)?,
        }
        let mut timesteps = scheduler.timesteps().to_vec();
        if let DecoderMode::Img2Img { strength, .. } = inputs.mode {
            let steps = timesteps.len();
            let init = ((steps as f64 * strength) as usize).min(steps);
            timesteps = timesteps[steps - init..].to_vec();
        }
        let latents = initial_latents(unet, scheduler, inputs, &plan, &timesteps, noise)?;
        let c = conditioning(unet, inputs, &plan, &latents)?;
        Ok(Self {
            guidance_scale: inputs.guidance_scale,
            timesteps,
            done: 0,
            latents,
            c,
            bn: plan.latent_shape[0],
            cfg: plan.cfg,
            learned: scheduler.learned_variance(),
            pred_original: None,
        })
    }

    /// Whether every step has run.
    pub fn is_done(&self) -> bool {
        self.done == self.timesteps.len()
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// Steps this run makes (img2img: the last part of the schedule only).
    pub fn total_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The UNet input of the next step (call only while not [`Self::is_done`]).
    pub fn unet_rows(&self) -> Result<UNetRows<'_>> {
        let x_in = double(self.latents.clone(), self.cfg)?;
        let sample = match &self.c.inpaint {
            Some(ip) => Tensor::cat(&[&x_in, &ip.extra], 1)?,
            None => x_in,
        };
        Ok(UNetRows {
            sample,
            timestep: self.timesteps[self.done],
            embeds: &self.c.embeds,
            hint: self.c.hint.as_ref(),
            text: self.c.text.as_ref().map(|(te, hs)| (te, hs)),
        })
    }

    /// Rows of this run's UNet input (twice the images under CFG).
    pub fn rows(&self) -> usize {
        if self.cfg {
            2 * self.bn
        } else {
            self.bn
        }
    }

    /// Applies the UNet's output for [`Self::unet_rows`]: guidance, the scheduler step and the
    /// inpaint blend. Returns the scheduler's step output.
    pub fn finish_step(
        &mut self,
        unet_out: &Tensor,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
    ) -> Result<crate::schedulers::SchedulerStep> {
        let i = self.done;
        let t = self.timesteps[i];
        let out = unet_out.to_dtype(DType::F32)?;
        let out = guide(&out, self.bn, self.cfg, self.learned, self.guidance_scale)?;
        let step = scheduler.step(&out, t, &self.latents, noise)?;
        self.latents = step.prev_sample.clone();
        self.pred_original = step.pred_original_sample.clone();
        if let Some(ip) = self.c.inpaint.as_ref().filter(|ip| ip.blend) {
            let proper = match self.timesteps.get(i + 1) {
                Some(&t_next) => scheduler.add_noise(
                    &ip.image0.broadcast_as(ip.noise.shape())?.contiguous()?,
                    &ip.noise,
                    t_next,
                )?,
                None => ip.image0.clone(),
            };
            self.latents = ip.blend(&proper, &self.latents)?;
        }
        self.done += 1;
        Ok(step)
    }

    /// The progress of the step `finish_step` just returned.
    pub fn progress<'s>(&'s self, step: &'s crate::schedulers::SchedulerStep) -> StepProgress<'s> {
        StepProgress {
            step: self.done - 1,
            total: self.timesteps.len(),
            timestep: self.timesteps[self.done - 1],
            latents: &self.latents,
            pred_original_sample: step.pred_original_sample.as_ref(),
        }
    }

    /// What a preview of the last step shows: the scheduler's x0 estimate, or the latents for
    /// a scheduler without one (DPM-Solver++).
    pub fn preview(&self) -> &Tensor {
        self.pred_original.as_ref().unwrap_or(&self.latents)
    }

    /// The final latents (after the last inpaint blend).
    pub fn finish(self) -> Result<Tensor> {
        Ok(match self.c.inpaint.as_ref().filter(|ip| ip.blend) {
            Some(ip) => ip.blend(&ip.image0, &self.latents)?,
            None => self.latents,
        })
    }
}

/// One step of several runs in ONE UNet call: their rows concatenated (each run's rows at its
/// own timestep), the output split back and applied to each run with its own scheduler and
/// noise. The runs must share the UNet and its latent size; runs that are done are skipped.
/// What each run computes equals its step alone, up to the re-association of batched sums.
pub fn step_runs(
    unet: &UNet2DConditionModel,
    runs: &mut [(&mut DecoderRun, &mut dyn Scheduler, &mut dyn NoiseSource)],
    stop: Stop,
) -> Result<()> {
    let active: Vec<usize> = (0..runs.len()).filter(|&i| !runs[i].0.is_done()).collect();
    if active.is_empty() {
        return Ok(());
    }
    let (mut samples, mut ts, mut embeds, mut hints, mut tes, mut hss) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for &i in &active {
        let r = runs[i].0.unet_rows()?;
        let n = r.sample.dim(0)?;
        ts.extend(std::iter::repeat_n(r.timestep as f64, n));
        samples.push(r.sample);
        embeds.push(r.embeds.clone());
        if let Some(h) = r.hint {
            hints.push(h.clone());
        }
        if let Some((te, hs)) = r.text {
            tes.push(te.clone());
            hss.push(hs.clone());
        }
    }
    let cat = |v: &[Tensor]| -> Result<Option<Tensor>> {
        match v.len() {
            0 => Ok(None),
            n if n == active.len() => Ok(Some(Tensor::cat(v, 0)?)),
            _ => Err(ModelError::invalid(
                "runs",
                "runs of one UNet call must all have (or all lack) a hint and text conditioning",
            )),
        }
    };
    let embeds = Tensor::cat(&embeds, 0)?;
    let (hint, te, hs) = (cat(&hints)?, cat(&tes)?, cat(&hss)?);
    let mut cond = UNetConditioning::image(&embeds).with_hint(hint.as_ref());
    if let (Some(te), Some(hs)) = (&te, &hs) {
        cond = cond.with_text(te, hs);
    }
    let out = unet.forward_rows(&Tensor::cat(&samples, 0)?, &ts, &cond, stop)?;
    let mut row = 0;
    for &i in &active {
        let (run, scheduler, noise) = &mut runs[i];
        let n = run.rows();
        run.finish_step(&out.narrow(0, row, n)?, &mut **scheduler, &mut **noise)?;
        row += n;
    }
    Ok(())
}

/// `[x, x]` under CFG, else `x`.
fn double(x: Tensor, cfg: bool) -> Result<Tensor> {
    Ok(if cfg { Tensor::cat(&[&x, &x], 0)? } else { x })
}

/// ε = u + s·(c − u) under CFG; the variance channels come from the conditional half and are
/// kept only when the scheduler learns its variance.
fn guide(out: &Tensor, bn: usize, cfg: bool, learned: bool, scale: f64) -> Result<Tensor> {
    if !cfg {
        return Ok(if learned {
            out.clone()
        } else {
            out.narrow(1, 0, 4)?
        });
    }
    let (u, c) = (out.narrow(0, 0, bn)?, out.narrow(0, bn, bn)?);
    let eps_u = u.narrow(1, 0, 4)?;
    let eps = (&eps_u + ((c.narrow(1, 0, 4)? - &eps_u)? * scale)?)?;
    Ok(if learned {
        Tensor::cat(&[&eps, &c.narrow(1, 4, c.dim(1)? - 4)?], 1)?
    } else {
        eps
    })
}

/// The starting latents: img2img's noised image latents, else the given or drawn latents
/// times `init_noise_sigma`.
fn initial_latents(
    unet: &UNet2DConditionModel,
    scheduler: &dyn Scheduler,
    inputs: &DecoderInputs,
    plan: &DecoderPlan,
    timesteps: &[usize],
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let shape = plan.latent_shape;
    let dev = inputs.image_embeds.device().clone();
    let (b, n) = (plan.batch, inputs.num_images_per_prompt);
    if let DecoderMode::Img2Img {
        image_latents,
        strength,
        ..
    } = &inputs.mode
    {
        let x = per_image(image_latents, b, n)?;
        let z = noise.randn(&shape, &dev)?;
        return if unet.takes_text() {
            let x = (x * scheduler.init_noise_sigma())?;
            let t = img2img21_timestep(scheduler.num_train_timesteps(), *strength)?;
            let ac = alphas_cumprod(&linspace_f32(0.0001, 0.02, IMG2IMG21_TRAIN_STEPS));
            add_noise_at(&ac, &x, &z, t)
        } else {
            let t0 = *timesteps
                .first()
                .ok_or_else(|| ModelError::invalid("strength", "runs no step"))?;
            scheduler.add_noise(&x, &z, t0)
        };
    }
    let x = match &inputs.latents {
        Some(l) => l.to_dtype(DType::F32)?,
        None => noise.randn(&shape, &dev)?,
    };
    Ok((x * scheduler.init_noise_sigma())?)
}

/// Builds the loop's fixed inputs from validated `inputs`; `latents` are the initial latents
/// (the inpaint re-noising noise).
fn conditioning(
    unet: &UNet2DConditionModel,
    inputs: &DecoderInputs,
    plan: &DecoderPlan,
    latents: &Tensor,
) -> Result<Conditioning> {
    let (b, n, cfg) = (plan.batch, inputs.num_images_per_prompt, plan.cfg);
    let pos = repeat_interleave(&inputs.image_embeds.to_dtype(DType::F32)?, n)?;
    let embeds = if cfg {
        let neg = inputs::required(&inputs.negative_image_embeds, "negative_image_embeds")?;
        Tensor::cat(&[per_image(neg, b, n)?, pos], 0)?
    } else {
        pos
    };
    let text = if unet.takes_text() {
        Some(text_conditioning(&inputs.text, b, n, cfg)?)
    } else {
        None
    };
    let (mut hint, mut inpaint) = (None, None);
    match &inputs.mode {
        DecoderMode::Inpaint {
            image_latents,
            mask,
        } => {
            let img = per_image(image_latents, b, n)?;
            let mask = per_image(mask, b, n)?;
            let masked = img.broadcast_mul(&mask)?;
            inpaint = Some(Inpaint {
                image0: img.narrow(0, 0, 1)?,
                mask0: mask.narrow(0, 0, 1)?,
                extra: double(Tensor::cat(&[&masked, &mask], 1)?, cfg)?,
                noise: latents.clone(),
                blend: !unet.takes_text(),
            });
        }
        DecoderMode::Controlnet { hint: h } | DecoderMode::Img2Img { hint: Some(h), .. } => {
            hint = Some(double(per_image(h, b, n)?, cfg)?)
        }
        DecoderMode::Text2Img | DecoderMode::Img2Img { hint: None, .. } => {}
    }
    Ok(Conditioning {
        embeds,
        text,
        hint,
        inpaint,
    })
}

/// Inpainting state: the first image's latents and mask (diffusers blends with batch
/// element 0 only), the UNet's extra channels, the initial latents used as re-noising noise,
/// and whether to blend at all (2.2 does, 2.1 does not).
struct Inpaint {
    image0: Tensor,
    mask0: Tensor,
    extra: Tensor,
    noise: Tensor,
    blend: bool,
}

impl Inpaint {
    /// `mask·known + (1 − mask)·latents`.
    fn blend(&self, known: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let keep = known.broadcast_mul(&self.mask0)?;
        let inv = (self.mask0.neg()? + 1.0)?;
        Ok(keep.broadcast_add(&latents.broadcast_mul(&inv)?)?)
    }
}

/// Length of the β table of `KandinskyImg2ImgPipeline.add_noise`.
const IMG2IMG21_TRAIN_STEPS: usize = 1000;

/// The 2.1 img2img noising index `int(num_train_timesteps·strength) − 2`, wrapped like a
/// negative Python index into the 1000-entry table.
fn img2img21_timestep(num_train_timesteps: usize, strength: f64) -> Result<usize> {
    let n = IMG2IMG21_TRAIN_STEPS as i64;
    let t = (num_train_timesteps as f64 * strength) as i64 - 2;
    let idx = if t < 0 { t + n } else { t };
    if !(0..n).contains(&idx) {
        return Err(ModelError::invalid(
            "strength",
            format!(
                "{strength} with num_train_timesteps {num_train_timesteps} gives noising timestep {t}; \
                 Kandinsky 2.1 img2img allows −{n}…{} (num_train_timesteps·strength ≤ {})",
                n - 1,
                n + 1
            ),
        ));
    }
    Ok(idx as usize)
}

/// The UNet's 2.1 text inputs (text_embeds, hidden_states) at batch (2·)B·n, arranged like the
/// image embeddings.
fn text_conditioning(t: &DecoderText, b: usize, n: usize, cfg: bool) -> Result<(Tensor, Tensor)> {
    let te = per_image(inputs::required(&t.text_embeds, "text_embeds")?, b, n)?;
    let hs = per_image(
        inputs::required(&t.text_hidden_states, "text_hidden_states")?,
        b,
        n,
    )?;
    if !cfg {
        return Ok((te, hs));
    }
    let neg_te = inputs::required(&t.negative_text_embeds, "negative_text_embeds")?;
    let neg_hs = inputs::required(
        &t.negative_text_hidden_states,
        "negative_text_hidden_states",
    )?;
    Ok((
        Tensor::cat(&[per_image(neg_te, b, n)?, te], 0)?,
        Tensor::cat(&[per_image(neg_hs, b, n)?, hs], 0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img2img21_timestep_matches_python_indexing() {
        assert_eq!(img2img21_timestep(1000, 1.0).unwrap(), 998);
        assert_eq!(img2img21_timestep(1000, 0.3).unwrap(), 298);
        // int(1000·0.001) − 2 = −1 indexes the last entry in torch.
        assert_eq!(img2img21_timestep(1000, 0.001).unwrap(), 999);
        let e = img2img21_timestep(2000, 1.0).unwrap_err().to_string();
        assert!(e.contains("strength") && e.contains("1998"), "{e}");
    }
}
