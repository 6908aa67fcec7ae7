//! The loaded model of this stage: the CLIP prompt encoder of the prior folder and, for
//! Kandinsky 2.1, the decoder folder's multilingual text encoder; for a Kandinsky 2.0 folder its
//! two multilingual encoders (M-CLIP and mT5); plus what the service reports.

use candle_core::DType;
use kd_models::clip::{ClipTextEncoder, TextHiddenLayer};
use kd_models::kd20::Kd20TextEncoders;
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

/// A Kandinsky 2.0 folder's text encoder sub-folders (whose files make up its revision).
pub const KD20_COMPONENTS: [&str; 2] = ["text_encoder1", "text_encoder2"];

/// The prompt encoders of a folder's family. (One per process, held for its lifetime: the
/// variants' size difference costs nothing.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Encoders {
    /// Kandinsky 2.1 / 2.2 / aMUSEd: tokenizer + CLIP text tower (the prior's conditioning, or
    /// aMUSEd's), and for 2.1 the XLM-R tokenizer + MultilingualCLIP (the decoder's).
    Clip {
        encoder: ClipTextEncoder,
        multilingual: Option<MultilingualTextEncoder>,
    },
    /// Kandinsky 2.0: M-CLIP (XLM-R) and the mT5 encoder, each with its tokenizer.
    Kd20(Box<Kd20TextEncoders>),
}

/// The prompt encoders and their [`v1::ModelInfo`].
#[derive(Debug)]
pub struct TextModel {
    pub encoders: Encoders,
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
        if dir.family() == ModelFamily::Kandinsky20 {
            if let Some(d) = decoder_dir {
                return Err(ServiceError::Internal(format!(
                    "--decoder-model-dir {} was set, but {} is a Kandinsky 2.0 folder, which \
                     holds both of its text encoders: unset it",
                    d.display(),
                    dir.root().display()
                )));
            }
            let encoders = Kd20TextEncoders::load(dir.root(), args.dtype, &device)?;
            let model = Self {
                encoders: Encoders::Kd20(Box::new(encoders)),
                info: model_info(&dir, "text_encoder", &KD20_COMPONENTS, args.dtype, &device)?,
                dtype: args.dtype,
            };
            model.warm_up()?;
            return Ok(model);
        }
        // aMUSEd conditions on the penultimate layer (no final norm); the priors on the last.
        let hidden = match dir.family() {
            ModelFamily::Amused => TextHiddenLayer::Penultimate,
            _ => TextHiddenLayer::Last,
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
            (ModelFamily::Kandinsky22 | ModelFamily::Amused | ModelFamily::Kandinsky20, _) => None,
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
            encoders: Encoders::Clip {
                encoder,
                multilingual,
            },
            info,
            dtype: args.dtype,
        };
        model.warm_up()?;
        Ok(model)
    }

    fn warm_up(&self) -> Result<(), ServiceError> {
        match &self.encoders {
            Encoders::Clip {
                encoder,
                multilingual,
            } => {
                encoder.encode(&[""])?;
                if let Some(m) = multilingual {
                    m.encode(&[""])?;
                }
            }
            Encoders::Kd20(e) => {
                e.encode(&[""])?;
            }
        }
        Ok(())
    }
}

impl StageModel for TextModel {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
