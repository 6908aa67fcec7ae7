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

/// A ControlNet hint image as `KandinskyV22ControlnetPipeline` takes `hint`: RGB / 255 in
/// [0, 1], (1, 3, h, w) f32 on the CPU; resized with Pillow bicubic when its size is not
/// `width × height` (diffusers takes a ready tensor of the output size).
pub fn preprocess_hint(image: &RgbImage, height: usize, width: usize) -> Result<Tensor> {
    nonzero_image("hint", image.width() as usize, image.height() as usize)?;
    let p = resize(&rgb_pixels(image), width, height, Filter::Bicubic, None)?;
    to_nchw(&p, |v| v as f32 / 255.0)
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

/// Outpainting margins in pixels of the output canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Margins {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

/// Smallest inner rectangle (the kept image) of an outpainting canvas, per side.
pub const OUTPAINT_MIN_INNER: u32 = 64;

impl Margins {
    /// The inner rectangle of a `width × height` canvas, (w, h): each side at least
    /// [`OUTPAINT_MIN_INNER`], computed with checked arithmetic.
    pub fn inner(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let fit = |field: &'static str, side: u32, a: u32, b: u32| {
            a.checked_add(b)
                .and_then(|m| side.checked_sub(m))
                .filter(|inner| *inner >= OUTPAINT_MIN_INNER)
                .ok_or_else(|| {
                    ModelError::invalid(
                        field,
                        format!(
                            "margins {a} + {b} leave less than {OUTPAINT_MIN_INNER} pixels of \
                             the {side}-pixel canvas for the image; allowed: margins summing \
                             to at most {}",
                            side.saturating_sub(OUTPAINT_MIN_INNER)
                        ),
                    )
                })
        };
        Ok((
            fit("outpaint.left", width, self.left, self.right)?,
            fit("outpaint.top", height, self.top, self.bottom)?,
        ))
    }
}

/// The outpainting canvas: `image` resized (Pillow bicubic, reducing_gap 1, as img2img) to the
/// inner rectangle of a `width × height` canvas and placed at (left, top); the margins repeat the
/// nearest edge pixel of the placed image. Returns the canvas and its inpainting mask (white =
/// repaint: the margins; black = keep: the inner rectangle), both `width × height`.
pub fn outpaint_canvas(
    image: &RgbImage,
    width: u32,
    height: u32,
    margins: Margins,
) -> Result<(RgbImage, GrayImage)> {
    nonzero_image("image", image.width() as usize, image.height() as usize)?;
    let (iw, ih) = margins.inner(width, height)?;
    let inner = resize(
        &rgb_pixels(image),
        iw as usize,
        ih as usize,
        Filter::Bicubic,
        Some(1.0),
    )?;
    let (l, t) = (margins.left, margins.top);
    let canvas = RgbImage::from_fn(width, height, |x, y| {
        // The nearest pixel of the inner rectangle (itself inside it).
        let sx = (x.clamp(l, l + iw - 1) - l) as usize;
        let sy = (y.clamp(t, t + ih - 1) - t) as usize;
        let i = 3 * (sy * iw as usize + sx);
        image::Rgb([inner.data[i], inner.data[i + 1], inner.data[i + 2]])
    });
    let mask = GrayImage::from_fn(width, height, |x, y| {
        let inside = (l..l + iw).contains(&x) && (t..t + ih).contains(&y);
        image::Luma([if inside { 0 } else { 255 }])
    });
    Ok((canvas, mask))
}

#[cfg(test)]
mod outpaint_tests {
    use super::*;

    #[test]
    fn the_canvas_keeps_the_image_inside_and_repeats_its_edges_outside() {
        // A 64×64 image whose pixels encode their position: no resize when the inner
        // rectangle is the image's size.
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let m = Margins {
            left: 16,
            top: 8,
            right: 48,
            bottom: 0,
        };
        let (canvas, mask) = outpaint_canvas(&img, 128, 72, m).unwrap();
        assert_eq!(canvas.dimensions(), (128, 72));
        assert_eq!(mask.dimensions(), (128, 72));
        assert_eq!(canvas.get_pixel(16, 8).0, [0, 0, 7]);
        assert_eq!(canvas.get_pixel(79, 71).0, [63, 63, 7]);
        // Margins repeat the nearest edge pixel.
        assert_eq!(canvas.get_pixel(0, 0).0, [0, 0, 7]);
        assert_eq!(canvas.get_pixel(127, 30).0, [63, 22, 7]);
        assert_eq!(canvas.get_pixel(40, 2).0, [24, 0, 7]);
        assert_eq!(mask.get_pixel(16, 8).0, [0]);
        assert_eq!(mask.get_pixel(79, 71).0, [0]);
        assert_eq!(mask.get_pixel(15, 8).0, [255]);
        assert_eq!(mask.get_pixel(80, 71).0, [255]);
        assert_eq!(mask.get_pixel(20, 7).0, [255]);
        let repaint = mask.as_raw().iter().filter(|&&v| v == 255).count();
        assert_eq!(repaint, 128 * 72 - 64 * 64);
    }

    #[test]
    fn margins_that_leave_no_image_are_refused_without_overflow() {
        let img = RgbImage::new(8, 8);
        let m = |left, right| Margins {
            left,
            right,
            ..Default::default()
        };
        let e = outpaint_canvas(&img, 128, 128, m(40, 40)).unwrap_err();
        assert!(e.to_string().contains("outpaint.left"), "{e}");
        assert!(outpaint_canvas(&img, 128, 128, m(u32::MAX, u32::MAX)).is_err());
        assert!(outpaint_canvas(&img, 128, 128, m(u32::MAX, 1)).is_err());
        let (c, _) = outpaint_canvas(&img, 128, 128, m(32, 32)).unwrap();
        assert_eq!(c.dimensions(), (128, 128));
    }
}
