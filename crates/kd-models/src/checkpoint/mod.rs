//! Official diffusers-format checkpoint folders: `model_index.json` plus one sub-folder per
//! component, each with its config and safetensors weights.
//!
//! ```text
//! kandinsky-2-2-prior/    model_index.json, prior/, text_encoder/, image_encoder/, tokenizer/,
//!                         scheduler/, image_processor/
//! kandinsky-2-2-decoder/  model_index.json, unet/, movq/, scheduler/
//! ```
//!
//! Component weights are safetensors; where a component ships only PyTorch pickles
//! (`diffusion_pytorch_model.bin`, `pytorch_model.bin`), and for original-format single files
//! (`Kandinsky-2-0.pt`, Lightning `.ckpt`), [`PickleWeights`] reads them without executing
//! anything (see the `pickle` module: an allow-list of pickle globals, everything else refused).

mod pickle;
mod stfile;
mod weights;

pub use pickle::{PickleTensorInfo, PickleWeights, ALLOWED_GLOBALS};
pub use weights::{Variant, Weights, STORED, TRANSPOSED};

use crate::config::{
    read_json, ClipImageProcessorConfig, ClipTextConfig, ClipVisionConfig, PriorTransformerConfig,
    SchedulerConfig, TokenizerConfig, UNet2DConditionConfig, UVit2DConfig, VqModelConfig,
};
use crate::error::{ModelError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Kandinsky generation a checkpoint folder belongs to, read from its pipeline class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Kandinsky 2.1 (`KandinskyPriorPipeline`, `KandinskyPipeline`, …): multilingual decoder.
    Kandinsky21,
    /// Kandinsky 2.2 (`KandinskyV22*Pipeline`).
    Kandinsky22,
    /// aMUSEd (`AmusedPipeline`, `AmusedImg2ImgPipeline`, `AmusedInpaintPipeline`): Muse-style
    /// masked-token generation with a CLIP text encoder, a `UVit2DModel` and a VQ-GAN.
    Amused,
    /// Kandinsky 2.0 in the official layout (no `model_index.json`): `Kandinsky-2-0.pt` (or
    /// `Kandinsky-2-0-inpainting.pt`), `vae.ckpt`, `text_encoder1/`, `text_encoder2/`.
    Kandinsky20,
}

/// The pipeline class name a Kandinsky 2.0 folder reports (the official `Kandinsky2`).
pub const KD20_PIPELINE_CLASS: &str = "Kandinsky2";
/// The UNet checkpoints whose presence makes a folder without `model_index.json` a Kandinsky 2.0
/// folder (the text-to-image one first: a folder holding both serves text-to-image).
pub const KD20_UNET_FILES: [&str; 2] = ["Kandinsky-2-0.pt", "Kandinsky-2-0-inpainting.pt"];
/// A Kandinsky 2.0 folder's text encoder sub-folders, with the official classes.
const KD20_COMPONENTS: [(&str, &str); 2] = [
    ("text_encoder1", "MultilingualCLIP"),
    ("text_encoder2", "MT5EncoderModel"),
];

/// The pipelines whose folders this crate reads, with their family.
const PIPELINES: &[(&str, ModelFamily)] = &[
    ("KandinskyV22PriorPipeline", ModelFamily::Kandinsky22),
    ("KandinskyV22PriorEmb2EmbPipeline", ModelFamily::Kandinsky22),
    ("KandinskyV22Pipeline", ModelFamily::Kandinsky22),
    ("KandinskyV22Img2ImgPipeline", ModelFamily::Kandinsky22),
    ("KandinskyV22InpaintPipeline", ModelFamily::Kandinsky22),
    ("KandinskyV22ControlnetPipeline", ModelFamily::Kandinsky22),
    (
        "KandinskyV22ControlnetImg2ImgPipeline",
        ModelFamily::Kandinsky22,
    ),
    ("KandinskyPriorPipeline", ModelFamily::Kandinsky21),
    ("KandinskyPipeline", ModelFamily::Kandinsky21),
    ("KandinskyImg2ImgPipeline", ModelFamily::Kandinsky21),
    ("KandinskyInpaintPipeline", ModelFamily::Kandinsky21),
    ("AmusedPipeline", ModelFamily::Amused),
    ("AmusedImg2ImgPipeline", ModelFamily::Amused),
    ("AmusedInpaintPipeline", ModelFamily::Amused),
];

/// An opened checkpoint folder.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    pipeline_class: String,
    family: ModelFamily,
    /// Component name → (library, class), as `model_index.json` lists them.
    components: BTreeMap<String, (String, String)>,
}

/// One component sub-folder of a checkpoint.
#[derive(Debug, Clone)]
pub struct ComponentDir {
    /// The component's folder.
    pub path: PathBuf,
    /// Name in `model_index.json` (e.g. `unet`).
    pub name: String,
    /// Class name in `model_index.json` (e.g. `UNet2DConditionModel`).
    pub class: String,
}

