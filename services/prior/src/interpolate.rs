//! `Interpolate`: weighted fusion of texts and images (diffusers `interpolate`). Text items are
//! sampled through the prior one after another from one RNG seeded with the request's seed (as
//! diffusers reuses one generator); image items are embedded by the vision tower; ready
//! embeddings are taken as they are. The result is `Σ wᵢ·embᵢ` (1, D), weights not normalised.

use crate::model::PriorModel;
use crate::noise::StopNoise;
use crate::wire::{conditioning, sample_params, tensor, to_wire_f32};
use kd_models::clip::{decode_image, TextConditioning};
use kd_models::noise::SeededNoise;
use kd_models::prior::{FusionInput, SampleParams};
use kd_proto::v1;
use kd_proto::v1::interpolate_item::Item;
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{Cancel, Metrics, ServiceError};

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

/// A checked request: every item decoded and matched against the loaded prior.
pub struct Checked {
    items: Vec<FusionInput>,
    weights: Vec<f32>,
    uncond: Option<TextConditioning>,
    params: SampleParams,
    seed: u64,
}

/// Validates one request against the loaded model (before admission).
pub fn check(
    m: &PriorModel,
    req: &v1::InterpolateRequest,
    max_batch: usize,
) -> Result<Checked, ServiceError> {
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
    let uncond = req
        .unconditional
        .as_ref()
        .map(|u| conditioning("unconditional", u, m, Some(1), 1))
        .transpose()?;
    Ok(Checked {
        items,
        weights: req.items.iter().map(|it| it.weight).collect(),
        uncond,
        params,
        seed: req.seed,
    })
}

/// Fuses a checked request (on the blocking pool); sampling stops between steps when `cancel`
/// fires.
pub fn run(
    m: &PriorModel,
    c: Checked,
    metrics: &Metrics,
    cancel: &Cancel,
) -> Result<v1::InterpolateResponse, ServiceError> {
    let texts = c
        .items
        .iter()
        .filter(|i| matches!(i, FusionInput::Text(_)))
        .count();
    let mut noise = StopNoise::new(SeededNoise::new(&[c.seed]), cancel);
    let embeds = m
        .prior
        .fuse(
            &c.items,
            &c.weights,
            c.uncond.as_ref(),
            &c.params,
            None,
            &mut noise,
        )
        .map_err(|e| noise.explain(e))?;
    metrics.batch(c.items.len());
    metrics.steps((texts * c.params.num_inference_steps) as u64);
    Ok(v1::InterpolateResponse {
        image_embeds: Some(to_wire_f32(&embeds)?),
        model: Some(m.info.clone()),
    })
}
