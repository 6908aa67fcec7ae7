//! The models a gateway serves: one stage set (text encoder, prior, denoiser, movq) per model,
//! each stage set's family read from its stages, never configured. The first set is the default
//! (what a request that names no model gets); a request naming a model goes to the set serving it.

use crate::balance::Pool;
use crate::clients::{Ctx, StageClients};
use crate::sampling::DecoderProfile;
use kd_proto::v1;
use kd_runtime::model_info::{model_name, served_name};
use kd_runtime::ServiceError;
use std::time::Instant;

/// The replica pools of the four stages.
#[derive(Clone, Debug)]
pub struct Stages {
    pub text_encoder: Pool,
    pub prior: Pool,
    pub denoiser: Pool,
    pub movq: Pool,
    /// The model the stages serve, learned from their `Info` and re-asked once it is older than
    /// [`SERVED_MODEL_TTL`] (stages may be redeployed with other folders behind the gateway).
    pub served: std::sync::Arc<tokio::sync::Mutex<Option<(Instant, ServedModel)>>>,
}

impl Stages {
    /// Typed clients of these stages for one request.
    pub fn clients<'a>(&'a self, ctx: &'a Ctx) -> StageClients<'a> {
        StageClients {
            pools: [&self.text_encoder, &self.prior, &self.denoiser, &self.movq],
            ctx,
        }
    }
}

/// One step of a generation: which stage does what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Text encoder: the prompt's conditionings.
    EncodeText,
    /// Prior: image embeddings (sample, variation, fusion).
    Prior,
    /// MoVQ: the init image's latents and mask (image-to-image, inpaint).
    InitImage,
    /// Denoiser: the latents, streaming progress.
    Denoise,
    /// MoVQ: the images.
    Decode,
}

/// A family's stage graph: which stages a generation calls, in order. A family without a prior
/// (aMUSEd, Kandinsky 2.0) is a graph without [`Step::Prior`]; `generate` runs whatever graph
/// the served family has.
pub fn stage_graph(family: v1::ModelFamily) -> &'static [Step] {
    use Step::*;
    const UNCLIP: &[Step] = &[EncodeText, Prior, InitImage, Denoise, Decode];
    const MASKED_TOKENS: &[Step] = &[EncodeText, InitImage, Denoise, Decode];
    match family {
        v1::ModelFamily::Kandinsky21 | v1::ModelFamily::Kandinsky22 => UNCLIP,
        v1::ModelFamily::Amused => MASKED_TOKENS,
        // Stages that report no family are checked by the family checks; serve them as 2.2.
        v1::ModelFamily::Unspecified => UNCLIP,
    }
}

/// How long the gateway trusts what the stages said they serve.
pub const SERVED_MODEL_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// The one model a gateway's stages serve: read from the stages' checkpoints, never configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// Public name (`kandinsky-2-1`, `kandinsky-2-2`, `…-distilled` for a few-step student).
    pub name: &'static str,
    /// Model family.
    pub family: v1::ModelFamily,
    /// What the denoiser says of its decoder: a teacher or a student, its default schedule.
    pub decoder: DecoderProfile,
}

/// The model the stages serve. Asks every stage's `Info` (again once the answer is older than
/// [`SERVED_MODEL_TTL`]) and checks that they agree: a Kandinsky 2.1 text encoder in front of a
/// 2.2 denoiser is a deployment error, reported as such rather than as a wrong image.
pub async fn served_model(stages: &Stages, ctx: &Ctx) -> Result<ServedModel, ServiceError> {
    let mut served = stages.served.lock().await;
    if let Some((at, m)) = served.as_ref() {
        if at.elapsed() < SERVED_MODEL_TTL {
            return Ok(m.clone());
        }
    }
    // Every stage answers `StageInfo.Info`, outside its admission queue.
    let infos = stages.clients(ctx).infos().await?;
    let family = infos[2].1.family();
    if infos.iter().any(|(_, i)| i.family() != family) {
        *served = None;
        return Err(mixed_families(
            infos.iter().map(|(stage, i)| (*stage, i.family())),
        ));
    }
    let decoder = DecoderProfile::of(&infos[2].1);
    let m = ServedModel {
        name: served_name(
            family,
            decoder.kind,
            decoder.distilled,
            infos[2].1.native_size,
        ),
        family,
        decoder,
    };
    *served = Some((Instant::now(), m.clone()));
    Ok(m)
}

