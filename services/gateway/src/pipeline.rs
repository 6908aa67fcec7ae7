//! Orchestration of one validated request across the stages of its family's stage graph:
//! text encoder → prior → denoiser (streamed progress) → movq; aMUSEd has no prior (its
//! denoiser is conditioned on the text encoder's rows and samples a token map, which the movq
//! stage decodes), nor has Kandinsky 2.0 (its denoiser is conditioned on its two text encoders'
//! rows, always with the negative or empty prompt's for classifier-free guidance; its movq
//! stage samples the init image's posterior from the image's seed).
//!
//! Every outgoing call carries the remaining deadline; a stage that cannot be reached becomes
//! UNAVAILABLE naming the stage. Progress goes to an optional event sink (the streaming call).

use crate::clients::missing;
pub use crate::clients::{Ctx, Events, StageClients};
use crate::models::{stage_graph, Models, ServedModel, Stages, Step};
use crate::validate::{FusionInput, Plan, Task};
use kd_proto::tensor::{self, WireTensorError};
use kd_proto::v1::{self, denoise_event, interpolate_item};
use kd_runtime::ServiceError;

/// A stage answered with tensors whose rows do not fit together.
fn rows_err(stage: &'static str) -> impl Fn(WireTensorError) -> ServiceError {
    move |e| ServiceError::Internal(format!("stage {stage} returned unusable tensors: {e}"))
}

fn repeat_rows(t: &v1::Tensor, n: usize) -> Result<v1::Tensor, ServiceError> {
    tensor::repeat_rows(t, n).map_err(rows_err("prior"))
}

fn repeat_conditioning(
    c: &v1::TextEmbeddings,
    n: usize,
) -> Result<v1::TextEmbeddings, ServiceError> {
    tensor::repeat_text_embeddings(c, n).map_err(rows_err("text_encoder"))
}

/// aMUSEd's conditioning of one prompt: its pooled, projected embedding and its penultimate
/// hidden states (no image embeddings, no attention mask).
fn masked_token_conditioning(text: v1::TextEmbeddings) -> v1::DecoderConditioning {
    v1::DecoderConditioning {
        image_embeds: None,
        text_embeds: text.text_embeds,
        text_hidden_states: text.hidden_states,
        text_attention_mask: None,
        text_hidden_states_2: None,
    }
}

/// The UNet's conditioning: image embeddings, plus the multilingual text for Kandinsky 2.1.
fn decoder_conditioning(
    image_embeds: v1::Tensor,
    text: Option<&v1::TextEmbeddings>,
) -> v1::DecoderConditioning {
    let text = text.cloned().unwrap_or_default();
    v1::DecoderConditioning {
        image_embeds: Some(image_embeds),
        text_embeds: text.text_embeds,
        text_hidden_states: text.hidden_states,
        text_attention_mask: text.attention_mask,
        text_hidden_states_2: None,
    }
}

/// Kandinsky 2.0's conditioning of one prompt's row, repeated to `n` rows: the first (M-CLIP)
/// encoder's pooled projection and hidden states, the second (mT5) encoder's hidden states (no
/// image embeddings, no attention masks: the official UNet takes none).
fn kd20_conditioning(
    first: &v1::TextEmbeddings,
    second: &v1::TextEmbeddings,
    n: usize,
) -> Result<v1::DecoderConditioning, ServiceError> {
    let first = repeat_conditioning(
        &v1::TextEmbeddings {
            attention_mask: None,
            ..first.clone()
        },
        n,
    )?;
    let second = repeat_conditioning(
        &v1::TextEmbeddings {
            hidden_states: second.hidden_states.clone(),
            ..Default::default()
        },
        n,
    )?;
    Ok(v1::DecoderConditioning {
        image_embeds: None,
        text_embeds: first.text_embeds,
        text_hidden_states: first.hidden_states,
        text_attention_mask: None,
        text_hidden_states_2: second.hidden_states,
    })
}

fn conditioning_row(c: &v1::TextEmbeddings, i: usize) -> Result<v1::TextEmbeddings, ServiceError> {
    tensor::text_embeddings_row(c, i).map_err(rows_err("text_encoder"))
}

/// The request field of the task's input image (`image_to_image.image`, ...).
fn task_field(task: &Task) -> &'static str {
    match task {
        Task::TextToImage { .. } => "text_to_image",
        Task::ImageToImage { .. } => "image_to_image",
        Task::Inpaint { .. } => "inpaint",
        Task::Outpaint { .. } => "outpaint",
        Task::Variation { .. } => "variation",
        Task::Fusion { .. } => "fusion",
    }
}

