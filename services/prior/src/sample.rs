//! `Sample`: B text conditionings → B CLIP image embeddings, with classifier-free guidance,
//! seeded per row; optionally from explicit initial latents, or Emb2Emb from init embeddings.
//! Concurrent calls sample together ([`run_batch`]), each as it samples alone.

use crate::model::PriorModel;
use crate::wire::{conditioning, optional_tensor, sample_params, to_wire_f32};
use candle_core::Tensor;
use kd_models::clip::TextConditioning;
use kd_models::noise::{NoiseSource, SeededNoise};
use kd_models::prior::{PriorRun, SampleParams};
use kd_proto::v1;
use kd_runtime::microbatch::{shared_failure, BatchContext, Item};
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{Cancel, Metrics, ServiceError};
use std::sync::Arc;

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

/// A Sample call waiting to share the prior's transformer calls.
pub type Job = (Arc<PriorModel>, Checked);

impl Checked {
    /// Transformer rows per step: one per conditioning row, two under CFG.
    pub fn rows(&self) -> usize {
        let cfg = if self.params.guidance_scale > 1.0 {
            2
        } else {
            1
        };
        self.seeds.len() * cfg
    }

    /// The run at its start (its start noise drawn).
    fn start(&self, m: &PriorModel, noise: &mut SeededNoise) -> kd_models::Result<PriorRun> {
        let uncond = self.uncond.as_ref();
        match &self.start {
            Start::Init(init, strength) => {
                m.prior
                    .start_emb2emb(&self.cond, uncond, init, *strength, &self.params, noise)
            }
            Start::Noise(latents) => {
                m.prior
                    .start_sample(&self.cond, uncond, &self.params, latents.as_ref(), noise)
            }
        }
    }
}

/// A request sampling in a batch.
struct Sampling {
    index: usize,
    run: PriorRun,
    noise: SeededNoise,
    cancel: Cancel,
}

/// Samples several requests together: every step of the running requests is ONE transformer
/// call ([`kd_models::prior::ImagePrior::step_runs`]), each request with its own schedule,
/// guidance, seeds and start. Calls that arrive meanwhile join at the next step boundary while
/// their rows fit ([`BatchContext::join`]); a request leaves when its last step ran, or at the
/// next step boundary once its caller went away or its deadline passed (the others go on
/// unchanged).
pub fn run_batch(
    items: Vec<Item<Job>>,
    ctx: &mut dyn BatchContext<Job>,
    metrics: &Metrics,
) -> Vec<Result<v1::SampleResponse, ServiceError>> {
    let Some(m) = items.first().map(|i| i.job.0.clone()) else {
        return Vec::new();
    };
    let mut results: Vec<Option<Result<v1::SampleResponse, ServiceError>>> = Vec::new();
    let mut running: Vec<Sampling> = Vec::new();
    let admit = |items: Vec<Item<Job>>, results: &mut Vec<_>, running: &mut Vec<_>| {
        for item in items {
            let index = results.len();
            let mut noise = SeededNoise::new(&item.job.1.seeds);
            match item.job.1.start(&m, &mut noise) {
                Ok(run) => {
                    results.push(None);
                    running.push(Sampling {
                        index,
                        run,
                        noise,
                        cancel: item.cancel,
                    });
                }
                Err(e) => results.push(Some(Err(e.into()))),
            }
        }
    };
    admit(items, &mut results, &mut running);
    loop {
        running.retain(|s| match s.cancel.check_at("during sampling") {
            Ok(()) => true,
            Err(reason) => {
                results[s.index] = Some(Err(reason));
                false
            }
        });
        let in_use = running.iter().map(|s| s.run.rows()).sum();
        admit(ctx.join(in_use), &mut results, &mut running);
        if running.is_empty() {
            break;
        }
        let mut batch: Vec<(&mut PriorRun, &mut dyn NoiseSource)> = running
            .iter_mut()
            .map(|s| (&mut s.run, &mut s.noise as &mut dyn NoiseSource))
            .collect();
        if let Err(e) = m.prior.step_runs(&mut batch) {
            let e = ServiceError::from(e);
            for s in running.drain(..) {
                results[s.index] = Some(Err(shared_failure(&s.cancel, &e, "during sampling")));
            }
            break;
        }
        metrics.steps(running.len() as u64);
        for s in std::mem::take(&mut running) {
            if !s.run.is_done() {
                running.push(s);
                continue;
            }
            let embeds = m.prior.finish(s.run).map_err(ServiceError::from);
            results[s.index] = Some(embeds.and_then(|e| {
                Ok(v1::SampleResponse {
                    image_embeds: Some(to_wire_f32(&e)?),
                    model: Some(m.info.clone()),
                })
            }));
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ServiceError::Internal("a sample got no result".into()))))
        .collect()
}