/// The tasks a decoder serves (`ModelDescription.tasks`).
pub fn tasks(kind: v1::DecoderKind) -> &'static [v1::TaskKind] {
    use v1::TaskKind as T;
    match kind {
        v1::DecoderKind::Inpaint => &[T::Inpaint, T::Outpaint],
        v1::DecoderKind::Controlnet => &[T::TextToImage, T::ImageToImage],
        v1::DecoderKind::TextToImage | v1::DecoderKind::Unspecified => {
            &[T::TextToImage, T::ImageToImage, T::Variation, T::Fusion]
        }
    }
}

/// How a task reads in errors.
pub fn task_name(task: v1::TaskKind) -> &'static str {
    match task {
        v1::TaskKind::TextToImage | v1::TaskKind::Unspecified => "text-to-image",
        v1::TaskKind::ImageToImage => "image-to-image",
        v1::TaskKind::Inpaint => "inpaint",
        v1::TaskKind::Outpaint => "outpaint",
        v1::TaskKind::Variation => "variation",
        v1::TaskKind::Fusion => "fusion",
    }
}

impl ServedModel {
    /// Whether this model serves `task` (with `hint` or without).
    pub fn serves(&self, task: v1::TaskKind, hint: bool) -> bool {
        tasks(self.decoder.kind).contains(&task)
            && hint == (self.decoder.kind == v1::DecoderKind::Controlnet)
    }
}

/// The error of stages that serve different families, naming each.
fn mixed_families(
    stages: impl IntoIterator<Item = (&'static str, v1::ModelFamily)>,
) -> ServiceError {
    let list: Vec<String> = stages
        .into_iter()
        .map(|(stage, f)| format!("{stage}={}", model_name(f)))
        .collect();
    ServiceError::Internal(format!(
        "the stages serve different model families ({}); every stage must load the same \
         Kandinsky version",
        list.join(", ")
    ))
}

/// Checks a stage's answer against the served family (a stage redeployed with other folders
/// since the gateway last asked is caught on the request itself).
pub(crate) fn check_family(
    stage: &'static str,
    info: Option<&v1::ModelInfo>,
    served: &ServedModel,
) -> Result<(), ServiceError> {
    match info.map(v1::ModelInfo::family) {
        Some(f) if f != served.family => {
            Err(mixed_families([(stage, f), ("the others", served.family)]))
        }
        _ => Ok(()),
    }
}

/// Every stage set the gateway fronts, the default first.
#[derive(Clone, Debug)]
pub struct Models {
    /// At least one.
    pub stacks: Vec<Stages>,
}

impl Models {
    /// The stage set for `model` (`None` = the default one) and what it serves. A named model no
    /// reachable set serves is INVALID_ARGUMENT listing the served names — or, when some set
    /// could not be asked, that set's error (it may be the one serving the model).
    pub async fn select(
        &self,
        model: Option<&str>,
        ctx: &Ctx,
    ) -> Result<(&Stages, ServedModel), ServiceError> {
        let Some(name) = model else {
            let default = &self.stacks[0];
            return Ok((default, served_model(default, ctx).await?));
        };
        let mut served = Vec::new();
        let mut unreachable = None;
        for stages in &self.stacks {
            match served_model(stages, ctx).await {
                Ok(m) if m.name == name => return Ok((stages, m)),
                Ok(m) => served.push(m.name),
                Err(e) => unreachable = Some(e),
            }
        }
        match unreachable {
            Some(e) => Err(e),
            None => Err(ServiceError::invalid(
                "model",
                format!(
                    "{name:?} is not served here; allowed: {} (or empty for the default)",
                    served.join(", ")
                ),
            )),
        }
    }

    /// The refusal of a request for `task` (with a `hint` or without) by `served`, which does
    /// not serve it: names the model and the served models that do. Asked before any stage
    /// runs (stage sets that cannot be asked are left out of the list).
    pub async fn refuse_task(
        &self,
        served: &ServedModel,
        task: v1::TaskKind,
        hint: bool,
        ctx: &Ctx,
    ) -> ServiceError {
        let mut others: Vec<&'static str> = Vec::new();
        for stages in &self.stacks {
            if let Ok(m) = served_model(stages, ctx).await {
                if m.serves(task, hint) && !others.contains(&m.name) {
                    others.push(m.name);
                }
            }
        }
        let what = task_name(task);
        let alternatives = |what: &str| {
            if others.is_empty() {
                format!("no model of this deployment serves {what}")
            } else {
                format!("models that serve {what}: {}", others.join(", "))
            }
        };
        let serves: Vec<&str> = tasks(served.decoder.kind)
            .iter()
            .map(|&t| task_name(t))
            .collect();
        let hint_field = match task {
            v1::TaskKind::ImageToImage => "image_to_image.hint",
            _ => "text_to_image.hint",
        };
        let hinted = matches!(task, v1::TaskKind::TextToImage | v1::TaskKind::ImageToImage);
        match (served.decoder.kind, hint) {
            (v1::DecoderKind::Controlnet, false) if hinted => ServiceError::invalid(
                hint_field,
                format!(
                    "required: model {} is a ControlNet decoder, which takes a depth hint",
                    served.name
                ),
            ),
            (_, true) => ServiceError::invalid(
                hint_field,
                format!(
                    "model {} has no ControlNet decoder; {}",
                    served.name,
                    alternatives(&format!("{what} with a hint"))
                ),
            ),
            _ => ServiceError::invalid(
                "model",
                format!(
                    "{:?} does not serve {what} (it serves {}); {}",
                    served.name,
                    serves.join(", "),
                    alternatives(what)
                ),
            ),
        }
    }

    /// What `ListModels` answers: each served model once, the default marked. Stage sets that
    /// cannot be asked are left out; if none can, the first error.
    pub async fn list(&self, ctx: &Ctx) -> Result<Vec<v1::ModelDescription>, ServiceError> {
        let mut out: Vec<v1::ModelDescription> = Vec::new();
        let mut first_err = None;
        for (i, stages) in self.stacks.iter().enumerate() {
            match served_model(stages, ctx).await {
                Ok(m) if out.iter().all(|d| d.name != m.name) => out.push(v1::ModelDescription {
                    name: m.name.into(),
                    family: m.family as i32,
                    is_default: i == 0,
                    distilled: m.decoder.distilled,
                    default_steps: m.decoder.default_steps,
                    default_timesteps: m.decoder.default_timesteps.clone(),
                    tasks: tasks(m.decoder.kind).iter().map(|&t| t as i32).collect(),
                    takes_hint: m.decoder.kind == v1::DecoderKind::Controlnet,
                }),
                Ok(_) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (out.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
}

/// Parses one `--extra-stack` value: `text-encoder=URL,prior=URL,denoiser=URL,movq=URL` (each
/// URL may name a headless Service, resolved to all its replicas).
pub fn parse_stack(spec: &str) -> Result<[String; 4], String> {
    const KEYS: [&str; 4] = ["text-encoder", "prior", "denoiser", "movq"];
    let mut urls: [Option<String>; 4] = Default::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!(
                "{part:?}: expected KEY=URL with KEY one of {}",
                KEYS.join(", ")
            )
        })?;
        let i = KEYS
            .iter()
            .position(|key| *key == k.trim())
            .ok_or_else(|| format!("unknown key {k:?}; allowed: {}", KEYS.join(", ")))?;
        if urls[i].replace(v.trim().to_string()).is_some() {
            return Err(format!("{k} given twice"));
        }
    }
    let missing: Vec<&str> = KEYS
        .iter()
        .zip(&urls)
        .filter(|(_, u)| u.is_none())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing {}; give all of {}",
            missing.join(", "),
            KEYS.join(", ")
        ));
    }
    Ok(urls.map(Option::unwrap_or_default))
}

