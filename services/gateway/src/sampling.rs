//! The sampling parameters of a request: what the client set, and the quality presets that fill
//! what it left unset for the model that serves it (a teacher, a few-step distilled student, an
//! aMUSEd model, a Kandinsky 2.0 model). The presets are documented in `gateway.proto`
//! (`Quality`); this module is their one place, and the one place of which `decoder.scheduler`
//! values each family takes.

use crate::models::{is_unclip, needs_prior};
use kd_proto::v1;
use kd_runtime::ServiceError;

/// Most steps (or explicit timesteps) per stage.
pub const MAX_STEPS: u32 = 1000;
/// Largest guidance scale.
pub const MAX_GUIDANCE: f32 = 100.0;
/// Fewest prior steps: the UnCLIP schedule needs two timesteps (diffusers divides by N − 1).
pub const PRIOR_MIN_STEPS: u32 = 2;
/// Guidance of a teacher when unset.
pub const DEFAULT_GUIDANCE: f32 = 4.0;
/// Guidance of a distilled student when unset: none (it was distilled without CFG).
pub const STUDENT_GUIDANCE: f32 = 1.0;
/// aMUSEd's guidance when unset (diffusers' `AmusedPipeline` default).
pub const AMUSED_GUIDANCE: f32 = 10.0;
/// aMUSEd's decoder steps when its denoiser reports none (diffusers' `AmusedPipeline` default).
pub const AMUSED_DEFAULT_STEPS: u32 = 12;
/// aMUSEd's decoder steps of QUALITY_DRAFT and QUALITY_BEST (BALANCED: the denoiser's default).
pub const AMUSED_DRAFT_STEPS: u32 = 8;
pub const AMUSED_BEST_STEPS: u32 = 24;
/// Kandinsky 2.0's guidance when unset (the official `generate_*` default).
pub const KD20_GUIDANCE: f32 = 7.0;
/// Kandinsky 2.0's decoder steps of QUALITY_DRAFT, QUALITY_BALANCED (the model's
/// `default_steps`) and QUALITY_BEST (the official default).
pub const KD20_DRAFT_STEPS: u32 = 25;
pub const KD20_BALANCED_STEPS: u32 = 50;
pub const KD20_BEST_STEPS: u32 = 100;
/// Largest `decoder.masked_tokens.temperature_start` / `temperature_end`.
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Largest `decoder.masked_tokens.aesthetic_score`.
pub const MAX_AESTHETIC_SCORE: f32 = 10.0;

/// What the model that serves a request says about its decoder (its denoiser's `Info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderProfile {
    /// The model's family: aMUSEd samples masked tokens (its own presets, no prior, no
    /// scheduler choice); Kandinsky 2.1 and 2.2 run a diffusion UNet after a prior; Kandinsky
    /// 2.0 a diffusion UNet on its text encoders' outputs, sampled by the official samplers.
    pub family: v1::ModelFamily,
    /// A few-step distilled student.
    pub distilled: bool,
    /// Its default schedule: `default_timesteps` when not empty, else `default_steps` steps.
    pub default_steps: u32,
    pub default_timesteps: Vec<u32>,
    /// What its UNet takes (text-to-image, inpaint, ControlNet).
    pub kind: v1::DecoderKind,
    /// The largest image it computes, height × width (0 = not reported).
    pub max_pixels: u64,
}

impl DecoderProfile {
    /// A Kandinsky 2.2 teacher with the public API's default of 50 decoder steps.
    pub fn teacher() -> Self {
        Self {
            family: v1::ModelFamily::Kandinsky22,
            distilled: false,
            default_steps: 50,
            default_timesteps: Vec::new(),
            kind: v1::DecoderKind::TextToImage,
            max_pixels: 0,
        }
    }

    /// The profile the denoiser reports (`family`, `distilled`, `default_steps`,
    /// `default_timesteps`). A Kandinsky 2.0 model's default schedule is the gateway's
    /// QUALITY_BALANCED preset, [`KD20_BALANCED_STEPS`] (the gateway always sends its steps).
    pub fn of(info: &v1::ModelInfo) -> Self {
        let family = info.family();
        let unreported_steps = match family {
            v1::ModelFamily::Amused => AMUSED_DEFAULT_STEPS,
            _ => Self::teacher().default_steps,
        };
        let (default_steps, default_timesteps) = match family {
            v1::ModelFamily::Kandinsky20 => (KD20_BALANCED_STEPS, Vec::new()),
            _ if info.default_steps == 0 => (unreported_steps, info.default_timesteps.clone()),
            _ => (info.default_steps, info.default_timesteps.clone()),
        };
        Self {
            family,
            distilled: info.distilled,
            default_steps,
            default_timesteps,
            // A denoiser that reports no kind predates the field: a text-to-image UNet.
            kind: match info.decoder_kind() {
                v1::DecoderKind::Unspecified => v1::DecoderKind::TextToImage,
                k => k,
            },
            max_pixels: info.max_pixels,
        }
    }

