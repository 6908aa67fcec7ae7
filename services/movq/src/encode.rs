//! `Movq.EncodeImages`: images (and inpaint masks) → latents (and the pre-processed repaint masks).
//! For an aMUSEd folder: images → token maps (each latent's nearest codebook entry) and the
//! repaint masks at token resolution, as diffusers' `AmusedImg2ImgPipeline` /
//! `AmusedInpaintPipeline` pre-process them.

use crate::model::Movq;
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use kd_models::image::resample::{resize, rgb_to_luma, Filter, Pixels};
use kd_models::image::{
    binarize_mask, decode_image, decode_mask, outpaint_canvas, preprocess_img2img,
    preprocess_inpaint, Margins, MaskImage,
};
use kd_proto::v1;
use kd_runtime::{Cancel, ServiceError};

/// Largest side in pixels.
const MAX_SIDE: u32 = 2048;

fn side(field: &str, v: u32) -> Result<usize, ServiceError> {
    if !(64..=MAX_SIDE).contains(&v) || !v.is_multiple_of(64) {
        return Err(ServiceError::invalid(
            field,
            format!("{v}; allowed: a multiple of 64 in 64..={MAX_SIDE}"),
        ));
    }
    Ok(v as usize)
}

/// A checked encode request: what to encode, validated against the loaded model.
pub(crate) enum Checked {
    /// Ready pixel values (B, 3, H, W).
    Pixels(Tensor),
    /// Encoded images (and optional inpaint masks) to pre-process to `h` × `w`.
    Images {
        images: Vec<Vec<u8>>,
        masks: Vec<Vec<u8>>,
        outpaint: Option<Margins>,
        h: usize,
        w: usize,
    },
}

/// Checks one encode request (before admission): images or pixels, counts, sides and shapes.
pub(crate) fn check(
    m: &Movq,
    req: v1::EncodeImagesRequest,
    deadline: Option<std::time::Instant>,
) -> Result<Checked, ServiceError> {
    let checked = check_fields(m, req)?;
    let (images, pixels) = match &checked {
        Checked::Pixels(x) => {
            let (b, _, h, w) = x.dims4()?;
            (b, h * w)
        }
        Checked::Images { images, h, w, .. } => (images.len(), h * w),
    };
    m.check_budget(false, images, pixels, deadline)?;
    Ok(checked)
}

/// The request's fields: images or pixels, counts, sides and shapes.
fn check_fields(m: &Movq, req: v1::EncodeImagesRequest) -> Result<Checked, ServiceError> {
    match (req.pixels, req.images.is_empty()) {
        (Some(_), false) => Err(ServiceError::invalid(
            "images",
            "give either images or pixels, not both",
        )),
        (None, true) => Err(ServiceError::invalid(
            "images",
            "required: at least one encoded image (or `pixels`)",
        )),
        (Some(t), true) => check_pixels(m, &t).map(Checked::Pixels),
        (None, false) => {
            if req.images.len() > m.max_batch {
                return Err(ServiceError::invalid(
                    "images",
                    format!("{} images; at most {}", req.images.len(), m.max_batch),
                ));
            }
            if !req.masks.is_empty() && req.masks.len() != req.images.len() {
                return Err(ServiceError::invalid(
                    "masks",
                    format!(
                        "{} masks for {} images; give none or one per image",
                        req.masks.len(),
                        req.images.len()
                    ),
                ));
            }
            let (h, w) = (side("height", req.height)?, side("width", req.width)?);
            m.check_pixels("height", h, w)?;
            let outpaint = match req.outpaint {
                Some(_) if !req.masks.is_empty() => {
                    return Err(ServiceError::invalid(
                        "outpaint",
                        "give either masks (inpaint) or outpaint margins, not both",
                    ))
                }
                Some(o) => {
                    let margins = Margins {
                        left: o.left,
                        top: o.top,
                        right: o.right,
                        bottom: o.bottom,
                    };
                    // Checked now, before admission (the sides are at most 2048).
                    margins.inner(w as u32, h as u32)?;
                    Some(margins)
                }
                None => None,
            };
            Ok(Checked::Images {
                images: req.images,
                masks: req.masks,
                outpaint,
                h,
                w,
            })
        }
    }
}