/// A stage's name for an input image or mask, as the request's path under `task`.
fn image_field(task: &'static str) -> impl Fn(&str) -> Option<String> {
    move |field| {
        if field.starts_with("mask") {
            Some(format!("{task}.mask"))
        } else if field.starts_with("image") || field == "pixels" {
            Some(format!("{task}.image"))
        } else {
            None
        }
    }
}

/// The denoiser's field names as the request's paths.
fn denoiser_field(task: &'static str) -> impl Fn(&str) -> Option<String> {
    move |field| {
        Some(match field {
            "num_inference_steps" | "timesteps" | "guidance_scale" | "scheduler" => {
                format!("decoder.{field}")
            }
            "hint" | "hint_image" => format!("{task}.hint"),
            "strength" => format!("{task}.strength"),
            f if f.starts_with("masked_tokens") => format!("decoder.{f}"),
            _ => return None,
        })
    }
}

/// Runs the whole request through its family's stage graph; returns one encoded image per
/// seed, in order.
pub async fn generate(
    models: &Models,
    plan: &Plan,
    ctx: &Ctx,
) -> Result<(Vec<v1::GeneratedImage>, &'static str), ServiceError> {
    let (st, served) = models.select(plan.model.as_deref(), ctx).await?;
    // The options the family lacks first: they name the field and the family.
    plan.check_family(&served.decoder)?;
    let (task, hint) = (plan.task.kind(), plan.task.has_hint());
    if !served.serves(task, hint) {
        return Err(models.refuse_task(&served, task, hint, ctx).await);
    }
    let plan = &plan.for_model(&served.decoder)?;
    let mut work = Work::default();
    for &step in stage_graph(served.family) {
        run_step(step, st, ctx, plan, &served, &mut work).await?;
    }
    let images = work.images.ok_or_else(|| {
        ServiceError::Internal(format!("the stage graph of {} made no images", served.name))
    })?;
    Ok((images, served.name))
}

/// What the steps of one request have produced so far.
#[derive(Default)]
struct Work {
    texts: Option<Texts>,
    embeds: Option<Embeddings>,
    init: Init,
    latents: Option<v1::Tensor>,
    images: Option<Vec<v1::GeneratedImage>>,
}

/// A step's input that an earlier step of the graph must have produced.
fn needs<T>(v: Option<T>, step: Step, what: &str) -> Result<T, ServiceError> {
    v.ok_or_else(|| {
        ServiceError::Internal(format!(
            "stage graph step {step:?} needs {what} from an earlier step"
        ))
    })
}

/// Runs one step of the graph, with its progress events.
async fn run_step(
    step: Step,
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    served: &ServedModel,
    w: &mut Work,
) -> Result<(), ServiceError> {
    match step {
        Step::EncodeText => {
            ctx.progress(v1::Stage::TextEncoder, 0, 0).await?;
            w.texts = Some(encode_text(st, ctx, plan, served).await?);
        }
        Step::Prior => {
            let steps = plan.sampling.prior_steps;
            let clip = w.texts.as_ref().and_then(|t| t.clip.as_ref());
            let clip = needs(clip, step, "the CLIP text conditioning")?;
            ctx.progress(v1::Stage::Prior, 0, steps).await?;
            w.embeds = Some(prior_embeddings(st, ctx, plan, clip).await?);
            ctx.progress(v1::Stage::Prior, steps, steps).await?;
        }
        Step::InitImage => w.init = init_image(st, ctx, plan, served.family).await?,
        Step::Denoise => {
            let conditioning = denoiser_conditioning(step, served.family, plan.seeds.len(), w)?;
            let init = std::mem::take(&mut w.init);
            let req = denoise_request(plan, served.family, conditioning, init);
            ctx.progress(v1::Stage::Denoiser, 0, plan.sampling.decoder_steps)
                .await?;
            w.latents = Some(denoise(st, ctx, plan, req).await?);
        }
        Step::Decode => {
            let latents = needs(w.latents.take(), step, "latents")?;
            ctx.progress(v1::Stage::Movq, 0, 0).await?;
            w.images = Some(decode_images(st, ctx, plan, latents).await?);
        }
    }
    Ok(())
}

/// One text conditioning's rows of the prompt and of the negative (or empty) prompt.
#[derive(Debug, Clone, PartialEq)]
struct PromptRows {
    cond: v1::TextEmbeddings,
    uncond: v1::TextEmbeddings,
}