    /// Whether the model samples masked tokens (aMUSEd).
    pub fn masked_tokens(&self) -> bool {
        self.family == v1::ModelFamily::Amused
    }
}

/// How errors name a family.
pub fn family_label(family: v1::ModelFamily) -> &'static str {
    match family {
        v1::ModelFamily::Amused => "aMUSEd",
        v1::ModelFamily::Kandinsky21 => "Kandinsky 2.1",
        v1::ModelFamily::Kandinsky20 => "Kandinsky 2.0",
        v1::ModelFamily::Kandinsky22 | v1::ModelFamily::Unspecified => "Kandinsky 2.2",
    }
}

/// The sampling fields as the client set them (`None` / empty = unset), checked for range.
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    pub quality: v1::Quality,
    pub prior_steps: Option<u32>,
    pub prior_guidance: Option<f32>,
    pub decoder_steps: Option<u32>,
    pub decoder_timesteps: Vec<u32>,
    pub decoder_guidance: Option<f32>,
    pub scheduler: v1::Scheduler,
    /// aMUSEd's masked-token parameters (`decoder.masked_tokens`), range-checked except the crop
    /// coordinates, which [`check_crop`] bounds by the image size.
    pub masked_tokens: Option<v1::MaskedTokenParams>,
}

/// The sampling of one request on one model, every field resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Prior steps and guidance (0 for a family without a prior).
    pub prior_steps: u32,
    pub prior_guidance: f32,
    /// Decoder UNet steps (the length of `decoder_timesteps` when it is set).
    pub decoder_steps: u32,
    /// An explicit decoder schedule (sent instead of `decoder_steps`), or empty.
    pub decoder_timesteps: Vec<u32>,
    pub decoder_guidance: f32,
    pub scheduler: v1::Scheduler,
}

fn bad(field: &str, msg: impl Into<String>) -> ServiceError {
    ServiceError::invalid(field, msg)
}

fn steps(field: &str, v: Option<u32>, min: u32) -> Result<Option<u32>, ServiceError> {
    match v {
        Some(v) if !(min..=MAX_STEPS).contains(&v) => {
            Err(bad(field, format!("{v}; allowed: {min}..={MAX_STEPS}")))
        }
        v => Ok(v),
    }
}

fn guidance(field: &str, v: Option<f32>) -> Result<Option<f32>, ServiceError> {
    match v {
        Some(v) if !v.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&v) => Err(bad(
            field,
            format!(
                "{v}; allowed: a finite number in 0..={MAX_GUIDANCE} (guidance applies when > 1)"
            ),
        )),
        v => Ok(v),
    }
}

/// A masked-token parameter: unset, or a finite number in `0..=max`.
fn bounded(field: &str, v: Option<f32>, max: f32) -> Result<(), ServiceError> {
    match v {
        Some(v) if !v.is_finite() || !(0.0..=max).contains(&v) => Err(bad(
            field,
            format!("{v}; allowed: a finite number in 0..={max}"),
        )),
        _ => Ok(()),
    }
}

/// The ranges of `decoder.masked_tokens` that do not depend on the image size.
fn check_masked_tokens(p: &v1::MaskedTokenParams) -> Result<(), ServiceError> {
    let field = |name: &str| format!("decoder.masked_tokens.{name}");
    bounded(
        &field("temperature_start"),
        p.temperature_start,
        MAX_TEMPERATURE,
    )?;
    bounded(
        &field("temperature_end"),
        p.temperature_end,
        MAX_TEMPERATURE,
    )?;
    bounded(
        &field("aesthetic_score"),
        p.aesthetic_score,
        MAX_AESTHETIC_SCORE,
    )
}

/// The crop coordinates of `decoder.masked_tokens` within a `width` × `height` image.
pub fn check_crop(
    p: Option<&v1::MaskedTokenParams>,
    width: u32,
    height: u32,
) -> Result<(), ServiceError> {
    let Some(p) = p else { return Ok(()) };
    for (name, v, side, what) in [
        ("crop_top", p.crop_top, height, "height"),
        ("crop_left", p.crop_left, width, "width"),
    ] {
        if v > side {
            return Err(bad(
                &format!("decoder.masked_tokens.{name}"),
                format!("{v}; allowed: 0..={side} (the image {what})"),
            ));
        }
    }
    Ok(())
}

/// The `decoder.scheduler` values an unCLIP Kandinsky (2.1, 2.2) takes.
const UNCLIP_SCHEDULERS: &str = "SCHEDULER_UNSPECIFIED (checkpoint default), SCHEDULER_DDPM, \
                                 SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP, SCHEDULER_LCM, \
                                 SCHEDULER_TCD";

/// The `decoder.scheduler` values a family takes, and why it refuses the others.
struct SchedulerChoice {
    allowed: &'static [v1::Scheduler],
    /// `allowed` as errors list it.
    names: &'static str,
    /// Why the family refuses the others (after "{family} models ").
    why: &'static str,
}

