//! `Interpolate`: weighted fusion of texts and images (diffusers `interpolate`). Text items are
//! sampled through the prior one after another from one RNG seeded with the request's seed (as
//! diffusers reuses one generator); image items are embedded by the vision tower; ready
//! embeddings are taken as they are. The result is `Σ wᵢ·embᵢ` (1, D), weights not normalised.

use crate::model::PriorModel;
use crate::watchdog::{GuardedNoise, Watchdog};
use crate::wire::{conditioning, sample_params, tensor, to_wire_f32};
use kd_models::clip::decode_image;
use kd_models::noise::SeededNoise;
use kd_models::prior::FusionInput;
use kd_proto::v1;
use kd_proto::v1::interpolate_item::Item;
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{blocking, Metrics, ServiceError, Stage};
use std::time::Instant;
use tonic::{Response, Status};

fn item(m: &PriorModel, i: usize, it: &v1::InterpolateItem) -> Result<FusionInput, ServiceError> {
    if !it.weight.is_finite() {
        return Err(ServiceError::invalid(
            format!("items[{i}].weight"),
            format!("{}; every weight must be a finite number", it.weight),
        ));
    }
    Ok(match &it.item {
        Some(Item::Text(t)) => {
            FusionInput::Text(conditioning(&format!("items[{i}].text"), t, m, Some(1), 1)?)
        }
        Some(Item::Image(bytes)) => FusionInput::Image(
            decode_image(bytes)
                .map_err(|e| ServiceError::invalid(format!("items[{i}].image"), e.to_string()))?,
        ),
        Some(Item::ImageEmbeds(t)) => {
            let field = format!("items[{i}].image_embeds");
            let e = tensor(&field, Some(t))?;
            let d = m.prior.embedding_dim();
            if e.dims() != [1, d] {
                return Err(ServiceError::invalid(
                    field,
                    format!("shape {:?}, expected (1, {d})", e.dims()),
                ));
            }
            FusionInput::Embeds(e)
        }
        None => {
            return Err(ServiceError::invalid(
                format!("items[{i}]"),
                "set one of text, image or image_embeds",
            ))
        }
    })
}

/// Validates and runs one request; returns the response.
pub fn compute(
    m: &PriorModel,
    req: &v1::InterpolateRequest,
    max_batch: usize,
    metrics: &Metrics,
    watchdog: &Watchdog,
) -> Result<v1::PriorSampleResponse, ServiceError> {
    watchdog.check()?;
    check_requested_dtype(req.options.as_ref(), m.dtype)?;
    if req.items.is_empty() || req.items.len() > max_batch {
        return Err(ServiceError::invalid(
            "items",
            format!(
                "{} items, allowed 1..={max_batch} texts or images",
                req.items.len()
            ),
        ));
    }
    let params = sample_params(req.num_inference_steps, req.guidance_scale)?;
    let items = req
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| item(m, i, it))
        .collect::<Result<Vec<_>, _>>()?;
    let weights: Vec<f32> = req.items.iter().map(|it| it.weight).collect();
    let uncond = req
        .unconditional
        .as_ref()
        .map(|u| conditioning("unconditional", u, m, Some(1), 1))
        .transpose()?;
    let texts = items
        .iter()
        .filter(|i| matches!(i, FusionInput::Text(_)))
        .count();
    let mut noise = GuardedNoise::new(SeededNoise::new(&[req.seed]), watchdog);
    let embeds = m
        .prior
        .fuse(&items, &weights, uncond.as_ref(), &params, None, &mut noise)
        .map_err(|e| noise.explain(e))?;
    metrics.batch(items.len());
    metrics.steps((texts * params.num_inference_steps) as u64);
    Ok(v1::PriorSampleResponse {
        image_embeds: Some(to_wire_f32(&embeds)?),
        model: Some(m.info.clone()),
    })
}

/// The RPC: decoding, checks, sampling and the vision tower run on the blocking pool; sampling
/// stops between steps when the caller leaves or its `deadline` passes.
pub async fn handle(
    stage: &Stage<PriorModel>,
    req: v1::InterpolateRequest,
    max_batch: usize,
    deadline: Option<Instant>,
) -> Result<Response<v1::PriorSampleResponse>, Status> {
    let metrics = stage.metrics.clone();
    stage
        .unary("Interpolate", |m| async move {
            let (watchdog, _cancel_on_drop) = Watchdog::new(deadline);
            blocking(move || compute(&m, &req, max_batch, &metrics, &watchdog)).await
        })
        .await
}
