//! CLIP image preprocessing (transformers 5 `CLIPImageProcessor`, PIL backend).

/// Placeholder, filled below.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor;