#[cfg(test)]
mod tests {
    use super::{parse_stack, stage_graph, v1, Step};

    #[test]
    fn unclip_families_call_every_stage_in_order() {
        for family in [v1::ModelFamily::Kandinsky21, v1::ModelFamily::Kandinsky22] {
            assert_eq!(
                stage_graph(family),
                [
                    Step::EncodeText,
                    Step::Prior,
                    Step::InitImage,
                    Step::Denoise,
                    Step::Decode
                ]
            );
        }
    }

    #[test]
    fn stack_specs_parse_or_name_what_is_wrong() {
        let s = parse_stack(
            "movq=http://m:1, text-encoder=http://t:1,prior=http://p:1,denoiser=http://d:1",
        )
        .unwrap();
        assert_eq!(s, ["http://t:1", "http://p:1", "http://d:1", "http://m:1"]);
        assert!(parse_stack("prior=http://p")
            .unwrap_err()
            .contains("missing text-encoder, denoiser, movq"));
        assert!(parse_stack("unet=http://u")
            .unwrap_err()
            .contains("allowed: text-encoder"));
        assert!(parse_stack("prior").unwrap_err().contains("KEY=URL"));
        assert!(parse_stack("prior=a,prior=b")
            .unwrap_err()
            .contains("twice"));
    }
}
