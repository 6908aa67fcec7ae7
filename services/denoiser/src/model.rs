//! The loaded decoder: UNet, the checkpoint's scheduler config, the MoVQ scale factor, and the
//! per-request scheduler construction (diffusers' `XScheduler.from_config(checkpoint_config)`).

use crate::budget::StepCost;
use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::decoder::{
    latent_side, run_decoder, DecoderInputs, DecoderMode, DecoderOutcome, DecoderText,
};
use kd_models::noise::SeededNoise;
use kd_models::schedulers::{self, Scheduler};
use kd_models::unet::UNet2DConditionModel;
use kd_models::{CheckpointDir, ModelFamily, Variant};
use kd_proto::v1;
use kd_runtime::budget::{self, Cost};
use kd_runtime::ServiceError;
use std::path::Path;

/// Everything a request needs from the checkpoint; immutable and shared by all requests.
pub struct DecoderModel {
    /// The decoder UNet (4-channel text2img/img2img, 9-channel inpaint, or ControlNet).
    pub unet: UNet2DConditionModel,
    /// The checkpoint's `scheduler/scheduler_config.json` as a JSON object.
    pub scheduler_json: serde_json::Map<String, serde_json::Value>,
    /// The checkpoint's own scheduler class name.
    pub scheduler_class: String,
    /// MoVQ scale factor 2^(levels−1) (8 for Kandinsky 2.2, 2 for the tiny fixture).
    pub movq_scale_factor: usize,
    /// The UNet config's `in_channels`.
    pub in_channels: usize,
    /// Compute device.
    pub device: Device,
    /// Compute dtype of the UNet weights.
    pub dtype: DType,
    /// Whether the checkpoint is a few-step distilled student (its own scheduler is LCM or
    /// TCD): no classifier-free guidance, a few-step default schedule.
    pub distilled: bool,
    /// The schedule of a request that names neither steps nor timesteps.
    pub default_schedule: Schedule,
    /// What `Info` returns.
    pub info: v1::ModelInfo,
    /// One step's cost on this device, calibrated at warm-up (zero until then: no refusals).
    pub cost: StepCost,
}

/// A request's schedule: N spaced steps, or an explicit descending list (LCM, TCD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Steps(usize),
    Timesteps(Vec<usize>),
}

impl Schedule {
    /// The number of UNet steps (before img2img's strength).
    pub fn steps(&self) -> usize {
        match self {
            Self::Steps(n) => *n,
            Self::Timesteps(ts) => ts.len(),
        }
    }
}

/// Default steps of a teacher (the public API's documented default).
pub const TEACHER_DEFAULT_STEPS: usize = 50;
/// Default steps of a distilled student (diffusers' LCM pipelines default to 4).
pub const STUDENT_DEFAULT_STEPS: usize = 4;

/// `--default-steps` / `--default-timesteps`: the schedule of a request that names neither.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ScheduleArgs {
    /// Steps a request gets when it names neither steps nor timesteps (default: 4 for a
    /// distilled student, whose scheduler is LCM or TCD; 50 otherwise).
    #[arg(long, env = "KD_DEFAULT_STEPS")]
    pub default_steps: Option<usize>,
    /// An explicit default schedule instead, strictly descending, e.g. `999,749,499,249` (a
    /// DMD2 student); the checkpoint's scheduler must be LCM or TCD.
    #[arg(long, env = "KD_DEFAULT_TIMESTEPS", value_delimiter = ',')]
    pub default_timesteps: Vec<usize>,
}

impl std::fmt::Debug for DecoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderModel")
            .field("scheduler_class", &self.scheduler_class)
            .field("movq_scale_factor", &self.movq_scale_factor)
            .field("in_channels", &self.in_channels)
            .field("info", &self.info)
            .finish()
    }
}

/// The scheduler class a request's `scheduler` enum names (`Ok(None)` = the checkpoint's own);
/// PLMS is Kandinsky 2.0's sampler, not a diffusers decoder's.
pub fn scheduler_class(s: v1::Scheduler) -> Result<Option<&'static str>, ServiceError> {
    Ok(match s {
        v1::Scheduler::Plms => {
            return Err(ServiceError::invalid(
                "scheduler",
                "SCHEDULER_PLMS is Kandinsky 2.0's sampler; allowed here: SCHEDULER_UNSPECIFIED, \
                 SCHEDULER_DDPM, SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP, SCHEDULER_LCM, \
                 SCHEDULER_TCD",
            ))
        }
        v1::Scheduler::Unspecified => None,
        v1::Scheduler::Ddpm => Some("DDPMScheduler"),
        v1::Scheduler::Ddim => Some("DDIMScheduler"),
        v1::Scheduler::DpmSolverPp => Some("DPMSolverMultistepScheduler"),
        v1::Scheduler::Lcm => Some("LCMScheduler"),
        v1::Scheduler::Tcd => Some("TCDScheduler"),
    })
}