impl PromptRows {
    /// Rows 0 (the prompt) and 1 (the negative or empty prompt) of a batch.
    fn of(batch: &v1::TextEmbeddings) -> Result<Self, ServiceError> {
        Ok(Self {
            cond: conditioning_row(batch, 0)?,
            uncond: conditioning_row(batch, 1)?,
        })
    }
}

/// The CLIP text conditioning (the prior's; aMUSEd's denoiser's).
struct ClipTexts {
    /// The whole batch (fusion texts from row 2).
    all: v1::TextEmbeddings,
    /// Its prompt and negative rows.
    rows: PromptRows,
}

/// What the text encoder gave for `[prompt, negative-or-empty, fusion texts...]`.
struct Texts {
    /// Kandinsky 2.1 and 2.2, aMUSEd; `None` for Kandinsky 2.0.
    clip: Option<ClipTexts>,
    /// The decoder's own text conditioning: Kandinsky 2.1's multilingual encoder, Kandinsky
    /// 2.0's first (M-CLIP) encoder.
    decoder: Option<PromptRows>,
    /// Kandinsky 2.0's second (mT5) encoder.
    decoder_2: Option<PromptRows>,
}

/// Step 1: the text conditionings. The second prompt is the negative one, or the empty prompt
/// (the unconditional rows of every family's classifier-free guidance).
async fn encode_text(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    served: &ServedModel,
) -> Result<Texts, ServiceError> {
    let uncond_text = plan.negative_prompt.clone().unwrap_or_default();
    let mut prompts = vec![plan.prompt.clone(), uncond_text];
    if let Task::Fusion { items } = &plan.task {
        for (it, _) in items {
            if let FusionInput::Text(t) = it {
                prompts.push(t.clone());
            }
        }
    }
    let enc = st
        .clients(ctx)
        .encode_text(v1::EncodeTextRequest { prompts }, served)
        .await?;
    let rows = |c: Option<&v1::TextEmbeddings>| c.map(PromptRows::of).transpose();
    let clip = match enc.prior_conditioning {
        Some(all) => Some(ClipTexts {
            rows: PromptRows::of(&all)?,
            all,
        }),
        None => None,
    };
    Ok(Texts {
        clip,
        decoder: rows(enc.decoder_conditioning.as_ref())?,
        decoder_2: rows(enc.decoder_conditioning_2.as_ref())?,
    })
}

/// The prior's image embeddings (n rows) and negative image embeddings.
struct Embeddings {
    image: v1::Tensor,
    negative: v1::Tensor,
}

/// Step 2: the prior, on the CLIP text conditioning.
async fn prior_embeddings(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    texts: &ClipTexts,
) -> Result<Embeddings, ServiceError> {
    let PromptRows { cond, uncond } = &texts.rows;
    let image = match &plan.task {
        Task::Variation { image } => {
            let req = v1::EmbedImagesRequest {
                images: vec![image.clone()],
                ..Default::default()
            };
            let e = st
                .clients(ctx)
                .embed_images(req)
                .await
                .map_err(|e| e.rename_field(image_field("variation")))?;
            repeat_rows(&e, plan.seeds.len())?
        }
        Task::Fusion { items } => fusion_embeddings(st, ctx, plan, texts, items).await?,
        _ => sample(st, ctx, plan, cond, uncond).await?,
    };
    let negative = match &plan.negative_prompt {
        // As diffusers: the negative prompt is sampled through the prior too (cond = uncond).
        Some(_) => sample(st, ctx, plan, uncond, uncond).await?,
        None => st.clients(ctx).zero_image_embedding().await?,
    };
    Ok(Embeddings { image, negative })
}

/// n prior samples of `conditioning` (one row repeated, one seed per image) under `uncond`.
async fn sample(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    conditioning: &v1::TextEmbeddings,
    uncond: &v1::TextEmbeddings,
) -> Result<v1::Tensor, ServiceError> {
    let req = v1::SampleRequest {
        conditioning: Some(repeat_conditioning(conditioning, plan.seeds.len())?),
        unconditional: Some(uncond.clone()),
        num_inference_steps: plan.sampling.prior_steps,
        guidance_scale: plan.sampling.prior_guidance,
        seeds: plan.seeds.clone(),
        ..Default::default()
    };
    st.clients(ctx).sample(req).await
}

