//! The models a gateway serves: one stage set (text encoder, prior, denoiser, movq; no prior for
//! aMUSEd and Kandinsky 2.0) per model, each stage set's family read from its stages, never
//! configured. The first set is the default (what a request that names no model gets); a request
//! naming a model goes to the set serving it.

use crate::balance::Pool;
use crate::clients::{Ctx, StageClients};
use crate::sampling::DecoderProfile;
use kd_proto::v1;
use kd_runtime::model_info::{model_name, served_name};
use kd_runtime::ServiceError;
use std::time::Instant;

/// The replica pools of one stage set.
#[derive(Clone, Debug)]
pub struct Stages {
    /// How errors name this set (`the default stage set (--*-url)`, `--extra-stack "…"`).
    pub label: String,
    pub text_encoder: Pool,
    /// `None`: a set without a prior (`--prior-url none`, or an `--extra-stack` without
    /// `prior=`), which only a family whose stage graph has no [`Step::Prior`] may serve.
    pub prior: Option<Pool>,
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
            text_encoder: &self.text_encoder,
            prior: self.prior.as_ref(),
            denoiser: &self.denoiser,
            movq: &self.movq,
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
    const TEXT_CONDITIONED: &[Step] = &[EncodeText, InitImage, Denoise, Decode];
    match family {
        v1::ModelFamily::Kandinsky21 | v1::ModelFamily::Kandinsky22 => UNCLIP,
        v1::ModelFamily::Amused | v1::ModelFamily::Kandinsky20 => TEXT_CONDITIONED,
        // Stages that report no family are checked by the family checks; serve them as 2.2.
        v1::ModelFamily::Unspecified => UNCLIP,
    }
}

/// Whether `family` is an unCLIP Kandinsky (2.1, 2.2; stages that report no family are served
/// as 2.2): a prior, diffusers' decoder schedulers with explicit schedules, ControlNet and
/// variation / fusion. aMUSEd and Kandinsky 2.0 have none of them.
pub fn is_unclip(family: v1::ModelFamily) -> bool {
    matches!(
        family,
        v1::ModelFamily::Kandinsky21 | v1::ModelFamily::Kandinsky22 | v1::ModelFamily::Unspecified
    )
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
    let denoiser = infos
        .iter()
        .find(|(stage, _)| *stage == "denoiser")
        .map(|(_, info)| info)
        .ok_or_else(|| missing_denoiser(&stages.label))?;
    let family = denoiser.family();
    if infos.iter().any(|(_, i)| i.family() != family) {
        *served = None;
        return Err(mixed_families(
            infos.iter().map(|(stage, i)| (*stage, i.family())),
        ));
    }
    if let Err(e) = check_prior(stages, family) {
        *served = None;
        return Err(e);
    }
    let decoder = DecoderProfile::of(denoiser);
    let m = ServedModel {
        name: served_name(
            family,
            decoder.kind,
            decoder.distilled,
            denoiser.native_size,
        ),
        family,
        decoder,
    };
    *served = Some((Instant::now(), m.clone()));
    Ok(m)
}

fn missing_denoiser(set: &str) -> ServiceError {
    ServiceError::Internal(format!("{set}: no denoiser answered its Info"))
}

/// Whether `family`'s stage graph calls a prior (Kandinsky 2.1 and 2.2; not aMUSEd nor 2.0).
pub fn needs_prior(family: v1::ModelFamily) -> bool {
    stage_graph(family).contains(&Step::Prior)
}

/// A set without a prior stage serves only a family that needs none: otherwise a deployment
/// error (UNAVAILABLE) naming the set and the missing `prior`.
fn check_prior(stages: &Stages, family: v1::ModelFamily) -> Result<(), ServiceError> {
    if stages.prior.is_some() || !needs_prior(family) {
        return Ok(());
    }
    Err(prior_missing(&stages.label, family))
}

fn prior_missing(set: &str, family: v1::ModelFamily) -> ServiceError {
    ServiceError::Unavailable(format!(
        "{set} has no prior stage, but its stages serve {}, whose pipeline needs one: give \
         the set a prior (`prior=URL` in --extra-stack, or --prior-url other than `none`)",
        model_name(family)
    ))
}

