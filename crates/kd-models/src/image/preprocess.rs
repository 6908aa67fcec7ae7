//! img2img and inpaint pre-processing exactly as the Kandinsky 2.2 pipelines do it (spec §2.6,
//! §2.7), and the size checks the pipelines need.

use super::resample::{resize, rgb_to_luma, Filter, Pixels};
use crate::error::{ModelError, Result};
use candle_core::Tensor;
use image::{GrayImage, RgbImage};

/// An inpainting mask as decoded: grey or colour (converted to grey after resizing, as Pillow).
#[derive(Debug, Clone)]
pub enum MaskImage {
    /// An `L` mask.
    Luma(GrayImage),
    /// An RGB mask.
    Rgb(RgbImage),
}

impl MaskImage {
    /// (width, height).
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Self::Luma(m) => m.dimensions(),
            Self::Rgb(m) => m.dimensions(),
        }
    }
}

/// Checks that a requested output size is a positive multiple of `multiple` (64 for the UNet
/// behind an 8× MoVQ: latents must be multiples of 8).
pub fn check_image_size(height: usize, width: usize, multiple: usize) -> Result<()> {
    for (field, v) in [("height", height), ("width", width)] {
        if v == 0 || !v.is_multiple_of(multiple) {
            return Err(ModelError::invalid(
                field,
                format!("must be a positive multiple of {multiple}, got {v}"),
            ));
        }
    }
    Ok(())
}

fn rgb_pixels(img: &RgbImage) -> Pixels {
    Pixels {
        w: img.width() as usize,
        h: img.height() as usize,
        c: 3,
        data: img.as_raw().clone(),
    }
}

fn nonzero_image(field: &'static str, w: usize, h: usize) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(ModelError::invalid(
            field,
            format!("zero-sized image ({w}×{h}); width and height must be at least 1"),
        ));
    }
    Ok(())
}

/// HWC u8 → (1, 3, H, W) f32 with `f(u8)` per value.
fn to_nchw(p: &Pixels, f: impl Fn(u8) -> f32) -> Result<Tensor> {
    let (w, h) = (p.w, p.h);
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in p.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = f(px[c]);
        }
    }
    Ok(Tensor::from_vec(
        v,
        (1, 3, h, w),
        &candle_core::Device::Cpu,
    )?)
}

/// `KandinskyV22Img2ImgPipeline` image pre-processing (`VaeImageProcessor(vae_scale_factor,
/// resample="bicubic", reducing_gap=1).preprocess(image, height, width)`): the target size is
/// rounded **down** to a multiple of `vae_scale_factor`, the image is resized with Pillow bicubic
/// (reducing_gap 1) and mapped to `u8 / 255 · 2 − 1`. Returns (1, 3, h, w) f32 on the CPU.
///
/// Note diffusers' img2img pipelines pass `(width, height)` into `preprocess(image, height,
/// width)`; a caller reproducing that quirk (DECODER.md quirk 8) swaps the arguments itself.
pub fn preprocess_img2img(
    image: &RgbImage,
    height: usize,
    width: usize,
    vae_scale_factor: usize,
) -> Result<Tensor> {
    nonzero_image("image", image.width() as usize, image.height() as usize)?;
    let (h, w) = (
        height - height % vae_scale_factor.max(1),
        width - width % vae_scale_factor.max(1),
    );
    if h == 0 || w == 0 {
        return Err(ModelError::invalid(
            "height",
            format!(
                "height and width must be at least {vae_scale_factor} (rounded down to multiples of {vae_scale_factor}), got {height}×{width}"
            ),
        ));
    }
    let p = resize(&rgb_pixels(image), w, h, Filter::Bicubic, Some(1.0))?;
    to_nchw(&p, |v| 2.0 * (v as f32 / 255.0) - 1.0)
}

/// Binarises a grey mask as the inpaint pipeline does (`v/255 ≥ 0.5` → repaint) and returns the
/// **keep** mask (1 = keep, 0 = repaint; white in the caller's mask means repaint), (1, 1, H, W).
pub fn binarize_mask(mask: &GrayImage) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    let v: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&m| if m as f32 / 255.0 >= 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(
        v,
        (1, 1, h as usize, w as usize),
        &candle_core::Device::Cpu,
    )?)
}

/// `prepare_mask_and_masked_image(image, mask, height, width)` of `KandinskyV22InpaintPipeline`:
/// the image is resized bicubic (reducing_gap 1) to `width × height` and mapped to
/// `u8 / 127.5 − 1`; the mask is resized Lanczos, converted to grey, binarised at 0.5 and
/// inverted. Returns `(keep_mask (1,1,h,w), image (1,3,h,w))`, f32 on the CPU.
///
/// `height` and `width` must be positive multiples of `multiple` (the caller's latent
/// requirement), and the mask must have the image's size.
pub fn preprocess_inpaint(
    image: &RgbImage,
    mask: &MaskImage,
    height: usize,
    width: usize,
    multiple: usize,
) -> Result<(Tensor, Tensor)> {
    let (iw, ih) = image.dimensions();
    nonzero_image("image", iw as usize, ih as usize)?;
    let (mw, mh) = mask.dimensions();
    nonzero_image("mask_image", mw as usize, mh as usize)?;
    if (mw, mh) != (iw, ih) {
        return Err(ModelError::invalid(
            "mask_image",
            format!("mask is {mw}×{mh} (width×height) but the image is {iw}×{ih}; they must have the same size"),
        ));
    }
    check_image_size(height, width, multiple)?;
    let img = resize(
        &rgb_pixels(image),
        width,
        height,
        Filter::Bicubic,
        Some(1.0),
    )?;
    let image_t = to_nchw(&img, |v| v as f32 / 127.5 - 1.0)?;
    let gray = match mask {
        MaskImage::Luma(m) => {
            let p = Pixels {
                w: mw as usize,
                h: mh as usize,
                c: 1,
                data: m.as_raw().clone(),
            };
            resize(&p, width, height, Filter::Lanczos, None)?
        }
        MaskImage::Rgb(m) => rgb_to_luma(&resize(
            &rgb_pixels(m),
            width,
            height,
            Filter::Lanczos,
            None,
        )?)?,
    };
    let gray = GrayImage::from_raw(width as u32, height as u32, gray.data)
        .ok_or_else(|| ModelError::invalid("mask_image", "internal: bad buffer size"))?;
    Ok((binarize_mask(&gray)?, image_t))
}