/// One fusion per image seed, so each image depends only on its own seed.
async fn fusion_embeddings(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    texts: &ClipTexts,
    items: &[(FusionInput, f32)],
) -> Result<v1::Tensor, ServiceError> {
    let mut text_row = 2;
    let mut proto_items = Vec::with_capacity(items.len());
    for (it, w) in items {
        let item = match it {
            FusionInput::Text(_) => {
                let c = conditioning_row(&texts.all, text_row)?;
                text_row += 1;
                interpolate_item::Item::Text(c)
            }
            FusionInput::Image(b) => interpolate_item::Item::Image(b.clone()),
        };
        proto_items.push(v1::InterpolateItem {
            item: Some(item),
            weight: *w,
        });
    }
    let mut rows = Vec::with_capacity(plan.seeds.len());
    for &seed in &plan.seeds {
        let req = v1::InterpolateRequest {
            items: proto_items.clone(),
            unconditional: Some(texts.rows.uncond.clone()),
            num_inference_steps: plan.sampling.prior_steps,
            guidance_scale: plan.sampling.prior_guidance,
            seed,
            options: None,
        };
        let r = st
            .clients(ctx)
            .interpolate(req)
            .await
            .map_err(|e| e.rename_field(|f| Some(format!("fusion.{f}"))))?;
        rows.push(r);
    }
    concat_rows(&rows)
}

/// Image-to-image and inpaint: the init image's latents, the strength and the mask.
#[derive(Default)]
struct Init {
    latents: Option<v1::Tensor>,
    strength: f32,
    mask: Option<v1::Tensor>,
}

/// Step 3: init image / mask for image-to-image and inpaint.
async fn init_image(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    family: v1::ModelFamily,
) -> Result<Init, ServiceError> {
    init_image_of(st, ctx, plan, family)
        .await
        .map_err(|e| e.rename_field(image_field(task_field(&plan.task))))
}

async fn init_image_of(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    family: v1::ModelFamily,
) -> Result<Init, ServiceError> {
    let encode = |image, repaint| {
        let req = encode_images_request(plan, family, image, repaint);
        async move { st.clients(ctx).encode_images(req).await }
    };
    match &plan.task {
        Task::ImageToImage {
            image, strength, ..
        } => {
            let (latents, _) = encode(image, Repaint::None).await?;
            Ok(Init {
                latents: Some(latents),
                strength: *strength,
                mask: None,
            })
        }
        Task::Inpaint { image, mask } => {
            let (latents, mask) = encode(image, Repaint::Mask(mask)).await?;
            Ok(Init {
                latents: Some(latents),
                strength: 0.0,
                mask,
            })
        }
        Task::Outpaint {
            image,
            left,
            top,
            right,
            bottom,
        } => {
            let margins = v1::OutpaintMargins {
                left: *left,
                top: *top,
                right: *right,
                bottom: *bottom,
            };
            let (latents, mask) = encode(image, Repaint::Outpaint(margins)).await?;
            Ok(Init {
                latents: Some(latents),
                strength: 0.0,
                mask,
            })
        }
        _ => Ok(Init::default()),
    }
}

/// The denoiser's conditioning and negative conditioning.
struct Conditioning {
    cond: v1::DecoderConditioning,
    uncond: v1::DecoderConditioning,
}

/// What the denoiser is conditioned on: the prior's image embeddings (with Kandinsky 2.1's
/// multilingual text, `n` rows each); for aMUSEd and Kandinsky 2.0, which have no prior, the
/// text encoder's rows: the prompt's repeated to `n` rows, the negative or empty prompt's one
/// row, which the denoiser broadcasts (Kandinsky 2.0 always gets it: the official pipeline
/// always guides).
fn denoiser_conditioning(
    step: Step,
    family: v1::ModelFamily,
    n: usize,
    w: &mut Work,
) -> Result<Conditioning, ServiceError> {
    let texts = w.texts.as_ref();
    match family {
        v1::ModelFamily::Amused => {
            let clip = needs(texts.and_then(|t| t.clip.as_ref()), step, "CLIP texts")?;
            Ok(Conditioning {
                cond: masked_token_conditioning(repeat_conditioning(&clip.rows.cond, n)?),
                uncond: masked_token_conditioning(clip.rows.uncond.clone()),
            })
        }
        v1::ModelFamily::Kandinsky20 => {
            let first = texts.and_then(|t| t.decoder.as_ref());
            let first = needs(first, step, "the first text encoder's rows")?;
            let second = texts.and_then(|t| t.decoder_2.as_ref());
            let second = needs(second, step, "the second text encoder's rows")?;
            Ok(Conditioning {
                cond: kd20_conditioning(&first.cond, &second.cond, n)?,
                uncond: kd20_conditioning(&first.uncond, &second.uncond, 1)?,
            })
        }
        _ => {
            let embeds = needs(w.embeds.take(), step, "image embeddings")?;
            let (cond_text, uncond_text) = match texts.and_then(|t| t.decoder.as_ref()) {
                Some(rows) => (
                    Some(repeat_conditioning(&rows.cond, n)?),
                    Some(repeat_conditioning(&rows.uncond, n)?),
                ),
                None => (None, None),
            };
            Ok(Conditioning {
                cond: decoder_conditioning(embeds.image, cond_text.as_ref()),
                uncond: decoder_conditioning(embeds.negative, uncond_text.as_ref()),
            })
        }
    }
}