fn check_pixels(m: &Movq, t: &v1::Tensor) -> Result<Tensor, ServiceError> {
    let sf = m.vq.scale_factor();
    let x = kd_proto::from_wire(t, &candle_core::Device::Cpu, &Default::default())
        .map_err(|e| ServiceError::tensor("pixels", e))?;
    let d = x.dims().to_vec();
    let side_ok = |v: usize| v > 0 && v.is_multiple_of(sf);
    if d.len() != 4
        || d[1] != 3
        || !(1..=m.max_batch).contains(&d[0])
        || !side_ok(d[2])
        || !side_ok(d[3])
    {
        return Err(ServiceError::invalid(
            "pixels",
            format!("shape {d:?}; allowed (B, 3, H, W) with B in 1..={} and H, W positive multiples of {sf}", m.max_batch),
        ));
    }
    m.check_pixels("pixels", d[2], d[3])?;
    Ok(x.to_dtype(DType::F32)?)
}

/// Each request image with its repaint mask: the client's mask (inpaint), the outpainting
/// canvas and its margins mask (outpaint), or none (image-to-image). `same_size`: a client mask
/// must have its image's size (aMUSEd resizes the two separately).
fn images_and_masks(
    images: &[Vec<u8>],
    masks: &[Vec<u8>],
    outpaint: Option<Margins>,
    (h, w): (usize, usize),
    same_size: bool,
) -> Result<Vec<(RgbImage, Option<MaskImage>)>, ServiceError> {
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let img = decode_image(bytes)?;
            Ok(match (masks.get(i), outpaint) {
                (Some(mask_bytes), _) => {
                    let mask = decode_mask(mask_bytes)?;
                    if same_size && mask.dimensions() != img.dimensions() {
                        let ((mw, mh), (iw, ih)) = (mask.dimensions(), img.dimensions());
                        return Err(ServiceError::invalid(
                            "mask_image",
                            format!(
                                "mask is {mw}×{mh} (width×height) but the image is {iw}×{ih}; \
                                 they must have the same size"
                            ),
                        ));
                    }
                    (img, Some(mask))
                }
                (None, Some(margins)) => {
                    let (canvas, mask) = outpaint_canvas(&img, w as u32, h as u32, margins)?;
                    (canvas, Some(MaskImage::Luma(mask)))
                }
                (None, None) => (img, None),
            })
        })
        .collect()
}

/// Stacks per-image tensors, and the masks when there are any.
fn stack(px: Vec<Tensor>, repaint: Vec<Tensor>) -> Result<(Tensor, Option<Tensor>), ServiceError> {
    let mask = if repaint.is_empty() {
        None
    } else {
        Some(Tensor::cat(&repaint, 0)?)
    };
    Ok((Tensor::cat(&px, 0)?, mask))
}

/// Decodes and pre-processes the images (as diffusers' img2img / inpaint pipelines do); with
/// masks, also the repaint masks (1 = repaint), as the denoiser takes them.
fn preprocess(
    images: &[Vec<u8>],
    masks: &[Vec<u8>],
    outpaint: Option<Margins>,
    (h, w, sf): (usize, usize, usize),
) -> Result<(Tensor, Option<Tensor>), ServiceError> {
    let (mut px, mut repaint) = (Vec::new(), Vec::new());
    for (img, mask) in images_and_masks(images, masks, outpaint, (h, w), false)? {
        match mask {
            Some(mask) => {
                let (keep, x) = preprocess_inpaint(&img, &mask, h, w, sf)?;
                repaint.push((1.0 - keep.to_dtype(DType::F32)?)?);
                px.push(x);
            }
            None => px.push(preprocess_img2img(&img, h, w, sf)?),
        }
    }
    stack(px, repaint)
}

/// [`preprocess`] for an aMUSEd VQ-GAN, as its pipelines' `VaeImageProcessor(do_normalize=False)`
/// does: each image (the outpaint canvas with `outpaint`) resized with Pillow LANCZOS (no
/// reducing gap: the processor's defaults) to `w` × `h` and mapped to `u8 / 255` in [0, 1]; each
/// repaint mask (the canvas mask with `outpaint`) resized LANCZOS to the token grid
/// (`h/sf` × `w/sf`), converted to grey and binarised at 0.5, 1 = repaint — the `mask_processor`
/// (`do_binarize=True, do_convert_grayscale=True`). Returns ((B, 3, h, w) in [0, 1],
/// (B, 1, h/sf, w/sf) masks), f32 on the CPU.
fn preprocess_tokens(
    images: &[Vec<u8>],
    masks: &[Vec<u8>],
    outpaint: Option<Margins>,
    (h, w, sf): (usize, usize, usize),
) -> Result<(Tensor, Option<Tensor>), ServiceError> {
    let (mut px, mut repaint) = (Vec::new(), Vec::new());
    for (img, mask) in images_and_masks(images, masks, outpaint, (h, w), true)? {
        if let Some(mask) = mask {
            repaint.push(token_mask(&mask, h / sf, w / sf)?);
        }
        px.push(unit_pixels(&img, h, w)?);
    }
    stack(px, repaint)
}