/// The one place of which family takes which `decoder.scheduler`.
fn scheduler_choice(family: v1::ModelFamily) -> SchedulerChoice {
    use v1::Scheduler as S;
    match family {
        v1::ModelFamily::Amused => SchedulerChoice {
            allowed: &[S::Unspecified],
            names: "SCHEDULER_UNSPECIFIED",
            why: "sample masked tokens on their own schedule",
        },
        v1::ModelFamily::Kandinsky20 => SchedulerChoice {
            allowed: &[S::Unspecified, S::Ddpm, S::Ddim, S::Plms],
            names: "SCHEDULER_UNSPECIFIED (= SCHEDULER_DDIM, the official default), \
                    SCHEDULER_DDPM (the official p_sampler), SCHEDULER_DDIM, SCHEDULER_PLMS",
            why: "sample with the official p, DDIM and PLMS samplers only",
        },
        v1::ModelFamily::Kandinsky21
        | v1::ModelFamily::Kandinsky22
        | v1::ModelFamily::Unspecified => SchedulerChoice {
            allowed: &[
                S::Unspecified,
                S::Ddpm,
                S::Ddim,
                S::DpmSolverPp,
                S::Lcm,
                S::Tcd,
            ],
            names: UNCLIP_SCHEDULERS,
            why: "have no PLMS sampler (it is Kandinsky 2.0's)",
        },
    }
}

impl Requested {
    /// Reads and range-checks the sampling fields of `req`.
    pub fn of(req: &v1::GenerateRequest) -> Result<Self, ServiceError> {
        let prior = req.prior.unwrap_or_default();
        let decoder = req.decoder.clone().unwrap_or_default();
        let scheduler = v1::Scheduler::try_from(decoder.scheduler).map_err(|_| {
            bad(
                "decoder.scheduler",
                format!(
                    "{}; allowed: {UNCLIP_SCHEDULERS}, SCHEDULER_PLMS (Kandinsky 2.0 only)",
                    decoder.scheduler
                ),
            )
        })?;
        let quality = v1::Quality::try_from(req.quality).map_err(|_| {
            bad(
                "quality",
                format!(
                    "{}; allowed: QUALITY_UNSPECIFIED (= BALANCED), QUALITY_DRAFT, \
                     QUALITY_BALANCED, QUALITY_BEST",
                    req.quality
                ),
            )
        })?;
        let timesteps = decoder.timesteps;
        if !timesteps.is_empty() {
            if decoder.num_inference_steps.is_some() {
                return Err(bad(
                    "decoder.timesteps",
                    format!(
                        "{} timesteps with decoder.num_inference_steps set; allowed: one of them",
                        timesteps.len()
                    ),
                ));
            }
            check_timesteps(&timesteps)?;
        }
        if let Some(p) = &decoder.masked_tokens {
            check_masked_tokens(p)?;
        }
        Ok(Self {
            quality,
            prior_steps: steps(
                "prior.num_inference_steps",
                prior.num_inference_steps,
                PRIOR_MIN_STEPS,
            )?,
            prior_guidance: guidance("prior.guidance_scale", prior.guidance_scale)?,
            decoder_steps: steps(
                "decoder.num_inference_steps",
                decoder.num_inference_steps,
                1,
            )?,
            decoder_timesteps: timesteps,
            decoder_guidance: guidance("decoder.guidance_scale", decoder.guidance_scale)?,
            scheduler,
            masked_tokens: decoder.masked_tokens,
        })
    }

    /// Refuses the fields the model's family lacks, naming the field, the family and the
    /// allowed values: `decoder.masked_tokens` but for aMUSEd; `prior.*` for the families
    /// without a prior (aMUSEd, Kandinsky 2.0); a `decoder.scheduler` the family does not take
    /// (aMUSEd: any; Kandinsky 2.0: DPM-Solver++, LCM, TCD; Kandinsky 2.1 / 2.2: PLMS);
    /// `decoder.timesteps` but for Kandinsky 2.1 / 2.2.
    pub fn check_family(&self, profile: &DecoderProfile) -> Result<(), ServiceError> {
        let family = family_label(profile.family);
        if self.masked_tokens.is_some() && !profile.masked_tokens() {
            return Err(bad(
                "decoder.masked_tokens",
                format!(
                    "set for a {family} model, which samples no masked tokens; allowed: unset \
                     (aMUSEd models only)"
                ),
            ));
        }
        if !needs_prior(profile.family) {
            let no_prior = |field: &str, v: String| {
                bad(
                    field,
                    format!("{v}; {family} models have no prior; allowed: unset"),
                )
            };
            if let Some(n) = self.prior_steps {
                return Err(no_prior("prior.num_inference_steps", n.to_string()));
            }
            if let Some(g) = self.prior_guidance {
                return Err(no_prior("prior.guidance_scale", g.to_string()));
            }
        }
        let schedulers = scheduler_choice(profile.family);
        if !schedulers.allowed.contains(&self.scheduler) {
            return Err(bad(
                "decoder.scheduler",
                format!(
                    "{}; {family} models {}; allowed: {}",
                    self.scheduler.as_str_name(),
                    schedulers.why,
                    schedulers.names
                ),
            ));
        }
        if !self.decoder_timesteps.is_empty() && !is_unclip(profile.family) {
            return Err(bad(
                "decoder.timesteps",
                format!(
                    "{} timesteps; {family} models take no explicit schedule; allowed: none \
                     (set decoder.num_inference_steps)",
                    self.decoder_timesteps.len()
                ),
            ));
        }
        Ok(())
    }

