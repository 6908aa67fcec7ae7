//! `Sample`: B text conditionings → B CLIP image embeddings, with classifier-free guidance,
//! seeded per row; optionally from explicit initial latents, or Emb2Emb from init embeddings.

use crate::model::PriorModel;
use crate::watchdog::{GuardedNoise, Watchdog};
use crate::wire::{conditioning, optional_tensor, sample_params, to_wire_f32};
use kd_models::noise::SeededNoise;
use kd_proto::v1;
use kd_runtime::cache::{CacheKey, EmbeddingCache};
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{blocking, Metrics, ServiceError, Stage};
use prost::Message;
use std::time::Instant;
use tonic::{Response, Status};

/// Validates and runs one request; returns the response.
pub fn compute(
    m: &PriorModel,
    req: &v1::PriorSampleRequest,
    max_batch: usize,
    metrics: &Metrics,
    watchdog: &Watchdog,
) -> Result<v1::PriorSampleResponse, ServiceError> {
    watchdog.check()?;
    check_requested_dtype(req.options.as_ref(), m.dtype)?;
    let params = sample_params(req.num_inference_steps, req.guidance_scale)?;
    let cond_wire = req.conditioning.as_ref().ok_or_else(|| {
        ServiceError::invalid(
            "conditioning",
            "required: the text-encoder's prior_conditioning for B rows",
        )
    })?;
    let cond = conditioning("conditioning", cond_wire, m, None, max_batch)?;
    let rows = cond.rows()?;
    if req.seeds.len() != rows {
        return Err(ServiceError::invalid(
            "seeds",
            format!(
                "{} seeds for {rows} conditioning rows; give exactly one seed per row",
                req.seeds.len()
            ),
        ));
    }
    let uncond = match &req.unconditional {
        Some(u) => {
            let u_rows = u
                .text_embeds
                .as_ref()
                .and_then(|t| t.shape.first())
                .copied();
            let want = if u_rows == Some(1) { 1 } else { rows };
            Some(conditioning("unconditional", u, m, Some(want), max_batch)?)
        }
        None => None,
    };
    let latents = optional_tensor("latents", req.latents.as_ref())?;
    let init = optional_tensor("init_image_embeds", req.init_image_embeds.as_ref())?;
    let mut noise = GuardedNoise::new(SeededNoise::new(&req.seeds), watchdog);
    let (embeds, steps) = match init {
        Some(init) => {
            if latents.is_some() {
                return Err(ServiceError::invalid(
                    "latents",
                    "cannot be combined with init_image_embeds (emb2emb starts from the noised init embeddings)",
                ));
            }
            let strength = f64::from(req.strength);
            let steps = m
                .prior
                .emb2emb_timesteps(params.num_inference_steps, strength)?
                .len();
            let e =
                m.prior
                    .emb2emb(&cond, uncond.as_ref(), &init, strength, &params, &mut noise)?;
            (e, steps)
        }
        None => {
            if req.strength != 0.0 {
                return Err(ServiceError::invalid(
                    "strength",
                    format!(
                        "{} given without init_image_embeds; strength (0, 1] applies only to emb2emb",
                        req.strength
                    ),
                ));
            }
            let e = m
                .prior
                .sample(
                    &cond,
                    uncond.as_ref(),
                    &params,
                    latents.as_ref(),
                    &mut noise,
                )
                .map_err(|e| noise.explain(e))?;
            (e, params.num_inference_steps)
        }
    };
    metrics.batch(rows);
    metrics.steps(steps as u64);
    Ok(v1::PriorSampleResponse {
        image_embeds: Some(to_wire_f32(&embeds)?),
        model: Some(m.info.clone()),
    })
}

/// The RPC: decoding, checks and sampling all run on the blocking pool; sampling stops between
/// steps when the caller leaves or its `deadline` passes.
///
/// A prior output is a sample, so it is cached only under a key that holds the whole request —
/// conditioning, seeds, steps, guidance, latents, strength — and the weights' revision.
pub async fn handle(
    stage: &Stage<PriorModel>,
    cache: &EmbeddingCache,
    req: v1::PriorSampleRequest,
    max_batch: usize,
    deadline: Option<Instant>,
) -> Result<Response<v1::PriorSampleResponse>, Status> {
    let metrics = stage.metrics.clone();
    stage
        .unary("Sample", |m| async move {
            let key = CacheKey::new(&m.info.revision, "prior", &[&req.encode_to_vec()]);
            if let Some(resp) = cache
                .get(&key)
                .await
                .and_then(|b| v1::PriorSampleResponse::decode(b.as_slice()).ok())
            {
                return Ok(resp);
            }
            let (watchdog, _cancel_on_drop) = Watchdog::new(deadline);
            let resp = blocking(move || compute(&m, &req, max_batch, &metrics, &watchdog)).await?;
            cache.put(&key, &resp.encode_to_vec()).await;
            Ok(resp)
        })
        .await
}
