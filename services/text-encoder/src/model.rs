//! The loaded model of this stage: the CLIP prompt encoder plus what the service reports about it.

use candle_core::DType;
use kd_models::clip::ClipTextEncoder;
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_runtime::config::StageArgs;
use kd_runtime::model_info::model_info;
use kd_runtime::ServiceError;

/// The checkpoint components this stage loads (and whose files make up its revision).
pub const COMPONENTS: [&str; 2] = ["tokenizer", "text_encoder"];

/// The prompt encoder and its [`v1::ModelInfo`].
#[derive(Debug)]
pub struct TextModel {
    /// Tokenizer + CLIP text tower.
    pub encoder: ClipTextEncoder,
    /// What Encode and Info report.
    pub info: v1::ModelInfo,
    /// The compute dtype.
    pub dtype: DType,
}

impl TextModel {
    /// Opens the device, loads `tokenizer/` and `text_encoder/` and runs one warm-up encode.
    pub fn load_and_warm(args: &StageArgs) -> Result<Self, ServiceError> {
        let device = args.device.open().map_err(ServiceError::Internal)?;
        let dir = CheckpointDir::open(&args.model_dir)?;
        let encoder = ClipTextEncoder::load(&dir, args.dtype, &device)?;
        let info = model_info(&dir, "text_encoder", &COMPONENTS, args.dtype, &device)?;
        encoder.encode(&[""])?;
        Ok(Self {
            encoder,
            info,
            dtype: args.dtype,
        })
    }
}
