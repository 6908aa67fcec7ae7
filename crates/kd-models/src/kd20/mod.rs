//! Kandinsky 2.0 (the official `kandinsky2` package's `Kandinsky2`, `CONFIG_2_0`): its two text
//! encoders, loaded from the original checkpoint folders (`text_encoder1/`, `text_encoder2/`:
//! `config.json` + `pytorch_model.bin` read by the safe pickle reader, and the tokenizer files).
//!
//! * [`text`]: `MultilingualCLIP` (XLM-R + `LinearTransformation`, the 2.1 port's model with a
//!   plain `XLMRobertaConfig` and projection sizes from the checkpoint) and `MT5EncoderModel`,
//!   run as `Kandinsky2.encode_text` runs them: [`Kd20TextEncoders`].
//! * [`mt5`]: the mT5 encoder with attention mask and T5 relative-position buckets.
//! * [`tokenizer`]: the mT5 tokenizer built from `spiece.model` as transformers converts it.
//! * [`denoise`]: `generate_img` on the UNet alone (text-to-image, img2img after encoding,
//!   inpainting after encoding), with per-step progress: [`Kd20Denoiser`].
//! * [`pipeline`]: `Kandinsky2` from the official folder, `generate_text2img`,
//!   `generate_img2img` and `generate_inpainting` on [`Kd20Denoiser`]: [`Kd20Pipeline`].
//! * [`spm`]: a dependency-free reader of SentencePiece model files (protobuf `ModelProto`).

pub mod denoise;
pub mod mt5;
pub mod pipeline;
pub mod spm;
pub mod text;
pub mod tokenizer;
pub mod unet;

pub use denoise::{Kd20Denoiser, Kd20Sampling, Kd20Step, Kd20Task, Kd20Text};
pub use mt5::{Mt5Config, Mt5Encoder, Mt5Output};
pub use pipeline::{Kd20Images, Kd20Img2Img, Kd20InpaintArgs, Kd20Pipeline, Kd20Text2Img};
pub use spm::SpmModel;
pub use text::{Kd20TextConditioning, Kd20TextEncoders, Kd20Tokens};
pub use tokenizer::{Mt5Tokenizer, T5SpecialTokens};
pub use unet::{Kd20TextEmb, Kd20UnetConfig, Kd20UnetText, Text2ImUNet};
