//! The loaded model of this stage: one `VqModel` and what requests are checked against.

use crate::Config;
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_runtime::config::PixelArgs;
use kd_runtime::model_info::model_info;
use kd_runtime::{ServiceError, StageModel};

impl Movq {
    /// INVALID_ARGUMENT naming `field` when an image of `height` × `width` pixels is over
    /// `--max-pixels`.
    pub(crate) fn check_pixels(
        &self,
        field: &str,
        height: usize,
        width: usize,
    ) -> Result<(), ServiceError> {
        PixelArgs::check(field, height as u64, width as u64, self.max_pixels)
    }
}

/// The loaded model and what requests are checked against.
pub struct Movq {
    pub(crate) vq: VqModel,
    pub(crate) info: v1::ModelInfo,
    pub(crate) device: candle_core::Device,
    pub(crate) max_batch: usize,
    /// Largest image (height × width pixels) decoded or encoded.
    pub(crate) max_pixels: u64,
}

impl Movq {
    /// Loads `movq/` from a decoder checkpoint folder and runs one small decode.
    pub fn load_and_warm(config: &Config) -> Result<Self, ServiceError> {
        let dir = CheckpointDir::open(&config.stage.model_dir)?;
        let component = dir.component("movq")?;
        let device = config
            .stage
            .device
            .open()
            .map_err(ServiceError::Unavailable)?;
        let opts = MovqOptions {
            attention_chunk: config.attention_chunk,
            ..MovqOptions::default()
        };
        let vq = VqModel::load(&component, opts, config.stage.dtype, &device)?;
        let info = model_info(&dir, "movq", &["movq"], config.stage.dtype, &device)?;
        let m = Self {
            vq,
            info,
            max_batch: config.max_batch,
            max_pixels: config.pixels.limit(&device),
            device,
        };
        crate::decode::warm_up(&m)?;
        Ok(m)
    }
}

impl StageModel for Movq {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