/// `image` resized (Pillow LANCZOS) to `w` × `h` as (1, 3, h, w) f32 `u8 / 255`.
fn unit_pixels(image: &RgbImage, h: usize, w: usize) -> Result<Tensor, ServiceError> {
    let src = Pixels {
        w: image.width() as usize,
        h: image.height() as usize,
        c: 3,
        data: image.as_raw().clone(),
    };
    let p = resize(&src, w, h, Filter::Lanczos, None)?;
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in p.data.chunks_exact(3).enumerate() {
        for (c, &b) in px.iter().enumerate() {
            v[c * h * w + i] = f32::from(b) / 255.0;
        }
    }
    Ok(Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu)?)
}

/// The repaint mask of `mask` on a `gh` × `gw` token grid: resized (Pillow LANCZOS) in its own
/// mode, converted to grey (Pillow resizes before `convert("L")`), binarised at 0.5 (1 = repaint),
/// (1, 1, gh, gw) f32.
fn token_mask(mask: &MaskImage, gh: usize, gw: usize) -> Result<Tensor, ServiceError> {
    let ((w, h), c, data) = match mask {
        MaskImage::Luma(m) => (m.dimensions(), 1, m.as_raw().clone()),
        MaskImage::Rgb(m) => (m.dimensions(), 3, m.as_raw().clone()),
    };
    let src = Pixels {
        w: w as usize,
        h: h as usize,
        c,
        data,
    };
    let grey = rgb_to_luma(&resize(&src, gw, gh, Filter::Lanczos, None)?)?;
    let grey = GrayImage::from_raw(gw as u32, gh as u32, grey.data)
        .ok_or_else(|| ServiceError::Internal("token mask: bad buffer size".into()))?;
    // `binarize_mask` gives the keep mask (1 = keep); the wire carries 1 = repaint.
    Ok((1.0 - binarize_mask(&grey)?)?)
}

/// Runs one checked encode request; `cancel` stops it between MoVQ layers.
pub(crate) fn encode(
    m: &Movq,
    req: Checked,
    cancel: &Cancel,
) -> Result<v1::EncodeImagesResponse, ServiceError> {
    let sf = m.vq.scale_factor();
    let (pixels, mask) = match req {
        // The wire's pixels are in [-1, 1]; the aMUSEd VQ-GAN takes [0, 1].
        Checked::Pixels(x) if m.tokens => (x.affine(0.5, 0.5)?, None),
        Checked::Pixels(x) => (x, None),
        Checked::Images {
            images,
            masks,
            outpaint,
            h,
            w,
        } if m.tokens => preprocess_tokens(&images, &masks, outpaint, (h, w, sf))?,
        Checked::Images {
            images,
            masks,
            outpaint,
            h,
            w,
        } => preprocess(&images, &masks, outpaint, (h, w, sf))?,
    };
    let x = pixels
        .to_device(&m.device)
        .and_then(|x| x.to_dtype(m.vq.dtype()))?;
    let stop = || cancel.should_stop();
    let latents = if m.tokens {
        cancel.check_at("before the VQ-GAN encoder")?;
        // (B, h, w) u32 → the wire's I64 token map.
        m.vq.encode_indices(&x, &stop)
            .map_err(|e| cancel.model_error(e))?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
    } else {
        cancel.check_at("before the MoVQ encoder")?;
        m.vq.encode_interruptible(&x, &stop)
            .map_err(|e| cancel.model_error(e))?
            .to_dtype(DType::F32)?
    };
    let wire = |t: &Tensor| kd_proto::to_wire(t).map_err(ServiceError::from);
    Ok(v1::EncodeImagesResponse {
        latents: Some(wire(&latents)?),
        mask: mask.as_ref().map(wire).transpose()?,
        model: Some(m.info.clone()),
    })
}