    /// Fills the unset fields for a model with `profile`, by the quality preset.
    pub fn resolve(&self, profile: &DecoderProfile) -> Result<Sampling, ServiceError> {
        if profile.masked_tokens() {
            return Ok(self.resolve_masked_tokens(profile));
        }
        if profile.family == v1::ModelFamily::Kandinsky20 {
            return Ok(self.resolve_kd20(profile));
        }
        use v1::Quality::*;
        let draft = self.quality == Draft;
        let prior_steps = self.prior_steps.unwrap_or(match self.quality {
            Draft => 10,
            Best => 50,
            Unspecified | Balanced => 25,
        });
        let (decoder_steps, decoder_timesteps, scheduler) = if !self.decoder_timesteps.is_empty() {
            let ts = self.decoder_timesteps.clone();
            (ts.len() as u32, ts, self.scheduler)
        } else if let Some(n) = self.decoder_steps {
            (n, Vec::new(), self.scheduler)
        } else if profile.distilled {
            match (draft, &profile.default_timesteps[..]) {
                (true, _) => (1, Vec::new(), self.scheduler),
                (false, []) => (profile.default_steps, Vec::new(), self.scheduler),
                (false, ts) => (ts.len() as u32, ts.to_vec(), self.scheduler),
            }
        } else {
            let n = match self.quality {
                Draft => 20,
                Best => 100,
                Unspecified | Balanced => profile.default_steps,
            };
            let scheduler = match (draft, self.scheduler) {
                (true, v1::Scheduler::Unspecified) => v1::Scheduler::DpmSolverPp,
                (_, s) => s,
            };
            (n, Vec::new(), scheduler)
        };
        let decoder_guidance = match (self.decoder_guidance, profile.distilled) {
            (Some(g), true) if g > 1.0 => {
                return Err(bad(
                    "decoder.guidance_scale",
                    format!(
                        "{g}; this model is a distilled student, which runs without \
                         classifier-free guidance: allowed 0..=1"
                    ),
                ))
            }
            (Some(g), _) => g,
            (None, true) => STUDENT_GUIDANCE,
            (None, false) => DEFAULT_GUIDANCE,
        };
        Ok(Sampling {
            prior_steps,
            prior_guidance: self.prior_guidance.unwrap_or(DEFAULT_GUIDANCE),
            decoder_steps,
            decoder_timesteps,
            decoder_guidance,
            scheduler,
        })
    }

    /// aMUSEd's presets: decoder steps 8 (DRAFT), the denoiser's default (BALANCED), 24
    /// (BEST); guidance [`AMUSED_GUIDANCE`]; the checkpoint's own schedule, never switched; no
    /// prior. The fields aMUSEd lacks are refused by [`Requested::check_family`].
    fn resolve_masked_tokens(&self, profile: &DecoderProfile) -> Sampling {
        use v1::Quality::*;
        let decoder_steps = self.decoder_steps.unwrap_or(match self.quality {
            Draft => AMUSED_DRAFT_STEPS,
            Best => AMUSED_BEST_STEPS,
            Unspecified | Balanced => profile.default_steps,
        });
        Sampling {
            prior_steps: 0,
            prior_guidance: 0.0,
            decoder_steps,
            decoder_timesteps: Vec::new(),
            decoder_guidance: self.decoder_guidance.unwrap_or(AMUSED_GUIDANCE),
            scheduler: v1::Scheduler::Unspecified,
        }
    }

    /// Kandinsky 2.0's presets: decoder steps [`KD20_DRAFT_STEPS`] (DRAFT), the model's
    /// default, [`KD20_BALANCED_STEPS`] (BALANCED), [`KD20_BEST_STEPS`] (BEST, the official
    /// default); DDIM (the official default sampler) unless the request names one; guidance
    /// [`KD20_GUIDANCE`]; no prior. The fields 2.0 lacks are refused by
    /// [`Requested::check_family`].
    fn resolve_kd20(&self, profile: &DecoderProfile) -> Sampling {
        use v1::Quality::*;
        let decoder_steps = self.decoder_steps.unwrap_or(match self.quality {
            Draft => KD20_DRAFT_STEPS,
            Best => KD20_BEST_STEPS,
            Unspecified | Balanced => profile.default_steps,
        });
        let scheduler = match self.scheduler {
            v1::Scheduler::Unspecified => v1::Scheduler::Ddim,
            s => s,
        };
        Sampling {
            prior_steps: 0,
            prior_guidance: 0.0,
            decoder_steps,
            decoder_timesteps: Vec::new(),
            decoder_guidance: self.decoder_guidance.unwrap_or(KD20_GUIDANCE),
            scheduler,
        }
    }
}