/// Step 4's request. aMUSEd gets its masked-token parameters and never a scheduler, an explicit
/// schedule or a hint (its token map goes to the movq stage as the latents do); Kandinsky 2.0
/// its resolved sampler (DDIM, DDPM = the official p_sampler, or PLMS) and never an explicit
/// schedule or a hint (both refused before any stage runs).
fn denoise_request(
    plan: &Plan,
    family: v1::ModelFamily,
    conditioning: Conditioning,
    init: Init,
) -> v1::DenoiseRequest {
    let mut req = v1::DenoiseRequest {
        conditioning: Some(conditioning.cond),
        negative_conditioning: Some(conditioning.uncond),
        height: plan.height,
        width: plan.width,
        // An explicit schedule goes instead of the step count.
        num_inference_steps: if plan.sampling.decoder_timesteps.is_empty() {
            plan.sampling.decoder_steps
        } else {
            0
        },
        timesteps: plan.sampling.decoder_timesteps.clone(),
        guidance_scale: plan.sampling.decoder_guidance,
        scheduler: plan.sampling.scheduler as i32,
        seeds: plan.seeds.clone(),
        image_latents: init.latents,
        strength: init.strength,
        mask: init.mask,
        preview_every: plan.preview_every,
        hint_image: plan.task.hint().cloned().unwrap_or_default(),
        ..Default::default()
    };
    match family {
        v1::ModelFamily::Amused => {
            req.scheduler = v1::Scheduler::Unspecified as i32;
            req.timesteps.clear();
            req.hint_image.clear();
            req.masked_tokens = plan.requested.masked_tokens;
        }
        v1::ModelFamily::Kandinsky20 => {
            req.timesteps.clear();
            req.hint_image.clear();
        }
        _ => {}
    }
    req
}

