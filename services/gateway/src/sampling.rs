//! The sampling parameters of a request: what the client set, and the quality presets that fill
//! what it left unset for the model that serves it (a teacher or a few-step distilled student).
//! The presets are documented in `gateway.proto` (`Quality`); this module is their one place.

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

/// What the model that serves a request says about its decoder (its denoiser's `Info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderProfile {
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
    /// A teacher with the public API's default of 50 decoder steps.
    pub fn teacher() -> Self {
        Self {
            distilled: false,
            default_steps: 50,
            default_timesteps: Vec::new(),
            kind: v1::DecoderKind::TextToImage,
            max_pixels: 0,
        }
    }

    /// The profile the denoiser reports (`distilled`, `default_steps`, `default_timesteps`).
    pub fn of(info: &v1::ModelInfo) -> Self {
        let teacher = Self::teacher();
        Self {
            distilled: info.distilled,
            default_steps: if info.default_steps == 0 {
                teacher.default_steps
            } else {
                info.default_steps
            },
            default_timesteps: info.default_timesteps.clone(),
            // A denoiser that reports no kind predates the field: a text-to-image UNet.
            kind: match info.decoder_kind() {
                v1::DecoderKind::Unspecified => v1::DecoderKind::TextToImage,
                k => k,
            },
            max_pixels: info.max_pixels,
        }
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
}

/// The sampling of one request on one model, every field resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
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

/// The enum names a client may send for `decoder.scheduler`.
const SCHEDULERS: &str = "SCHEDULER_UNSPECIFIED (checkpoint default), SCHEDULER_DDPM, \
                          SCHEDULER_DDIM, SCHEDULER_DPM_SOLVER_PP, SCHEDULER_LCM, SCHEDULER_TCD";

impl Requested {
    /// Reads and range-checks the sampling fields of `req`.
    pub fn of(req: &v1::GenerateRequest) -> Result<Self, ServiceError> {
        let prior = req.prior.unwrap_or_default();
        let decoder = req.decoder.clone().unwrap_or_default();
        let scheduler = v1::Scheduler::try_from(decoder.scheduler).map_err(|_| {
            bad(
                "decoder.scheduler",
                format!("{}; allowed: {SCHEDULERS}", decoder.scheduler),
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
        })
    }

    /// Fills the unset fields for a model with `profile`, by the quality preset.
    pub fn resolve(&self, profile: &DecoderProfile) -> Result<Sampling, ServiceError> {
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
}