/// An explicit decoder schedule: 1..=1000 strictly descending timesteps below 1000.
fn check_timesteps(ts: &[u32]) -> Result<(), ServiceError> {
    let field = "decoder.timesteps";
    if ts.len() > MAX_STEPS as usize {
        return Err(bad(
            field,
            format!("{} timesteps; allowed: 1..={MAX_STEPS}", ts.len()),
        ));
    }
    if let Some(w) = ts.windows(2).find(|w| w[1] >= w[0]) {
        return Err(bad(
            field,
            format!(
                "{} then {}; allowed: strictly descending timesteps",
                w[0], w[1]
            ),
        ));
    }
    if ts[0] >= MAX_STEPS {
        return Err(bad(
            field,
            format!("starts at {}; allowed: timesteps in 0..=999", ts[0]),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(decoder: v1::DecoderParams, quality: v1::Quality) -> Requested {
        Requested::of(&v1::GenerateRequest {
            decoder: Some(decoder),
            quality: quality as i32,
            ..Default::default()
        })
        .unwrap()
    }

    fn student(ts: &[u32]) -> DecoderProfile {
        DecoderProfile {
            distilled: true,
            default_steps: if ts.is_empty() { 4 } else { ts.len() as u32 },
            default_timesteps: ts.to_vec(),
            ..DecoderProfile::teacher()
        }
    }

    #[test]
    fn teacher_presets() {
        let t = DecoderProfile::teacher();
        let balanced = req(Default::default(), v1::Quality::Unspecified)
            .resolve(&t)
            .unwrap();
        assert_eq!(
            (
                balanced.prior_steps,
                balanced.decoder_steps,
                balanced.scheduler
            ),
            (25, 50, v1::Scheduler::Unspecified)
        );
        assert_eq!(balanced.decoder_guidance, DEFAULT_GUIDANCE);
        let draft = req(Default::default(), v1::Quality::Draft)
            .resolve(&t)
            .unwrap();
        assert_eq!(
            (draft.prior_steps, draft.decoder_steps, draft.scheduler),
            (10, 20, v1::Scheduler::DpmSolverPp)
        );
        let best = req(Default::default(), v1::Quality::Best)
            .resolve(&t)
            .unwrap();
        assert_eq!((best.prior_steps, best.decoder_steps), (50, 100));
        // Explicit fields win over the preset.
        let explicit = req(
            v1::DecoderParams {
                num_inference_steps: Some(7),
                scheduler: v1::Scheduler::Ddim as i32,
                ..Default::default()
            },
            v1::Quality::Draft,
        )
        .resolve(&t)
        .unwrap();
        assert_eq!(
            (explicit.decoder_steps, explicit.scheduler),
            (7, v1::Scheduler::Ddim)
        );
    }

    #[test]
    fn student_presets_and_guidance_rule() {
        let dmd2 = student(&[999, 749, 499, 249]);
        let s = req(Default::default(), v1::Quality::Unspecified)
            .resolve(&dmd2)
            .unwrap();
        assert_eq!(s.decoder_timesteps, vec![999, 749, 499, 249]);
        assert_eq!(s.decoder_steps, 4);
        assert_eq!(s.decoder_guidance, STUDENT_GUIDANCE);
        let draft = req(Default::default(), v1::Quality::Draft)
            .resolve(&dmd2)
            .unwrap();
        assert_eq!((draft.decoder_steps, draft.decoder_timesteps.len()), (1, 0));
        let best = req(Default::default(), v1::Quality::Best)
            .resolve(&student(&[]))
            .unwrap();
        assert_eq!((best.decoder_steps, best.decoder_timesteps.len()), (4, 0));
        let cfg = req(
            v1::DecoderParams {
                guidance_scale: Some(4.0),
                ..Default::default()
            },
            v1::Quality::Unspecified,
        );
        let e = cfg.resolve(&dmd2).unwrap_err().to_string();
        assert!(
            e.contains("decoder.guidance_scale") && e.contains("0..=1"),
            "{e}"
        );
        // A teacher takes the same request.
        cfg.resolve(&DecoderProfile::teacher()).unwrap();
    }

    #[test]
    fn explicit_timesteps_are_checked() {
        let of = |d: v1::DecoderParams| {
            Requested::of(&v1::GenerateRequest {
                decoder: Some(d),
                ..Default::default()
            })
        };
        let e = |ts: &[u32], steps: Option<u32>| {
            of(v1::DecoderParams {
                timesteps: ts.to_vec(),
                num_inference_steps: steps,
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        assert!(e(&[999], Some(4)).contains("one of them"));
        assert!(e(&[499, 999], None).contains("strictly descending"));
        assert!(e(&[999, 999], None).contains("strictly descending"));
        assert!(e(&[1000, 10], None).contains("0..=999"));
        let long: Vec<u32> = (0..1001).rev().collect();
        assert!(e(&long, None).contains("1..=1000"));
        let ok = of(v1::DecoderParams {
            timesteps: vec![999, 749, 499, 249],
            ..Default::default()
        })
        .unwrap()
        .resolve(&DecoderProfile::teacher())
        .unwrap();
        assert_eq!((ok.decoder_steps, ok.decoder_timesteps.len()), (4, 4));
        let q = Requested::of(&v1::GenerateRequest {
            quality: 9,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(q.contains("quality") && q.contains("QUALITY_DRAFT"), "{q}");
    }

    fn amused() -> DecoderProfile {
        DecoderProfile::of(&v1::ModelInfo {
            family: v1::ModelFamily::Amused as i32,
            default_steps: 12,
            decoder_kind: v1::DecoderKind::TextToImage as i32,
            native_size: 256,
            ..Default::default()
        })
    }

    #[test]
    fn amused_presets_keep_its_schedule_and_guidance_ten() {
        let a = amused();
        assert!(a.masked_tokens());
        let run = |d: v1::DecoderParams, q| req(d, q).resolve(&a).unwrap();
        let balanced = run(Default::default(), v1::Quality::Unspecified);
        assert_eq!(
            (
                balanced.decoder_steps,
                balanced.decoder_guidance,
                balanced.scheduler,
                balanced.decoder_timesteps.len()
            ),
            (12, AMUSED_GUIDANCE, v1::Scheduler::Unspecified, 0)
        );
        assert_eq!(
            run(Default::default(), v1::Quality::Balanced).decoder_steps,
            12
        );
        // DRAFT: fewer steps, no switch to DPM-Solver++.
        let draft = run(Default::default(), v1::Quality::Draft);
        assert_eq!(
            (draft.decoder_steps, draft.scheduler),
            (AMUSED_DRAFT_STEPS, v1::Scheduler::Unspecified)
        );
        assert_eq!(
            run(Default::default(), v1::Quality::Best).decoder_steps,
            AMUSED_BEST_STEPS
        );
        // Explicit fields win.
        let explicit = run(
            v1::DecoderParams {
                num_inference_steps: Some(5),
                guidance_scale: Some(3.0),
                ..Default::default()
            },
            v1::Quality::Best,
        );
        assert_eq!(
            (explicit.decoder_steps, explicit.decoder_guidance),
            (5, 3.0)
        );
        // A denoiser that reports no default gets diffusers' 12.
        let unreported = DecoderProfile::of(&v1::ModelInfo {
            family: v1::ModelFamily::Amused as i32,
            ..Default::default()
        });
        assert_eq!(unreported.default_steps, AMUSED_DEFAULT_STEPS);
        // A Kandinsky denoiser that reports none keeps the teacher's 50.
        let k = DecoderProfile::of(&v1::ModelInfo::default());
        assert_eq!((k.default_steps, k.masked_tokens()), (50, false));
    }

    /// The error of `of(req)` then `check_family(profile)`.
    fn refusal(r: v1::GenerateRequest, profile: &DecoderProfile) -> String {
        match Requested::of(&r) {
            Ok(requested) => requested.check_family(profile).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn options_amused_lacks_are_refused_naming_field_and_family() {
        let a = amused();
        let prior = |steps, guidance| v1::GenerateRequest {
            prior: Some(v1::PriorParams {
                num_inference_steps: steps,
                guidance_scale: guidance,
            }),
            ..Default::default()
        };
        let decoder = |d: v1::DecoderParams| v1::GenerateRequest {
            decoder: Some(d),
            ..Default::default()
        };
        let cases = [
            (
                prior(Some(10), None),
                "invalid `prior.num_inference_steps`: 10; aMUSEd models have no prior; \
                 allowed: unset",
            ),
            (
                prior(None, Some(4.0)),
                "invalid `prior.guidance_scale`: 4; aMUSEd models have no prior; allowed: unset",
            ),
            (
                decoder(v1::DecoderParams {
                    scheduler: v1::Scheduler::Ddim as i32,
                    ..Default::default()
                }),
                "invalid `decoder.scheduler`: SCHEDULER_DDIM; aMUSEd models sample masked \
                 tokens on their own schedule; allowed: SCHEDULER_UNSPECIFIED",
            ),
            (
                decoder(v1::DecoderParams {
                    timesteps: vec![999, 499],
                    ..Default::default()
                }),
                "invalid `decoder.timesteps`: 2 timesteps; aMUSEd models take no explicit \
                 schedule; allowed: none (set decoder.num_inference_steps)",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(refusal(r.clone(), &a), want);
            // Kandinsky takes them.
            Requested::of(&r)
                .unwrap()
                .check_family(&DecoderProfile::teacher())
                .unwrap();
        }
        // An empty `prior` message sets nothing: accepted.
        Requested::of(&prior(None, None))
            .unwrap()
            .check_family(&a)
            .unwrap();
    }

    #[test]
    fn masked_tokens_are_amused_only_and_range_checked() {
        let with = |p: v1::MaskedTokenParams| v1::GenerateRequest {
            decoder: Some(v1::DecoderParams {
                masked_tokens: Some(p),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ok = with(v1::MaskedTokenParams {
            temperature_start: Some(100.0),
            temperature_end: Some(0.0),
            aesthetic_score: Some(10.0),
            ..Default::default()
        });
        let requested = Requested::of(&ok).unwrap();
        requested.check_family(&amused()).unwrap();
        assert_eq!(requested.masked_tokens, ok.decoder.unwrap().masked_tokens);
        for family in [v1::ModelFamily::Kandinsky21, v1::ModelFamily::Kandinsky22] {
            let k = DecoderProfile {
                family,
                ..DecoderProfile::teacher()
            };
            let e = refusal(with(Default::default()), &k);
            assert!(
                e.starts_with("invalid `decoder.masked_tokens`: set for a Kandinsky 2.")
                    && e.contains("allowed: unset (aMUSEd models only)"),
                "{e}"
            );
        }
        let bad = [
            (
                v1::MaskedTokenParams {
                    temperature_start: Some(100.5),
                    ..Default::default()
                },
                "invalid `decoder.masked_tokens.temperature_start`: 100.5; allowed: a finite \
                 number in 0..=100",
            ),
            (
                v1::MaskedTokenParams {
                    temperature_end: Some(f32::NAN),
                    ..Default::default()
                },
                "invalid `decoder.masked_tokens.temperature_end`: NaN; allowed: a finite number \
                 in 0..=100",
            ),
            (
                v1::MaskedTokenParams {
                    aesthetic_score: Some(-1.0),
                    ..Default::default()
                },
                "invalid `decoder.masked_tokens.aesthetic_score`: -1; allowed: a finite number \
                 in 0..=10",
            ),
            (
                v1::MaskedTokenParams {
                    aesthetic_score: Some(f32::INFINITY),
                    ..Default::default()
                },
                "invalid `decoder.masked_tokens.aesthetic_score`: inf; allowed: a finite number \
                 in 0..=10",
            ),
        ];
        for (p, want) in bad {
            assert_eq!(Requested::of(&with(p)).unwrap_err().to_string(), want);
        }
        let crop = v1::MaskedTokenParams {
            crop_top: 64,
            crop_left: 65,
            ..Default::default()
        };
        check_crop(Some(&crop), 65, 64).unwrap();
        check_crop(None, 64, 64).unwrap();
        assert_eq!(
            check_crop(Some(&crop), 64, 64).unwrap_err().to_string(),
            "invalid `decoder.masked_tokens.crop_left`: 65; allowed: 0..=64 (the image width)"
        );
        assert_eq!(
            check_crop(Some(&crop), 128, 32).unwrap_err().to_string(),
            "invalid `decoder.masked_tokens.crop_top`: 64; allowed: 0..=32 (the image height)"
        );
    }

    fn kd20() -> DecoderProfile {
        DecoderProfile::of(&v1::ModelInfo {
            family: v1::ModelFamily::Kandinsky20 as i32,
            // What its denoiser reports (the official 100) is not the BALANCED preset.
            default_steps: 100,
            decoder_kind: v1::DecoderKind::TextToImage as i32,
            ..Default::default()
        })
    }

    #[test]
    fn kandinsky_2_0_presets_are_25_50_100_ddim_steps_and_guidance_seven() {
        let k = kd20();
        assert_eq!(
            (k.default_steps, k.masked_tokens()),
            (KD20_BALANCED_STEPS, false)
        );
        let run = |d: v1::DecoderParams, q| req(d, q).resolve(&k).unwrap();
        for (quality, steps) in [
            (v1::Quality::Draft, 25),
            (v1::Quality::Unspecified, 50),
            (v1::Quality::Balanced, 50),
            (v1::Quality::Best, 100),
        ] {
            let s = run(Default::default(), quality);
            assert_eq!(
                (
                    s.decoder_steps,
                    s.scheduler,
                    s.decoder_guidance,
                    s.decoder_timesteps.len(),
                    s.prior_steps
                ),
                (steps, v1::Scheduler::Ddim, KD20_GUIDANCE, 0, 0),
                "{quality:?}"
            );
        }
        // A named sampler and explicit fields win over the preset.
        for scheduler in [
            v1::Scheduler::Ddpm,
            v1::Scheduler::Plms,
            v1::Scheduler::Ddim,
        ] {
            let s = run(
                v1::DecoderParams {
                    scheduler: scheduler as i32,
                    num_inference_steps: Some(7),
                    guidance_scale: Some(1.0),
                    ..Default::default()
                },
                v1::Quality::Draft,
            );
            assert_eq!(
                (s.decoder_steps, s.scheduler, s.decoder_guidance),
                (7, scheduler, 1.0)
            );
        }
    }

    #[test]
    fn options_kandinsky_2_0_lacks_are_refused_naming_field_family_and_allowed_values() {
        let k = kd20();
        let decoder = |d: v1::DecoderParams| v1::GenerateRequest {
            decoder: Some(d),
            ..Default::default()
        };
        let scheduler = |s: v1::Scheduler| {
            decoder(v1::DecoderParams {
                scheduler: s as i32,
                ..Default::default()
            })
        };
        let kd20_schedulers = "allowed: SCHEDULER_UNSPECIFIED (= SCHEDULER_DDIM, the official \
                               default), SCHEDULER_DDPM (the official p_sampler), \
                               SCHEDULER_DDIM, SCHEDULER_PLMS";
        let cases = [
            (
                v1::GenerateRequest {
                    prior: Some(v1::PriorParams {
                        num_inference_steps: Some(10),
                        guidance_scale: None,
                    }),
                    ..Default::default()
                },
                "invalid `prior.num_inference_steps`: 10; Kandinsky 2.0 models have no prior; \
                 allowed: unset"
                    .to_string(),
            ),
            (
                v1::GenerateRequest {
                    prior: Some(v1::PriorParams {
                        num_inference_steps: None,
                        guidance_scale: Some(4.0),
                    }),
                    ..Default::default()
                },
                "invalid `prior.guidance_scale`: 4; Kandinsky 2.0 models have no prior; allowed: \
                 unset"
                    .to_string(),
            ),
            (
                decoder(v1::DecoderParams {
                    timesteps: vec![999, 499],
                    ..Default::default()
                }),
                "invalid `decoder.timesteps`: 2 timesteps; Kandinsky 2.0 models take no \
                 explicit schedule; allowed: none (set decoder.num_inference_steps)"
                    .to_string(),
            ),
            (
                decoder(v1::DecoderParams {
                    masked_tokens: Some(Default::default()),
                    ..Default::default()
                }),
                "invalid `decoder.masked_tokens`: set for a Kandinsky 2.0 model, which samples \
                 no masked tokens; allowed: unset (aMUSEd models only)"
                    .to_string(),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(refusal(r, &k), want);
        }
        for s in [
            v1::Scheduler::Lcm,
            v1::Scheduler::Tcd,
            v1::Scheduler::DpmSolverPp,
        ] {
            assert_eq!(
                refusal(scheduler(s), &k),
                format!(
                    "invalid `decoder.scheduler`: {}; Kandinsky 2.0 models sample with the \
                     official p, DDIM and PLMS samplers only; {kd20_schedulers}",
                    s.as_str_name()
                )
            );
        }
        for s in [
            v1::Scheduler::Unspecified,
            v1::Scheduler::Ddpm,
            v1::Scheduler::Ddim,
            v1::Scheduler::Plms,
        ] {
            Requested::of(&scheduler(s))
                .unwrap()
                .check_family(&k)
                .unwrap();
        }
    }

    #[test]
    fn plms_is_kandinsky_2_0_only() {
        let plms = Requested::of(&v1::GenerateRequest {
            decoder: Some(v1::DecoderParams {
                scheduler: v1::Scheduler::Plms as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        for (family, label) in [
            (v1::ModelFamily::Kandinsky22, "Kandinsky 2.2"),
            (v1::ModelFamily::Kandinsky21, "Kandinsky 2.1"),
        ] {
            let p = DecoderProfile {
                family,
                ..DecoderProfile::teacher()
            };
            assert_eq!(
                plms.check_family(&p).unwrap_err().to_string(),
                format!(
                    "invalid `decoder.scheduler`: SCHEDULER_PLMS; {label} models have no PLMS \
                     sampler (it is Kandinsky 2.0's); allowed: {UNCLIP_SCHEDULERS}"
                )
            );
        }
        let e = plms.check_family(&amused()).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid `decoder.scheduler`: SCHEDULER_PLMS; aMUSEd"),
            "{e}"
        );
        plms.check_family(&kd20()).unwrap();
        // An unknown value lists every scheduler, PLMS marked as 2.0's.
        let e = Requested::of(&v1::GenerateRequest {
            decoder: Some(v1::DecoderParams {
                scheduler: 42,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("SCHEDULER_TCD, SCHEDULER_PLMS (Kandinsky 2.0 only)"),
            "{e}"
        );
    }
}