impl CheckpointDir {
    /// Opens `root/model_index.json` and checks every listed component folder exists. A folder
    /// without `model_index.json` holding one of [`KD20_UNET_FILES`] is a Kandinsky 2.0 folder
    /// in the official layout (its text encoder folders are listed when present).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let index_path = root.join("model_index.json");
        if !index_path.exists() && KD20_UNET_FILES.iter().any(|f| root.join(f).is_file()) {
            let components = KD20_COMPONENTS
                .iter()
                .filter(|(name, _)| root.join(name).is_dir())
                .map(|(name, class)| (name.to_string(), ("kandinsky2".into(), class.to_string())))
                .collect();
            return Ok(Self {
                root,
                pipeline_class: KD20_PIPELINE_CLASS.into(),
                family: ModelFamily::Kandinsky20,
                components,
            });
        }
        let index: serde_json::Map<String, serde_json::Value> = read_json(&index_path)?;
        let pipeline_class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::Config {
                path: index_path.clone(),
                message: "missing `_class_name`".into(),
            })?
            .to_string();
        let family = PIPELINES
            .iter()
            .find(|(name, _)| *name == pipeline_class)
            .map(|(_, f)| *f)
            .ok_or_else(|| ModelError::Unsupported {
                path: index_path.clone(),
                field: "_class_name".into(),
                value: format!("{pipeline_class:?}"),
                supported: PIPELINES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let mut components = BTreeMap::new();
        for (name, value) in &index {
            if name.starts_with('_') {
                continue;
            }
            // Components are `[library, class]`; optional ones may be `[null, null]`.
            let Some([lib, class]) = value.as_array().map(|a| a.as_slice()) else {
                continue;
            };
            let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) else {
                continue;
            };
            let dir = root.join(name);
            if !dir.is_dir() {
                return Err(ModelError::Checkpoint {
                    path: dir,
                    message: format!("model_index.json lists component `{name}` ({class}) but its folder is missing"),
                });
            }
            components.insert(name.clone(), (lib.to_string(), class.to_string()));
        }
        Ok(Self {
            root,
            pipeline_class,
            family,
            components,
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pipeline class named by `model_index.json`.
    pub fn pipeline_class(&self) -> &str {
        &self.pipeline_class
    }

    /// The model family the pipeline class belongs to.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Names of the listed components.
    pub fn component_names(&self) -> impl Iterator<Item = &str> {
        self.components.keys().map(String::as_str)
    }

    /// Whether `name` is listed.
    pub fn has(&self, name: &str) -> bool {
        self.components.contains_key(name)
    }

    /// The component `name`, or an error saying which components the folder has.
    pub fn component(&self, name: &str) -> Result<ComponentDir> {
        let (_, class) = self
            .components
            .get(name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: self.root.join("model_index.json"),
                message: format!(
                    "no component `{name}` (this {} folder has: {})",
                    self.pipeline_class,
                    self.components
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        Ok(ComponentDir {
            path: self.root.join(name),
            name: name.to_string(),
            class: class.clone(),
        })
    }
}

impl ComponentDir {
    fn expect_class(&self, allowed: &[&str]) -> Result<()> {
        if allowed.contains(&self.class.as_str()) {
            return Ok(());
        }
        Err(ModelError::Unsupported {
            path: self
                .path
                .parent()
                .unwrap_or(&self.path)
                .join("model_index.json"),
            field: self.name.clone(),
            value: format!("{:?}", self.class),
            supported: allowed.join(", "),
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `unet/config.json`, validated.
    pub fn unet_config(&self) -> Result<UNet2DConditionConfig> {
        self.expect_class(&["UNet2DConditionModel"])?;
        let p = self.file("config.json");
        let c: UNet2DConditionConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `transformer/config.json` (aMUSEd), validated.
    pub fn uvit_config(&self) -> Result<UVit2DConfig> {
        self.expect_class(&["UVit2DModel"])?;
        let p = self.file("config.json");
        let c: UVit2DConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `movq/config.json`, validated.
    pub fn vq_config(&self) -> Result<VqModelConfig> {
        self.expect_class(&["VQModel"])?;
        let p = self.file("config.json");
        let c: VqModelConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `prior/config.json`, validated.
    pub fn prior_config(&self) -> Result<PriorTransformerConfig> {
        self.expect_class(&["PriorTransformer"])?;
        let p = self.file("config.json");
        let c: PriorTransformerConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `text_encoder/config.json`, validated.
    pub fn clip_text_config(&self) -> Result<ClipTextConfig> {
        self.expect_class(&["CLIPTextModelWithProjection"])?;
        let p = self.file("config.json");
        let c: ClipTextConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `image_encoder/config.json`, validated.
    pub fn clip_vision_config(&self) -> Result<ClipVisionConfig> {
        self.expect_class(&["CLIPVisionModelWithProjection"])?;
        let p = self.file("config.json");
        let c: ClipVisionConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `scheduler/scheduler_config.json`, validated.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        let p = self.file("scheduler_config.json");
        let c: SchedulerConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `image_processor/preprocessor_config.json`, validated.
    pub fn image_processor_config(&self) -> Result<ClipImageProcessorConfig> {
        self.expect_class(&["CLIPImageProcessor"])?;
        let p = self.file("preprocessor_config.json");
        let c: ClipImageProcessorConfig = read_json(&p)?;
        c.validate(&p)?;
        Ok(c)
    }

    /// `tokenizer/tokenizer_config.json`.
    pub fn tokenizer_config(&self) -> Result<TokenizerConfig> {
        self.expect_class(&[
            "CLIPTokenizer",
            "CLIPTokenizerFast",
            "XLMRobertaTokenizer",
            "XLMRobertaTokenizerFast",
        ])?;
        read_json(&self.file("tokenizer_config.json"))
    }

    /// The component's safetensors weights (preferring `variant` where both are stored), or,
    /// failing those, its PyTorch `.bin` pickles (see [`Weights::open_dir`]).
    pub fn weights(&self, variant: Variant) -> Result<Weights> {
        Weights::open_dir(&self.path, variant)
    }
}
