//! Image I/O around the MoVQ: diffusers-exact post-processing of decoded images, PNG/JPEG/WebP
//! encoding, decoding of caller images with clear errors, and the img2img / inpaint
//! pre-processing (Pillow-exact resizes, see [`resample`]).
//!
//! diffusers sources: `image_processor.py` (`VaeImageProcessor.postprocess/preprocess`,
//! `numpy_to_pil`), `pipelines/kandinsky2_2/pipeline_kandinsky2_2_inpainting.py`
//! (`prepare_mask_and_masked_image`).

pub mod preprocess;
pub mod resample;

pub use preprocess::{
    binarize_mask, check_image_size, outpaint_canvas, preprocess_hint, preprocess_img2img,
    preprocess_inpaint, Margins, MaskImage, OUTPAINT_MIN_INNER,
};
pub use resample::{Filter, Pixels};

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageEncoder, RgbImage};

/// An encoding for generated images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Lossless PNG.
    Png,
    /// Baseline JPEG at `quality` (1–100).
    Jpeg {
        /// JPEG quality, 1–100.
        quality: u8,
    },
    /// Lossless WebP (the `image` crate encodes lossless only).
    WebP,
}

impl OutputFormat {
    /// Parses `png`, `jpeg`/`jpg` or `webp` (case-insensitive); `jpeg_quality` (1–100) is used
    /// for JPEG.
    pub fn parse(name: &str, jpeg_quality: u8) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "jpeg" | "jpg" => Self::jpeg(jpeg_quality),
            "webp" => Ok(Self::WebP),
            _ => Err(ModelError::invalid(
                "output_format",
                format!("`{name}` is not supported; supported: png, jpeg, webp"),
            )),
        }
    }

    /// JPEG at `quality`, which must be 1–100.
    pub fn jpeg(quality: u8) -> Result<Self> {
        if !(1..=100).contains(&quality) {
            return Err(ModelError::invalid(
                "jpeg_quality",
                format!("must be in 1..=100, got {quality}"),
            ));
        }
        Ok(Self::Jpeg { quality })
    }

    /// The MIME type of the encoding.
    pub fn mime_type(&self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg { .. } => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }
}

/// `clamp(x·0.5 + 0.5, 0, 1)` of decoded images (B, 3, H, W), permuted to NHWC f32: the pipelines'
/// `output_type="np"` result.
pub fn postprocess_nhwc01(images: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = images.dims4().map_err(|_| bad_images(images))?;
    if c != 3 {
        return Err(bad_images(images));
    }
    let x = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let x = ((x * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
}

/// Decoded images (B, 3, H, W) → RGB images exactly as diffusers' `numpy_to_pil`:
/// `round_half_even(clamp(x·0.5 + 0.5, 0, 1)·255)` computed in f32.
pub fn postprocess(images: &Tensor) -> Result<Vec<RgbImage>> {
    rgb_images(&postprocess_nhwc01(images)?)
}

/// Images in [0, 1] as NHWC f32 (B, H, W, 3) → RGB images as diffusers' `numpy_to_pil`:
/// `round_half_even(x·255)` in f32. aMUSEd's images are already in [0, 1] (its image processor
/// does not normalise), so they take this directly: going through [`postprocess`]'s
/// `x·0.5 + 0.5` would round `2x − 1` in f32 and could move a byte.
pub fn rgb_images(nhwc: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, h, w, c) = nhwc.dims4().map_err(|_| bad_images(nhwc))?;
    if c != 3 {
        return Err(bad_images(nhwc));
    }
    let nhwc = nhwc.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let v: Vec<f32> = nhwc.flatten_all()?.to_vec1()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = v[i * per..(i + 1) * per]
                .iter()
                .map(|&x| (x * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| ModelError::invalid("images", "internal: bad buffer size"))
        })
        .collect()
}

fn bad_images(t: &Tensor) -> ModelError {
    ModelError::invalid(
        "images",
        format!(
            "expected decoded images (B, 3, H, W) or (B, H, W, 3) in [0, 1], got shape {:?}",
            t.dims()
        ),
    )
}

/// Encodes an RGB image.
pub fn encode_image(img: &RgbImage, format: OutputFormat) -> Result<Vec<u8>> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(ModelError::invalid(
            "image",
            format!("cannot encode a zero-sized image ({w}×{h})"),
        ));
    }
    let mut out = Vec::new();
    let ct = image::ExtendedColorType::Rgb8;
    let res =
        match format {
            OutputFormat::Png => {
                image::codecs::png::PngEncoder::new(&mut out).write_image(img.as_raw(), w, h, ct)
            }
            OutputFormat::Jpeg { quality } => image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, quality,
            )
            .write_image(img.as_raw(), w, h, ct),
            OutputFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(img.as_raw(), w, h, ct),
        };
    res.map_err(|e| ModelError::invalid("image", format!("cannot encode as {format:?}: {e}")))?;
    Ok(out)
}

/// Decodes PNG/JPEG/WebP bytes; `field` names the request field in errors.
fn decode_dynamic(field: &'static str, bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(ModelError::invalid(
            field,
            "empty image data; expected PNG, JPEG or WebP bytes",
        ));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ModelError::invalid(field, format!("cannot read image data: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        other => {
            return Err(ModelError::invalid(
                field,
                format!(
                    "unrecognised image format ({}); supported: PNG, JPEG, WebP",
                    other.map_or("unknown".to_string(), |f| format!("{f:?}"))
                ),
            ))
        }
    }
    let img = reader.decode().map_err(|e| {
        ModelError::invalid(
            field,
            format!("corrupt or truncated image (supported: PNG, JPEG, WebP): {e}"),
        )
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ModelError::invalid(
            field,
            format!(
                "zero-sized image ({}×{}); width and height must be at least 1",
                img.width(),
                img.height()
            ),
        ));
    }
    Ok(img)
}

/// Decodes a caller's image (PNG, JPEG or WebP) to RGB (alpha dropped, grey replicated, as
/// PIL `convert("RGB")` does for opaque images).
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb("image", bytes)
}

/// [`decode_image`] naming `field` in its errors.
pub fn decode_rgb(field: &'static str, bytes: &[u8]) -> Result<RgbImage> {
    Ok(decode_dynamic(field, bytes)?.to_rgb8())
}

/// Decodes an inpainting mask (PNG, JPEG or WebP), keeping grey masks grey and colour masks RGB
/// (Pillow resizes in the stored mode and converts to L afterwards).
pub fn decode_mask(bytes: &[u8]) -> Result<MaskImage> {
    let img = decode_dynamic("mask_image", bytes)?;
    let gray = matches!(
        img.color(),
        image::ColorType::L8
            | image::ColorType::La8
            | image::ColorType::L16
            | image::ColorType::La16
    );
    Ok(if gray {
        MaskImage::Luma(img.to_luma8())
    } else {
        MaskImage::Rgb(img.to_rgb8())
    })
}
