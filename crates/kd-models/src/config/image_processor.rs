//! `image_processor/preprocessor_config.json`: transformers `CLIPImageProcessor`.

use super::unsupported;
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

/// `CLIPImageProcessor` `size` / `crop_size`: an int (old files) or a dict.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ImageSize {
    Int(usize),
    ShortestEdge { shortest_edge: usize },
    HeightWidth { height: usize, width: usize },
}

/// transformers `CLIPImageProcessor` (`preprocessor_config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipImageProcessorConfig {
    pub do_resize: bool,
    pub size: ImageSize,
    pub resample: u32,
    pub do_center_crop: bool,
    pub crop_size: ImageSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
}

impl Default for ClipImageProcessorConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ImageSize::ShortestEdge { shortest_edge: 224 },
            resample: 3,
            do_center_crop: true,
            crop_size: ImageSize::HeightWidth {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            do_convert_rgb: true,
        }
    }
}

impl ClipImageProcessorConfig {
    /// Rejects resampling filters other than bicubic (3) and bilinear (2).
    pub fn validate(&self, path: &Path) -> Result<()> {
        if ![2, 3].contains(&self.resample) {
            return Err(unsupported(
                path,
                "resample",
                self.resample,
                "2 (bilinear), 3 (bicubic)",
            ));
        }
        Ok(())
    }
}