/// Step 4: the denoiser, streaming progress (and previews, decoded, to a streaming client).
async fn denoise(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    req: v1::DenoiseRequest,
) -> Result<v1::Tensor, ServiceError> {
    let rename = denoiser_field(task_field(&plan.task));
    let mut stream = st
        .clients(ctx)
        .denoise(req)
        .await
        .map_err(|e| e.rename_field(&rename))?;
    let mut result = None;
    while let Some(ev) = StageClients::next_event(&mut stream)
        .await
        .map_err(|e| e.rename_field(&rename))?
    {
        match ev.event {
            Some(denoise_event::Event::Progress(p)) => progress(st, ctx, p).await?,
            Some(denoise_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    // A stream that ends without its result is a stage that went away mid-request.
    let result = result.ok_or_else(|| {
        ServiceError::Unavailable(
            "stage denoiser is unavailable: its stream ended without a result".into(),
        )
    })?;
    result
        .latents
        .ok_or_else(|| missing("denoiser", "result.latents"))
}

/// One denoiser progress event: relayed, with its preview decoded when a client streams.
async fn progress(st: &Stages, ctx: &Ctx, p: v1::DenoiseProgress) -> Result<(), ServiceError> {
    ctx.progress(v1::Stage::Denoiser, p.step, p.total_steps)
        .await?;
    if let Some(preview) = p.preview_latents {
        if ctx.events.is_some() {
            let images = decode(st, ctx, preview, v1::ImageFormat::Jpeg, 60).await?;
            ctx.emit(v1::generate_event::Event::Preview(v1::Preview {
                images,
                step: p.step,
            }))
            .await?;
        }
    }
    Ok(())
}

/// Step 5: the images, one per seed, in order.
async fn decode_images(
    st: &Stages,
    ctx: &Ctx,
    plan: &Plan,
    latents: v1::Tensor,
) -> Result<Vec<v1::GeneratedImage>, ServiceError> {
    let n = plan.seeds.len();
    let images = decode(st, ctx, latents, plan.format, plan.quality).await?;
    if images.len() != n {
        return Err(ServiceError::Internal(format!(
            "stage movq returned {} images for {n}",
            images.len()
        )));
    }
    Ok(images
        .into_iter()
        .zip(&plan.seeds)
        .enumerate()
        .map(|(i, (image, &seed))| v1::GeneratedImage {
            image: Some(image),
            seed,
            index: i as u32,
        })
        .collect())
}

fn concat_rows(parts: &[v1::Tensor]) -> Result<v1::Tensor, ServiceError> {
    tensor::concat_rows(parts).map_err(rows_err("prior"))
}

/// What the MoVQ stage makes the repaint mask from.
enum Repaint<'a> {
    /// None (image-to-image).
    None,
    /// The client's mask (inpaint).
    Mask(&'a [u8]),
    /// The margins of the outpainting canvas.
    Outpaint(v1::OutpaintMargins),
}

/// The movq request for the init image's latents and, for inpaint and outpaint, the
/// pre-processed repaint mask. Kandinsky 2.0's autoencoder samples its posterior: the image
/// (and its mask) goes once per image to generate, each with that image's seed, so that every
/// image depends on its own seed only (B rows of latents and masks). The other families encode
/// it once, deterministically, and take no seeds (one row, which the denoiser broadcasts).
fn encode_images_request(
    plan: &Plan,
    family: v1::ModelFamily,
    image: &[u8],
    repaint: Repaint<'_>,
) -> v1::EncodeImagesRequest {
    let seeded = family == v1::ModelFamily::Kandinsky20;
    let copies = if seeded { plan.seeds.len() } else { 1 };
    let (masks, outpaint) = match repaint {
        Repaint::None => (Vec::new(), None),
        Repaint::Mask(m) => (vec![m.to_vec(); copies], None),
        Repaint::Outpaint(margins) => (Vec::new(), Some(margins)),
    };
    v1::EncodeImagesRequest {
        images: vec![image.to_vec(); copies],
        masks,
        outpaint,
        width: plan.width,
        height: plan.height,
        seeds: if seeded {
            plan.seeds.clone()
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

async fn decode(
    st: &Stages,
    ctx: &Ctx,
    latents: v1::Tensor,
    format: v1::ImageFormat,
    quality: u32,
) -> Result<Vec<v1::Image>, ServiceError> {
    let req = v1::DecodeLatentsRequest {
        latents: Some(latents),
        format: format as i32,
        quality,
        ..Default::default()
    };
    st.clients(ctx).decode_latents(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::DecoderProfile;
    use crate::validate::{validate, Limits};

    /// A (rows, 2) f32 wire tensor filled with `v`.
    fn rows(n: usize, v: u8) -> v1::Tensor {
        v1::Tensor {
            shape: vec![n as i64, 2],
            dtype: v1::DType::DtypeF32 as i32,
            data: vec![v; n * 8].into(),
        }
    }

    fn text(v: u8) -> v1::TextEmbeddings {
        v1::TextEmbeddings {
            text_embeds: Some(rows(1, v)),
            hidden_states: Some(rows(1, v + 1)),
            attention_mask: Some(rows(1, 9)),
        }
    }

    fn amused() -> DecoderProfile {
        DecoderProfile {
            family: v1::ModelFamily::Amused,
            default_steps: 12,
            ..DecoderProfile::teacher()
        }
    }

    #[test]
    fn amused_is_conditioned_on_the_text_encoders_rows() {
        let mut w = Work {
            texts: Some(Texts {
                clip: Some(ClipTexts {
                    all: v1::TextEmbeddings::default(),
                    rows: PromptRows {
                        cond: text(1),
                        uncond: text(3),
                    },
                }),
                decoder: None,
                decoder_2: None,
            }),
            ..Default::default()
        };
        let c = denoiser_conditioning(Step::Denoise, v1::ModelFamily::Amused, 2, &mut w).unwrap();
        assert_eq!(
            c.cond,
            v1::DecoderConditioning {
                image_embeds: None,
                text_embeds: Some(rows(2, 1)),
                text_hidden_states: Some(rows(2, 2)),
                text_attention_mask: None,
                text_hidden_states_2: None,
            }
        );
        assert_eq!(
            c.uncond,
            v1::DecoderConditioning {
                image_embeds: None,
                text_embeds: Some(rows(1, 3)),
                text_hidden_states: Some(rows(1, 4)),
                text_attention_mask: None,
                text_hidden_states_2: None,
            }
        );
        // Kandinsky needs the prior's embeddings.
        let e = denoiser_conditioning(Step::Denoise, v1::ModelFamily::Kandinsky22, 2, &mut w)
            .err()
            .unwrap();
        assert!(e.to_string().contains("image embeddings"), "{e}");
    }

    #[test]
    fn the_amused_denoise_request_carries_its_params_and_no_scheduler() {
        let params = v1::MaskedTokenParams {
            aesthetic_score: Some(7.0),
            ..Default::default()
        };
        let req = v1::GenerateRequest {
            prompt: "a cat".into(),
            width: Some(64),
            height: Some(128),
            seeds: vec![4],
            preview_every: 3,
            task: Some(v1::generate_request::Task::ImageToImage(v1::ImageToImage {
                image: vec![1],
                strength: Some(0.5),
                hint: Vec::new(),
            })),
            decoder: Some(v1::DecoderParams {
                masked_tokens: Some(params),
                ..Default::default()
            }),
            ..Default::default()
        };
        let plan = validate(&req, &Limits::default(), || 7)
            .unwrap()
            .for_model(&amused())
            .unwrap();
        let conditioning = Conditioning {
            cond: masked_token_conditioning(text(1)),
            uncond: masked_token_conditioning(text(3)),
        };
        let init = Init {
            latents: Some(rows(1, 5)),
            strength: 0.5,
            mask: None,
        };
        let r = denoise_request(&plan, v1::ModelFamily::Amused, conditioning, init);
        assert_eq!(r.masked_tokens, Some(params));
        assert_eq!(
            (r.scheduler, r.timesteps.len(), r.hint_image.len()),
            (v1::Scheduler::Unspecified as i32, 0, 0)
        );
        assert_eq!(
            (r.num_inference_steps, r.guidance_scale, r.strength),
            (12, 10.0, 0.5)
        );
        assert_eq!((r.height, r.width, r.seeds), (128, 64, vec![4]));
        assert_eq!((r.image_latents, r.preview_every), (Some(rows(1, 5)), 3));
        assert!(r.latents.is_none() && r.hint.is_none());
    }

    fn kd20() -> DecoderProfile {
        DecoderProfile::of(&v1::ModelInfo {
            family: v1::ModelFamily::Kandinsky20 as i32,
            decoder_kind: v1::DecoderKind::TextToImage as i32,
            ..Default::default()
        })
    }

    /// An mT5 row: hidden states and a mask, no pooled embedding.
    fn mt5(v: u8) -> v1::TextEmbeddings {
        v1::TextEmbeddings {
            text_embeds: None,
            hidden_states: Some(rows(1, v)),
            attention_mask: Some(rows(1, 9)),
        }
    }

    #[test]
    fn kandinsky_2_0_is_conditioned_on_both_text_encoders_and_always_on_the_negative() {
        let texts = |second: Option<PromptRows>| Texts {
            clip: None,
            decoder: Some(PromptRows {
                cond: text(1),
                uncond: text(3),
            }),
            decoder_2: second,
        };
        let mut w = Work {
            texts: Some(texts(Some(PromptRows {
                cond: mt5(5),
                uncond: mt5(7),
            }))),
            ..Default::default()
        };
        let family = v1::ModelFamily::Kandinsky20;
        let c = denoiser_conditioning(Step::Denoise, family, 3, &mut w).unwrap();
        // The prompt's rows, one per image; no image embeddings, no masks.
        assert_eq!(
            c.cond,
            v1::DecoderConditioning {
                image_embeds: None,
                text_embeds: Some(rows(3, 1)),
                text_hidden_states: Some(rows(3, 2)),
                text_attention_mask: None,
                text_hidden_states_2: Some(rows(3, 5)),
            }
        );
        // The negative (or empty) prompt's one row, broadcast by the denoiser.
        assert_eq!(
            c.uncond,
            v1::DecoderConditioning {
                image_embeds: None,
                text_embeds: Some(rows(1, 3)),
                text_hidden_states: Some(rows(1, 4)),
                text_attention_mask: None,
                text_hidden_states_2: Some(rows(1, 7)),
            }
        );
        // Without the mT5 rows it is the gateway's own error, naming what is missing.
        let mut w = Work {
            texts: Some(texts(None)),
            ..Default::default()
        };
        let e = denoiser_conditioning(Step::Denoise, family, 3, &mut w)
            .err()
            .unwrap();
        assert!(e.to_string().contains("second text encoder"), "{e}");
    }

    fn kd20_plan(
        decoder: Option<v1::DecoderParams>,
        task: Option<v1::generate_request::Task>,
    ) -> Plan {
        let req = v1::GenerateRequest {
            prompt: "a cat".into(),
            width: Some(128),
            height: Some(64),
            num_images: Some(3),
            seeds: vec![4, 5, 6],
            preview_every: 5,
            decoder,
            task,
            ..Default::default()
        };
        validate(&req, &Limits::default(), || 7)
            .unwrap()
            .for_model(&kd20())
            .unwrap()
    }

    fn kd20_conditioning_of_rows() -> Conditioning {
        Conditioning {
            cond: kd20_conditioning(&text(1), &mt5(5), 3).unwrap(),
            uncond: kd20_conditioning(&text(3), &mt5(7), 1).unwrap(),
        }
    }

    #[test]
    fn the_kandinsky_2_0_denoise_request_carries_its_sampler_seeds_and_negative() {
        let family = v1::ModelFamily::Kandinsky20;
        let plan = kd20_plan(None, None);
        let r = denoise_request(&plan, family, kd20_conditioning_of_rows(), Init::default());
        // BALANCED: 50 DDIM steps, guidance 7; both conditionings.
        assert_eq!(
            (r.num_inference_steps, r.guidance_scale, r.scheduler),
            (50, 7.0, v1::Scheduler::Ddim as i32)
        );
        assert_eq!(r.conditioning, Some(kd20_conditioning_of_rows().cond));
        assert_eq!(
            r.negative_conditioning,
            Some(kd20_conditioning_of_rows().uncond)
        );
        assert_eq!((r.height, r.width, r.seeds), (64, 128, vec![4, 5, 6]));
        assert_eq!(r.preview_every, 5);
        assert!(r.timesteps.is_empty() && r.hint_image.is_empty() && r.hint.is_none());
        assert!(r.latents.is_none() && r.image_latents.is_none() && r.mask.is_none());
        assert!(r.masked_tokens.is_none());
        // A named sampler goes as named.
        for s in [v1::Scheduler::Plms, v1::Scheduler::Ddpm] {
            let plan = kd20_plan(
                Some(v1::DecoderParams {
                    scheduler: s as i32,
                    num_inference_steps: Some(30),
                    ..Default::default()
                }),
                None,
            );
            let r = denoise_request(&plan, family, kd20_conditioning_of_rows(), Init::default());
            assert_eq!((r.scheduler, r.num_inference_steps), (s as i32, 30));
        }
        // Image-to-image: the movq latents and the strength.
        let task = v1::generate_request::Task::ImageToImage(v1::ImageToImage {
            image: vec![1],
            strength: Some(0.5),
            hint: Vec::new(),
        });
        let plan = kd20_plan(None, Some(task));
        let init = Init {
            latents: Some(rows(3, 5)),
            strength: 0.5,
            mask: None,
        };
        let r = denoise_request(&plan, family, kd20_conditioning_of_rows(), init);
        assert_eq!((r.image_latents, r.strength), (Some(rows(3, 5)), 0.5));
    }

    #[test]
    fn only_kandinsky_2_0_sends_seeds_to_encode_images_with_a_copy_per_image() {
        let plan = kd20_plan(None, None);
        let mask = [9u8, 9];
        let kd20 = v1::ModelFamily::Kandinsky20;
        let r = encode_images_request(&plan, kd20, &[1, 2], Repaint::None);
        assert_eq!(r.images, vec![vec![1, 2]; 3]);
        assert_eq!((r.seeds, r.masks.len()), (vec![4, 5, 6], 0));
        assert_eq!((r.width, r.height, r.outpaint), (128, 64, None));
        let r = encode_images_request(&plan, kd20, &[1, 2], Repaint::Mask(&mask));
        assert_eq!((r.images.len(), r.masks), (3, vec![mask.to_vec(); 3]));
        assert_eq!(r.seeds, vec![4, 5, 6]);
        let margins = v1::OutpaintMargins {
            left: 64,
            ..Default::default()
        };
        let r = encode_images_request(&plan, kd20, &[1, 2], Repaint::Outpaint(margins));
        assert_eq!((r.images.len(), r.masks.len()), (3, 0));
        assert_eq!((r.outpaint, r.seeds), (Some(margins), vec![4, 5, 6]));
        // The other families' movq encodes the image once and gets no seed.
        for family in [
            v1::ModelFamily::Kandinsky22,
            v1::ModelFamily::Kandinsky21,
            v1::ModelFamily::Amused,
        ] {
            let r = encode_images_request(&plan, family, &[1, 2], Repaint::Mask(&mask));
            assert_eq!(r.images, vec![vec![1, 2]]);
            assert_eq!(r.masks, vec![mask.to_vec()]);
            assert!(r.seeds.is_empty(), "{family:?}");
        }
    }
}
