//! `Sample`: B text conditionings → B CLIP image embeddings, with classifier-free guidance,
//! seeded per row; optionally from explicit initial latents, or Emb2Emb from init embeddings.

use crate::model::PriorModel;
use crate::noise::StopNoise;
use crate::wire::{conditioning, optional_tensor, sample_params, to_wire_f32};
use candle_core::Tensor;
use kd_models::clip::TextConditioning;
use kd_models::noise::SeededNoise;
use kd_models::prior::SampleParams;
use kd_proto::v1;
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{Cancel, Metrics, ServiceError};

/// A checked request: every tensor decoded and matched against the loaded prior.
pub struct Checked {
    cond: TextConditioning,
    uncond: Option<TextConditioning>,
    params: SampleParams,
    seeds: Vec<u64>,
    start: Start,
}

/// Where sampling starts.
enum Start {
    /// From noise (or the given initial latents).
    Noise(Option<Tensor>),
    /// Emb2Emb: from noised init embeddings, at `strength`.
    Init(Tensor, f64),
}

/// Validates one request against the loaded model (before admission).
pub fn check(
    m: &PriorModel,
    req: &v1::SampleRequest,
    max_batch: usize,
    deadline: Option<std::time::Instant>,
) -> Result<Checked, ServiceError> {
    check_requested_dtype(req.options.as_ref(), m.dtype)?;
    let params = sample_params(req.num_inference_steps, req.guidance_scale)?;
    let steps = params.num_inference_steps;
    let estimate = m.step_cost.seconds(steps as f64);
    let work = format!("prior sampling ({steps} steps)");
    kd_runtime::budget::check(estimate, m.admission_safety, deadline, work)?;
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
    let start = match (init, latents) {
        (Some(_), Some(_)) => {
            return Err(ServiceError::invalid(
                "latents",
                "cannot be combined with init_image_embeds (emb2emb starts from the noised init embeddings)",
            ))
        }
        (Some(init), None) => Start::Init(init, f64::from(req.strength)),
        (None, latents) if req.strength == 0.0 => Start::Noise(latents),
        (None, _) => {
            return Err(ServiceError::invalid(
                "strength",
                format!(
                    "{} given without init_image_embeds; strength (0, 1] applies only to emb2emb",
                    req.strength
                ),
            ))
        }
    };
    Ok(Checked {
        cond,
        uncond,
        params,
        seeds: req.seeds.clone(),
        start,
    })
}

/// Samples a checked request (on the blocking pool); stops between steps when `cancel` fires.
pub fn run(
    m: &PriorModel,
    c: Checked,
    metrics: &Metrics,
    cancel: &Cancel,
) -> Result<v1::SampleResponse, ServiceError> {
    let mut noise = StopNoise::new(SeededNoise::new(&c.seeds), cancel);
    let uncond = c.uncond.as_ref();
    let (embeds, steps) = match &c.start {
        Start::Init(init, strength) => {
            let steps = m
                .prior
                .emb2emb_timesteps(c.params.num_inference_steps, *strength)?
                .len();
            let e = m
                .prior
                .emb2emb(&c.cond, uncond, init, *strength, &c.params, &mut noise)
                .map_err(|e| noise.explain(e))?;
            (e, steps)
        }
        Start::Noise(latents) => {
            let e = m
                .prior
                .sample(&c.cond, uncond, &c.params, latents.as_ref(), &mut noise)
                .map_err(|e| noise.explain(e))?;
            (e, c.params.num_inference_steps)
        }
    };
    metrics.batch(c.seeds.len());
    metrics.steps(steps as u64);
    Ok(v1::SampleResponse {
        image_embeds: Some(to_wire_f32(&embeds)?),
        model: Some(m.info.clone()),
    })
}
