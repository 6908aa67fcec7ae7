//! The loaded model of this stage: the CLIP prompt encoder of the prior folder and, for
//! Kandinsky 2.1, the decoder folder's multilingual text encoder, plus what the service reports.

use candle_core::DType;
use kd_models::clip::{ClipTextEncoder, TextHiddenLayer};
use kd_models::mclip::MultilingualTextEncoder;
use kd_models::{CheckpointDir, ModelFamily};
use kd_proto::v1;
use kd_runtime::config::StageArgs;
use kd_runtime::model_info::{model_info, revision};
use kd_runtime::{ServiceError, StageModel};
use std::path::Path;

/// The checkpoint components this stage loads from each folder (and whose files make up its
/// revision).
pub const COMPONENTS: [&str; 2] = ["tokenizer", "text_encoder"];

/// The prompt encoders and their [`v1::ModelInfo`].
#[derive(Debug)]
pub struct TextModel {
    /// Tokenizer + CLIP text tower (the prior's conditioning; both families).
    pub encoder: ClipTextEncoder,
    /// Kandinsky 2.1: XLM-R tokenizer + MultilingualCLIP (the decoder's conditioning).
    pub multilingual: Option<MultilingualTextEncoder>,
    /// What Encode and Info report. For 2.1 the revision covers both folders.
    pub info: v1::ModelInfo,
    /// The compute dtype.
    pub dtype: DType,
}

impl TextModel {
    /// Opens the device, loads the prior folder's `tokenizer/` and `text_encoder/` — and, when
    /// that folder is a Kandinsky 2.1 one, the decoder folder's — and runs one warm-up encode.
    /// The family is read from the folders; a 2.1 prior without a 2.1 decoder folder is an error.
    pub fn load_and_warm(
        args: &StageArgs,
        decoder_dir: Option<&Path>,
    ) -> Result<Self, ServiceError> {
        let device = args.open_device()?;
        let dir = CheckpointDir::open(&args.model_dir)?;
        // aMUSEd conditions on the penultimate layer (no final norm); the priors on the last.
        let hidden = match dir.family() {
            ModelFamily::Amused => TextHiddenLayer::Penultimate,
            ModelFamily::Kandinsky21 | ModelFamily::Kandinsky22 => TextHiddenLayer::Last,
        };
        let encoder = ClipTextEncoder::load(&dir, args.dtype, &device)?.with_hidden_layer(hidden);
        let mut info = model_info(&dir, "text_encoder", &COMPONENTS, args.dtype, &device)?;
        let decoder = decoder_dir.map(CheckpointDir::open).transpose()?;
        if let Some(d) = &decoder {
            if d.family() != dir.family() {
                return Err(ServiceError::Internal(format!(
                    "--decoder-model-dir {} is a {:?} folder but --model-dir {} is a {:?} one; \
                     both must be the same Kandinsky version",
                    d.root().display(),
                    d.family(),
                    dir.root().display(),
                    dir.family()
                )));
            }
        }
        let multilingual = match (dir.family(), &decoder) {
            (ModelFamily::Kandinsky22 | ModelFamily::Amused, _) => None,
            (ModelFamily::Kandinsky21, None) => {
                return Err(ServiceError::Internal(format!(
                    "{} is a Kandinsky 2.1 prior folder: the decoder's multilingual text encoder \
                     is needed too; set --decoder-model-dir (KD_DECODER_MODEL_DIR) to the \
                     Kandinsky 2.1 decoder folder",
                    dir.root().display()
                )))
            }
            (ModelFamily::Kandinsky21, Some(d)) => {
                let m = MultilingualTextEncoder::load(d, args.dtype, &device)?;
                info.revision = format!("{}+{}", info.revision, revision(d, &COMPONENTS)?);
                Some(m)
            }
        };
        let model = Self {
            encoder,
            multilingual,
            info,
            dtype: args.dtype,
        };
        model.warm_up()?;
        Ok(model)
    }

    fn warm_up(&self) -> Result<(), ServiceError> {
        self.encoder.encode(&[""])?;
        if let Some(m) = &self.multilingual {
            m.encode(&[""])?;
        }
        Ok(())
    }
}

impl StageModel for TextModel {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