impl DecoderModel {
    /// Loads the decoder folder's UNet, scheduler config and MoVQ scale factor, with the
    /// default schedule of a teacher or a student.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with(dir, device, dtype, &ScheduleArgs::default())
    }

    /// [`DecoderModel::load`] with the default schedule `defaults` (checked against the
    /// checkpoint's scheduler).
    pub fn load_with(
        dir: &Path,
        device: &Device,
        dtype: DType,
        defaults: &ScheduleArgs,
    ) -> anyhow::Result<Self> {
        Self::load_from(&CheckpointDir::open(dir)?, device, dtype, defaults)
    }

    /// [`DecoderModel::load_with`] of an opened folder.
    pub fn load_from(
        ckpt: &CheckpointDir,
        device: &Device,
        dtype: DType,
        defaults: &ScheduleArgs,
    ) -> anyhow::Result<Self> {
        let dir = ckpt.root();
        let unet_dir = ckpt.component("unet")?;
        let cfg = unet_dir.unet_config()?;
        let variant = if dtype == DType::F32 {
            Variant::Default
        } else {
            Variant::Fp16
        };
        let vb = unet_dir.weights(variant)?.var_builder(dtype, device);
        let unet = UNet2DConditionModel::new(&cfg, vb)?;
        let sched_dir = ckpt.component("scheduler")?;
        // Validates it as the checkpoint's own scheduler.
        sched_dir.scheduler_config()?;
        let path = sched_dir.path.join("scheduler_config.json");
        let scheduler_json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let scheduler_class = scheduler_json
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let movq_scale_factor = ckpt.component("movq")?.vq_config()?.scale_factor();
        // The family is the folder's; the UNet's conditioning must be that family's.
        let family = ckpt.family();
        anyhow::ensure!(
            unet.takes_text() == (family == ModelFamily::Kandinsky21),
            "{}: a {family:?} folder whose UNet {} text conditioning (addition_embed_type {:?})",
            dir.display(),
            if unet.takes_text() {
                "takes"
            } else {
                "takes no"
            },
            cfg.addition_embed_type
        );
        let mut info = kd_runtime::model_info::model_info(
            ckpt,
            "unet",
            &["unet", "scheduler", "movq"],
            dtype,
            device,
        )?;
        let distilled = matches!(scheduler_class.as_str(), "LCMScheduler" | "TCDScheduler");
        let default_schedule = match (&defaults.default_timesteps[..], defaults.default_steps) {
            ([], Some(n)) => Schedule::Steps(n),
            ([], None) if distilled => Schedule::Steps(STUDENT_DEFAULT_STEPS),
            ([], None) => Schedule::Steps(TEACHER_DEFAULT_STEPS),
            (ts, _) => Schedule::Timesteps(ts.to_vec()),
        };
        info.distilled = distilled;
        info.decoder_kind = if unet.sample_channels() == 9 {
            v1::DecoderKind::Inpaint
        } else if unet.takes_hint() {
            v1::DecoderKind::Controlnet
        } else {
            v1::DecoderKind::TextToImage
        } as i32;
        info.default_steps = default_schedule.steps().try_into()?;
        if let Schedule::Timesteps(ts) = &default_schedule {
            info.default_timesteps = ts
                .iter()
                .map(|&t| u32::try_from(t))
                .collect::<Result<_, _>>()?;
        }
        let model = Self {
            unet,
            scheduler_json,
            scheduler_class,
            movq_scale_factor,
            in_channels: cfg.in_channels,
            device: device.clone(),
            dtype,
            distilled,
            default_schedule,
            info,
            cost: StepCost::default(),
        };
        model.check_default_schedule()?;
        Ok(model)
    }

    /// The default schedule must be one the checkpoint's scheduler takes.
    fn check_default_schedule(&self) -> anyhow::Result<()> {
        let mut s = self.scheduler(v1::Scheduler::Unspecified)?;
        let (flag, result) = match &self.default_schedule {
            Schedule::Steps(0) => ("--default-steps", Err(anyhow::anyhow!("0; allowed: ≥ 1"))),
            Schedule::Steps(n) => ("--default-steps", s.set_timesteps(*n).map_err(Into::into)),
            Schedule::Timesteps(ts) => (
                "--default-timesteps",
                s.set_custom_timesteps(ts).map_err(Into::into),
            ),
        };
        result.map_err(|e| {
            anyhow::anyhow!(
                "{flag} does not suit this checkpoint's {}: {e}",
                self.scheduler_class
            )
        })
    }

    /// The scheduler config for a request: the checkpoint's JSON with `_class_name` replaced
    /// (keys of the other class are ignored, missing keys take this class's defaults), as
    /// diffusers' `XScheduler.from_config(checkpoint_config)` builds it.
    pub fn scheduler_config(&self, choice: v1::Scheduler) -> Result<SchedulerConfig, ServiceError> {
        let mut json = self.scheduler_json.clone();
        if let Some(class) = scheduler_class(choice)? {
            json.insert("_class_name".into(), class.into());
        }
        let cfg: SchedulerConfig = serde_json::from_value(serde_json::Value::Object(json))
            .map_err(|e| {
                ServiceError::invalid(
                    "scheduler",
                    format!(
                        "{choice:?} cannot be built from this checkpoint's scheduler config: {e}"
                    ),
                )
            })?;
        if matches!(cfg, SchedulerConfig::UnClip(_)) {
            return Err(ServiceError::invalid(
                "scheduler",
                "the checkpoint's scheduler is UnCLIPScheduler (a prior scheduler); allowed: SCHEDULER_DDPM, SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP, SCHEDULER_LCM, SCHEDULER_TCD",
            ));
        }
        Ok(cfg)
    }

    /// A fresh scheduler for one request, stepped as the diffusers pipelines step it (DDIM
    /// with eta 0, TCD with γ 0.3).
    pub fn scheduler(&self, choice: v1::Scheduler) -> Result<Box<dyn Scheduler>, ServiceError> {
        let cfg = self.scheduler_config(choice)?;
        schedulers::from_config(&cfg, schedulers::pipeline_eta(&cfg))
            .map_err(|e| ServiceError::invalid("scheduler", format!("{choice:?}: {e}")))
    }

    /// Whether this is an inpainting (9-channel) UNet.
    pub fn is_inpaint(&self) -> bool {
        self.unet.sample_channels() == 9
    }

    /// One denoising step at the smallest size (64×64 pixels), CFG on, in this UNet's mode.
    pub fn warm_up(&self) -> Result<(), ServiceError> {
        self.step_at(64).map(drop)
    }

    /// Times one CFG step (two UNet rows) at 64² and at 128² pixels: the cost per latent pixel
    /// ([`crate::budget::calibrate`]).
    pub fn calibrate(&self) -> Result<Cost, ServiceError> {
        let lp = |side: usize| latent_side(side, self.movq_scale_factor).pow(2) as f64;
        crate::budget::calibrate(lp, |side| self.step_at(side))
    }

    /// One denoising step at `side`² pixels, CFG on, in this UNet's mode: how long it took.
    fn step_at(&self, side: usize) -> Result<std::time::Duration, ServiceError> {
        let dev = &self.device;
        let d = self.unet.embed_dim();
        let (h, w) = (side, side);
        let lh = latent_side(h, self.movq_scale_factor);
        let lw = latent_side(w, self.movq_scale_factor);
        let embeds = Tensor::zeros((1, d), DType::F32, dev)?;
        let image_latents = Tensor::zeros((1, 4, lh, lw), DType::F32, dev)?;
        let mask = Tensor::ones((1, 1, lh, lw), DType::F32, dev)?;
        let hint = Tensor::zeros((1, 3, 8 * lh, 8 * lw), DType::F32, dev)?;
        // Kandinsky 2.1: zero text conditioning of the UNet's widths (one 77-token row).
        let text = match (self.unet.text_embed_dim(), self.unet.text_hidden_dim()) {
            (Some(e), Some(hd)) => {
                let te = Tensor::zeros((1, e), DType::F32, dev)?;
                let hs = Tensor::zeros((1, 77, hd), DType::F32, dev)?;
                DecoderText::new(te.clone(), hs.clone(), te, hs)
            }
            _ => DecoderText::default(),
        };
        let mode = if self.is_inpaint() {
            DecoderMode::Inpaint {
                image_latents,
                mask,
            }
        } else if self.unet.takes_hint() {
            DecoderMode::Controlnet { hint }
        } else {
            DecoderMode::Text2Img
        };
        let inputs = DecoderInputs {
            image_embeds: embeds.clone(),
            negative_image_embeds: Some(embeds),
            height: h,
            width: w,
            movq_scale_factor: self.movq_scale_factor,
            num_inference_steps: 1,
            timesteps: None,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
            latents: None,
            mode,
            text,
        };
        let mut scheduler = self.scheduler(v1::Scheduler::Unspecified)?;
        let mut noise = SeededNoise::new(&[0]);
        budget::time_to_host(|| {
            let out = run_decoder(
                &self.unet,
                scheduler.as_mut(),
                &inputs,
                &mut noise,
                &mut |_| true,
            )?;
            match out {
                DecoderOutcome::Finished(latents) => Ok(latents),
                DecoderOutcome::Cancelled { .. } => Err(ServiceError::Internal(
                    "the warm-up step stopped without a reason".into(),
                )),
            }
        })
    }
}

impl DecoderModel {
    /// Opens the device, loads the decoder folder `ckpt` (opened from `args`' model dir) and
    /// runs one warm-up step.
    pub fn load_and_warm(
        args: &kd_runtime::config::StageArgs,
        ckpt: &CheckpointDir,
        defaults: &ScheduleArgs,
    ) -> Result<Self, ServiceError> {
        let device = args.open_device()?;
        let mut model = Self::load_from(ckpt, &device, args.dtype, defaults).map_err(|e| {
            ServiceError::Unavailable(format!("loading {}: {e:#}", args.model_dir.display()))
        })?;
        model.warm_up()?;
        model.cost = StepCost(model.calibrate()?, args.admission_safety);
        tracing::info!(
            model_dir = %args.model_dir.display(),
            info = ?model.info,
            step_fixed_ms = model.cost.0.fixed_s * 1e3,
            step_per_latent_pixel_us = model.cost.0.per_unit_s * 1e6,
            "denoiser ready"
        );
        Ok(model)
    }
}

impl kd_runtime::StageModel for DecoderModel {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
