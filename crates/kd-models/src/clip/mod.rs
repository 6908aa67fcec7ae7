//! CLIP: the BPE tokenizer, the text and vision towers with projection, the image processor, and
//! the prompt encoder (tokenizer + text tower) as one loadable model.

pub mod encoder;
pub mod image_processor;
pub mod text;
pub mod text_encoder;
pub mod tokenizer;
pub mod vision;

pub use encoder::Activation;
pub use image_processor::{convert_to_rgb, decode_image, ClipImageProcessor};
pub use text::{ClipTextModelWithProjection, ClipTextOutput};
pub use text_encoder::{ClipTextEncoder, TextConditioning, TextHiddenLayer};
pub use tokenizer::{ClipTokenizer, TokenizedBatch};
pub use vision::{ClipVisionModelWithProjection, ClipVisionOutput};
