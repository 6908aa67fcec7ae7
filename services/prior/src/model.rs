//! The loaded model of this stage: the prior sampler and vision tower plus what the service
//! reports about it.

use candle_core::{DType, Tensor};
use kd_models::clip::TextConditioning;
use kd_models::noise::SeededNoise;
use kd_models::prior::{ImagePrior, SampleParams};
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_runtime::budget::{self, Cost};
use kd_runtime::config::StageArgs;
use kd_runtime::model_info::model_info;
use kd_runtime::{ServiceError, StageModel};

/// The checkpoint components this stage loads (and whose files make up its revision).
pub const COMPONENTS: [&str; 4] = ["prior", "scheduler", "image_encoder", "image_processor"];

/// The prior sampler with the vision tower, and its [`v1::ModelInfo`].
#[derive(Debug)]
pub struct PriorModel {
    /// PriorTransformer + UnCLIP scheduler + CLIP vision tower + image processor.
    pub prior: ImagePrior,
    /// What every response reports.
    pub info: v1::ModelInfo,
    /// The compute dtype.
    pub dtype: DType,
    /// One guided sample's cost per step, calibrated at warm-up.
    pub step_cost: Cost,
    /// `--admission-safety`.
    pub admission_safety: f64,
}

impl PriorModel {
    /// Opens the device, loads the components, computes the zero-image embedding and runs one
    /// 2-step guided sample on a dummy conditioning (so the first request pays no warm-up).
    pub fn load_and_warm(args: &StageArgs) -> Result<Self, ServiceError> {
        let device = args.open_device()?;
        let dir = CheckpointDir::open(&args.model_dir)?;
        let prior = ImagePrior::load(&dir, args.dtype, &device)?;
        let info = model_info(&dir, "prior", &COMPONENTS, args.dtype, &device)?;
        prior.zero_image_embed()?;
        let (p, n, d) = (
            prior.text_embed_dim(),
            prior.num_embeddings(),
            prior.embedding_dim(),
        );
        let dummy = TextConditioning {
            text_embeds: Tensor::zeros((1, p), DType::F32, &device)?,
            hidden_states: Tensor::zeros((1, n, d), DType::F32, &device)?,
            mask: Tensor::ones((1, n), DType::U32, &device)?,
        };
        let params = SampleParams {
            num_inference_steps: 2,
            guidance_scale: 4.0,
        };
        let sample = |steps: usize| {
            let params = SampleParams {
                num_inference_steps: steps,
                ..params
            };
            budget::time_to_host(|| {
                let noise = &mut SeededNoise::new(&[0]);
                Ok(prior.sample(&dummy, Some(&dummy), &params, None, noise)?)
            })
            .map(|t| (steps as f64, t))
        };
        // The first run pays lazy initialisation; the next two fit the cost per step.
        sample(2)?;
        let step_cost = Cost::fit(sample(2)?, sample(6)?);
        Ok(Self {
            prior,
            info,
            dtype: args.dtype,
            step_cost,
            admission_safety: args.admission_safety,
        })
    }
}

impl StageModel for PriorModel {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
