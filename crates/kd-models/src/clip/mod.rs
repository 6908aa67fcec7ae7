//! CLIP: the BPE tokenizer, the text and vision towers with projection, and the image processor.

pub mod encoder;
pub mod image_processor;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use encoder::Activation;
pub use image_processor::{convert_to_rgb, decode_image, ClipImageProcessor};
pub use text::{ClipTextModelWithProjection, ClipTextOutput};
pub use tokenizer::{ClipTokenizer, TokenizedBatch};
pub use vision::{ClipVisionModelWithProjection, ClipVisionOutput};