/// The tasks a model of `family` whose decoder is `kind` serves (`ModelDescription.tasks`).
/// aMUSEd's one token generator serves text-to-image, image-to-image, inpaint and outpaint (no
/// prior: no variation, no fusion). Kandinsky 2.0 (no prior either) serves text-to-image and
/// image-to-image, and its inpainting checkpoint inpaint and outpaint.
pub fn tasks(family: v1::ModelFamily, kind: v1::DecoderKind) -> &'static [v1::TaskKind] {
    use v1::TaskKind as T;
    if family == v1::ModelFamily::Amused {
        return &[T::TextToImage, T::ImageToImage, T::Inpaint, T::Outpaint];
    }
    match kind {
        v1::DecoderKind::Inpaint => &[T::Inpaint, T::Outpaint],
        _ if !is_unclip(family) => &[T::TextToImage, T::ImageToImage],
        v1::DecoderKind::Controlnet => &[T::TextToImage, T::ImageToImage],
        v1::DecoderKind::TextToImage | v1::DecoderKind::Unspecified => {
            &[T::TextToImage, T::ImageToImage, T::Variation, T::Fusion]
        }
    }
}

/// Whether a model of `family` whose decoder is `kind` takes a ControlNet hint (and requires
/// one): unCLIP Kandinsky ControlNet decoders only.
pub fn takes_hint(family: v1::ModelFamily, kind: v1::DecoderKind) -> bool {
    is_unclip(family) && kind == v1::DecoderKind::Controlnet
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
    /// The tasks this model serves.
    pub fn tasks(&self) -> &'static [v1::TaskKind] {
        tasks(self.family, self.decoder.kind)
    }

    /// Whether this model takes (and requires) a ControlNet hint.
    pub fn takes_hint(&self) -> bool {
        takes_hint(self.family, self.decoder.kind)
    }

    /// Whether this model serves `task` (with `hint` or without).
    pub fn serves(&self, task: v1::TaskKind, hint: bool) -> bool {
        self.tasks().contains(&task) && hint == self.takes_hint()
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
         model family",
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
        let serves: Vec<&str> = served.tasks().iter().map(|&t| task_name(t)).collect();
        let hint_field = match task {
            v1::TaskKind::ImageToImage => "image_to_image.hint",
            _ => "text_to_image.hint",
        };
        let hinted = matches!(task, v1::TaskKind::TextToImage | v1::TaskKind::ImageToImage);
        match (served.takes_hint(), hint) {
            (true, false) if hinted => ServiceError::invalid(
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
                    tasks: m.tasks().iter().map(|&t| t as i32).collect(),
                    takes_hint: m.takes_hint(),
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

/// The addresses of one stage set's stages (each URL may name a headless Service, resolved to
/// all its replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackUrls {
    pub text_encoder: Vec<String>,
    /// `None`: the set has no prior (aMUSEd, Kandinsky 2.0).
    pub prior: Option<Vec<String>>,
    pub denoiser: Vec<String>,
    pub movq: Vec<String>,
}

/// What `--prior-url` (or `prior=` of an `--extra-stack`) says for "this set has no prior".
pub const NO_PRIOR: &str = "none";

/// The prior's addresses of `--prior-url`: `None` for the single value [`NO_PRIOR`].
pub fn prior_urls(urls: &[String]) -> Result<Option<Vec<String>>, String> {
    let none = |u: &String| u.trim().eq_ignore_ascii_case(NO_PRIOR);
    match urls {
        [u] if none(u) => Ok(None),
        _ if urls.iter().any(none) => Err(format!(
            "`{NO_PRIOR}` (no prior) stands alone; it cannot be listed with addresses"
        )),
        _ => Ok(Some(urls.to_vec())),
    }
}

/// Parses one `--extra-stack` value: `text-encoder=URL,prior=URL,denoiser=URL,movq=URL`, where
/// `prior=` may be left out (or be `prior=none`) for a model without a prior (aMUSEd,
/// Kandinsky 2.0).
pub fn parse_stack(spec: &str) -> Result<StackUrls, String> {
    const KEYS: [&str; 4] = ["text-encoder", "prior", "denoiser", "movq"];
    const PRIOR: usize = 1;
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
        .enumerate()
        .filter(|(i, (_, u))| *i != PRIOR && u.is_none())
        .map(|(_, (k, _))| *k)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing {}; give all of text-encoder, denoiser, movq (and prior for a model with \
             a prior)",
            missing.join(", ")
        ));
    }
    let [text_encoder, prior, denoiser, movq] = urls.map(|u| u.map(|u| vec![u]));
    let prior = match prior {
        Some(p) => prior_urls(&p).map_err(|e| format!("prior: {e}"))?,
        None => None,
    };
    Ok(StackUrls {
        text_encoder: text_encoder.unwrap_or_default(),
        prior,
        denoiser: denoiser.unwrap_or_default(),
        movq: movq.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::{Request, Response, Status};

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
            assert!(needs_prior(family));
        }
        assert!(!needs_prior(v1::ModelFamily::Amused));
    }

    fn urls(u: &str) -> Vec<String> {
        vec![u.to_string()]
    }

    #[test]
    fn stack_specs_parse_or_name_what_is_wrong() {
        let s = parse_stack(
            "movq=http://m:1, text-encoder=http://t:1,prior=http://p:1,denoiser=http://d:1",
        )
        .unwrap();
        let want = StackUrls {
            text_encoder: urls("http://t:1"),
            prior: Some(urls("http://p:1")),
            denoiser: urls("http://d:1"),
            movq: urls("http://m:1"),
        };
        assert_eq!(s, want);
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

    #[test]
    fn a_stack_spec_may_leave_the_prior_out() {
        let want = StackUrls {
            text_encoder: urls("http://t:1"),
            prior: None,
            denoiser: urls("http://d:1"),
            movq: urls("http://m:1"),
        };
        let spec = "text-encoder=http://t:1,denoiser=http://d:1,movq=http://m:1";
        assert_eq!(parse_stack(spec).unwrap(), want);
        let spec = "text-encoder=http://t:1,prior=none,denoiser=http://d:1,movq=http://m:1";
        assert_eq!(parse_stack(spec).unwrap(), want);
        // The other three stay required.
        let e = parse_stack("text-encoder=http://t:1,movq=http://m:1").unwrap_err();
        assert!(e.contains("missing denoiser;"), "{e}");
    }

    #[test]
    fn prior_url_none_means_no_prior() {
        for none in ["none", " NONE "] {
            assert_eq!(prior_urls(&[none.to_string()]), Ok(None));
        }
        let two = vec!["http://a:1".to_string(), "http://b:1".to_string()];
        assert_eq!(prior_urls(&two), Ok(Some(two.clone())));
        let mixed = vec!["http://a:1".to_string(), "none".to_string()];
        assert!(prior_urls(&mixed).unwrap_err().contains("stands alone"));
    }

    #[test]
    fn kandinsky_2_0_serves_two_tasks_per_checkpoint_without_prior_or_hints() {
        use v1::TaskKind as T;
        let family = v1::ModelFamily::Kandinsky20;
        assert!(!needs_prior(family) && !is_unclip(family));
        for (kind, name, served, refused) in [
            (
                v1::DecoderKind::TextToImage,
                "kandinsky-2-0",
                [T::TextToImage, T::ImageToImage],
                [T::Inpaint, T::Outpaint, T::Variation, T::Fusion],
            ),
            (
                v1::DecoderKind::Inpaint,
                "kandinsky-2-0-inpaint",
                [T::Inpaint, T::Outpaint],
                [T::TextToImage, T::ImageToImage, T::Variation, T::Fusion],
            ),
        ] {
            let m = ServedModel {
                name,
                family,
                decoder: DecoderProfile {
                    family,
                    kind,
                    ..DecoderProfile::teacher()
                },
            };
            assert_eq!(m.tasks(), served, "{name}");
            assert!(!m.takes_hint(), "{name}");
            for t in served {
                assert!(m.serves(t, false), "{name} {t:?}");
                assert!(!m.serves(t, true), "{name} {t:?} with a hint");
            }
            for t in refused {
                assert!(!m.serves(t, false), "{name} {t:?}");
            }
        }
    }

    #[test]
    fn amused_serves_its_four_tasks_without_hints() {
        use v1::TaskKind as T;
        let amused = ServedModel {
            name: "amused-256",
            family: v1::ModelFamily::Amused,
            decoder: DecoderProfile {
                family: v1::ModelFamily::Amused,
                default_steps: 12,
                ..DecoderProfile::teacher()
            },
        };
        assert_eq!(
            amused.tasks(),
            [T::TextToImage, T::ImageToImage, T::Inpaint, T::Outpaint]
        );
        assert!(!amused.takes_hint());
        for t in [T::TextToImage, T::ImageToImage, T::Inpaint, T::Outpaint] {
            assert!(amused.serves(t, false), "{t:?}");
            assert!(!amused.serves(t, true), "{t:?} with a hint");
        }
        for t in [T::Variation, T::Fusion] {
            assert!(!amused.serves(t, false), "{t:?}");
        }
        // Kandinsky keeps its decoder-kind tasks.
        let k = v1::ModelFamily::Kandinsky22;
        assert_eq!(
            tasks(k, v1::DecoderKind::TextToImage),
            [T::TextToImage, T::ImageToImage, T::Variation, T::Fusion]
        );
        assert_eq!(
            tasks(k, v1::DecoderKind::Inpaint),
            [T::Inpaint, T::Outpaint]
        );
        assert!(takes_hint(k, v1::DecoderKind::Controlnet));
    }

    /// A stage that answers only `StageInfo.Info`, with `info`.
    struct FakeStage(v1::ModelInfo);

    #[tonic::async_trait]
    impl v1::stage_info_server::StageInfo for FakeStage {
        async fn info(
            &self,
            _: Request<v1::InfoRequest>,
        ) -> Result<Response<v1::InfoResponse>, Status> {
            Ok(Response::new(v1::InfoResponse {
                model: Some(self.0.clone()),
            }))
        }
    }

    /// The pool of a fake `stage` on loopback reporting `family` (the denoiser with
    /// `native_size` and 12 default steps, as aMUSEd's).
    async fn fake(stage: &'static str, family: v1::ModelFamily, native_size: u32) -> Pool {
        let info = v1::ModelInfo {
            family: family as i32,
            component: stage.into(),
            default_steps: if stage == "denoiser" { 12 } else { 0 },
            decoder_kind: if stage == "denoiser" {
                v1::DecoderKind::TextToImage as i32
            } else {
                0
            },
            native_size: if stage == "denoiser" { native_size } else { 0 },
            ..Default::default()
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(v1::stage_info_server::StageInfoServer::new(FakeStage(info)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l));
        tokio::spawn(server);
        Pool::new(&[url], stage, Duration::from_secs(60), None)
            .await
            .unwrap()
    }

    /// A stage set of fake stages: every stage of `family`, the prior of `prior` if any.
    async fn set(family: v1::ModelFamily, prior: Option<v1::ModelFamily>, size: u32) -> Stages {
        let prior = match prior {
            Some(f) => Some(fake("prior", f, 0).await),
            None => None,
        };
        Stages {
            label: "stage set --extra-stack \"test\"".into(),
            text_encoder: fake("text_encoder", family, 0).await,
            prior,
            denoiser: fake("denoiser", family, size).await,
            movq: fake("movq", family, 0).await,
            served: Default::default(),
        }
    }

    fn ctx() -> Ctx {
        Ctx {
            deadline: None,
            events: None,
        }
    }

    #[tokio::test]
    async fn a_set_without_prior_serves_amused_and_lists_its_tasks() {
        let amused = set(v1::ModelFamily::Amused, None, 16).await;
        let m = served_model(&amused, &ctx()).await.unwrap();
        assert_eq!((m.name, m.family), ("amused-256", v1::ModelFamily::Amused));
        assert_eq!(m.decoder.default_steps, 12);
        let big = set(v1::ModelFamily::Amused, None, 512).await;
        let models = Models {
            stacks: vec![amused, big],
        };
        let listed = models.list(&ctx()).await.unwrap();
        let names: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["amused-256", "amused-512"]);
        let d = &listed[0];
        assert_eq!(
            (d.family, d.default_steps, d.takes_hint, d.is_default),
            (v1::ModelFamily::Amused as i32, 12, false, true)
        );
        use v1::TaskKind as T;
        let tasks: Vec<i32> = [T::TextToImage, T::ImageToImage, T::Inpaint, T::Outpaint]
            .iter()
            .map(|&t| t as i32)
            .collect();
        assert_eq!(d.tasks, tasks);
        let (_, m) = models.select(Some("amused-512"), &ctx()).await.unwrap();
        assert_eq!(m.name, "amused-512");
    }

    #[tokio::test]
    async fn a_kandinsky_set_without_prior_is_a_deployment_error_naming_the_set_and_prior() {
        let k22 = set(v1::ModelFamily::Kandinsky22, None, 0).await;
        let e = served_model(&k22, &ctx()).await.unwrap_err();
        assert!(matches!(e, ServiceError::Unavailable(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("--extra-stack \"test\"")
                && msg.contains("no prior stage")
                && msg.contains("prior=URL")
                && msg.contains("kandinsky-2-2"),
            "{msg}"
        );
        // With a prior it serves; an aMUSEd set behind a Kandinsky prior is mixed families.
        let k22 = set(
            v1::ModelFamily::Kandinsky22,
            Some(v1::ModelFamily::Kandinsky22),
            0,
        )
        .await;
        assert_eq!(
            served_model(&k22, &ctx()).await.unwrap().name,
            "kandinsky-2-2"
        );
        let mixed = set(
            v1::ModelFamily::Amused,
            Some(v1::ModelFamily::Kandinsky22),
            256,
        )
        .await;
        let e = served_model(&mixed, &ctx()).await.unwrap_err().to_string();
        assert!(
            e.contains("different model families") && e.contains("prior=kandinsky-2-2"),
            "{e}"
        );
    }
}
