//! `Movq.EncodeImages`: images (and inpaint masks) → latents (and the pre-processed repaint masks).
//! For an aMUSEd folder: images → token maps (each latent's nearest codebook entry) and the
//! repaint masks at token resolution, as diffusers' `AmusedImg2ImgPipeline` /
//! `AmusedInpaintPipeline` pre-process them. For a Kandinsky 2.0 folder: images prepared as the
//! official `prepare_image` → the KL posterior sampled from each image's seed, times the scale.

use crate::model::{Autoencoder, Movq};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use kd_models::image::resample::{resize, rgb_to_luma, Filter, Pixels};
use kd_models::image::{
    binarize_mask, decode_image, decode_mask, outpaint_canvas, preprocess_img2img,
    preprocess_inpaint, Margins, MaskImage,
};
use kd_models::kl::posterior_noise;
use kd_proto::v1;
use kd_runtime::{Cancel, ServiceError};

/// Largest side in pixels.
const MAX_SIDE: u32 = 2048;
/// What requested sides of a MoVQ or VQ-GAN folder are multiples of (the UNet's latents are
/// multiples of 8 behind an 8× MoVQ, as diffusers rounds them).
const DIFFUSERS_SIDE_MULTIPLE: usize = 64;

impl Movq {
    /// What requested `width` / `height` must be multiples of: 64 for a MoVQ or VQ-GAN folder,
    /// the autoencoder's scale factor (8 for the official config) for a Kandinsky 2.0 folder
    /// (the official `prepare_image` resizes to any size; the KL encoder needs whole latents).
    fn side_multiple(&self) -> (usize, &'static str) {
        match self.ae {
            Autoencoder::Kl(_) => (
                self.ae.scale_factor(),
                " (the KL autoencoder's scale factor)",
            ),
            _ => (DIFFUSERS_SIDE_MULTIPLE, ""),
        }
    }
}

/// The requested side `v` (`field`): a multiple of `m`'s side multiple in that multiple..=2048.
fn side(m: &Movq, field: &str, v: u32) -> Result<usize, ServiceError> {
    let (multiple, why) = m.side_multiple();
    let v = v as usize;
    let max = MAX_SIDE as usize;
    if !(multiple..=max).contains(&v) || !v.is_multiple_of(multiple) {
        return Err(ServiceError::invalid(
            field,
            format!("{v}; allowed: a multiple of {multiple}{why} in {multiple}..={max}"),
        ));
    }
    Ok(v)
}

/// A checked encode request: what to encode, validated against the loaded model.
pub(crate) struct Checked {
    input: Input,
    /// Kandinsky 2.0: one posterior seed per image (empty for other folders).
    seeds: Vec<u64>,
}

/// What a checked encode request encodes.
enum Input {
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

/// Checks one encode request (before admission): images or pixels, counts, sides, shapes and
/// seeds.
pub(crate) fn check(
    m: &Movq,
    mut req: v1::EncodeImagesRequest,
    deadline: Option<std::time::Instant>,
) -> Result<Checked, ServiceError> {
    let seeds = std::mem::take(&mut req.seeds);
    let input = check_fields(m, req)?;
    let (images, pixels) = match &input {
        Input::Pixels(x) => {
            let (b, _, h, w) = x.dims4()?;
            (b, h * w)
        }
        Input::Images { images, h, w, .. } => (images.len(), h * w),
    };
    let seeds = check_seeds(m, seeds, images)?;
    m.check_budget(false, images, pixels, deadline)?;
    Ok(Checked { input, seeds })
}

/// The request's `seeds` for `images` images: a Kandinsky 2.0 folder needs exactly one per image
/// (its KL posterior is sampled, each image's draw from its own seed); other folders' encoders
/// are deterministic and take none.
fn check_seeds(m: &Movq, seeds: Vec<u64>, images: usize) -> Result<Vec<u64>, ServiceError> {
    match (&m.ae, seeds.len()) {
        (Autoencoder::Kl(_), n) if n == images => Ok(seeds),
        (Autoencoder::Kl(_), n) => Err(ServiceError::invalid(
            "seeds",
            format!(
                "{n} seeds for {images} images; allowed: exactly {images}, one per image (this \
                 Kandinsky 2.0 KL autoencoder samples each image's posterior from its seed)"
            ),
        )),
        (_, 0) => Ok(seeds),
        (ae, n) => Err(ServiceError::invalid(
            "seeds",
            format!(
                "{n} seeds given; seeds are Kandinsky 2.0 only (this stage serves a {}, whose \
                 encoder is deterministic): allowed none",
                ae.what()
            ),
        )),
    }
}

/// The request's fields: images or pixels, counts, sides and shapes.
fn check_fields(m: &Movq, req: v1::EncodeImagesRequest) -> Result<Input, ServiceError> {
    match (req.pixels, req.images.is_empty()) {
        (Some(_), false) => Err(ServiceError::invalid(
            "images",
            "give either images or pixels, not both",
        )),
        (None, true) => Err(ServiceError::invalid(
            "images",
            "required: at least one encoded image (or `pixels`)",
        )),
        (Some(t), true) => check_pixels(m, &t).map(Input::Pixels),
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
            let (h, w) = (side(m, "height", req.height)?, side(m, "width", req.width)?);
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
            Ok(Input::Images {
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
    let sf = m.ae.scale_factor();
    let c = m.ae.image_channels();
    let x = kd_proto::from_wire(t, &candle_core::Device::Cpu, &Default::default())
        .map_err(|e| ServiceError::tensor("pixels", e))?;
    let d = x.dims().to_vec();
    let side_ok = |v: usize| v > 0 && v.is_multiple_of(sf);
    if d.len() != 4
        || d[1] != c
        || !(1..=m.max_batch).contains(&d[0])
        || !side_ok(d[2])
        || !side_ok(d[3])
    {
        return Err(ServiceError::invalid(
            "pixels",
            format!("shape {d:?}; allowed (B, {c}, H, W) with B in 1..={} and H, W positive multiples of {sf} (the {}'s scale factor)", m.max_batch, m.ae.what()),
        ));
    }
    if !x.dtype().is_float() {
        return Err(ServiceError::invalid(
            "pixels",
            format!(
                "dtype {:?}; allowed: F32, F16, BF16 values in [-1, 1]",
                x.dtype()
            ),
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

/// How an image without a mask becomes (1, 3, h, w) f32 pixels in [-1, 1]: `(image, h, w, sf)`.
type PlainImage = fn(&RgbImage, usize, usize, usize) -> Result<Tensor, ServiceError>;

/// A MoVQ's plain image: diffusers' img2img `VaeImageProcessor` (bicubic, `u8 / 255 · 2 − 1`).
fn diffusers_image(img: &RgbImage, h: usize, w: usize, sf: usize) -> Result<Tensor, ServiceError> {
    Ok(preprocess_img2img(img, h, w, sf)?)
}

/// A Kandinsky 2.0 KL autoencoder's plain image: the official `prepare_image`
/// (`resize((w, h), BICUBIC, reducing_gap=1)`, `u8 / 127.5 − 1`).
fn official_image(img: &RgbImage, h: usize, w: usize, _sf: usize) -> Result<Tensor, ServiceError> {
    resized_pixels(img, h, w, (Filter::Bicubic, Some(1.0)), |b| {
        f32::from(b) / 127.5 - 1.0
    })
}

/// Decodes and pre-processes the images (`plain`: the model's image-to-image conversion); with
/// masks, also the repaint masks (1 = repaint), as the denoiser takes them: each masked image
/// (the outpaint canvas with `outpaint`) and its mask as diffusers' Kandinsky inpaint pipeline
/// prepares them (the image bicubic to `w` × `h`, `u8 / 127.5 − 1`, which is also the official
/// 2.0 `prepare_image`; the mask LANCZOS, grey, binarised at 0.5).
fn preprocess(
    images: &[Vec<u8>],
    masks: &[Vec<u8>],
    outpaint: Option<Margins>,
    (h, w, sf): (usize, usize, usize),
    plain: PlainImage,
) -> Result<(Tensor, Option<Tensor>), ServiceError> {
    let (mut px, mut repaint) = (Vec::new(), Vec::new());
    for (img, mask) in images_and_masks(images, masks, outpaint, (h, w), false)? {
        match mask {
            Some(mask) => {
                let (keep, x) = preprocess_inpaint(&img, &mask, h, w, sf)?;
                repaint.push((1.0 - keep.to_dtype(DType::F32)?)?);
                px.push(x);
            }
            None => px.push(plain(&img, h, w, sf)?),
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
        let unit = |b: u8| f32::from(b) / 255.0;
        px.push(resized_pixels(&img, h, w, (Filter::Lanczos, None), unit)?);
    }
    stack(px, repaint)
}

/// `image` resized (Pillow `filter` with `reducing_gap`) to `w` × `h` as (1, 3, h, w) f32, each
/// byte mapped by `f`.
fn resized_pixels(
    image: &RgbImage,
    h: usize,
    w: usize,
    (filter, reducing_gap): (Filter, Option<f64>),
    f: impl Fn(u8) -> f32,
) -> Result<Tensor, ServiceError> {
    let src = Pixels {
        w: image.width() as usize,
        h: image.height() as usize,
        c: 3,
        data: image.as_raw().clone(),
    };
    if src.w == 0 || src.h == 0 {
        return Err(ServiceError::invalid(
            "image",
            format!("zero-sized image ({}×{})", src.w, src.h),
        ));
    }
    let p = resize(&src, w, h, filter, reducing_gap)?;
    let mut v = vec![0f32; 3 * h * w];
    for (i, px) in p.data.chunks_exact(3).enumerate() {
        for (c, &b) in px.iter().enumerate() {
            v[c * h * w + i] = f(b);
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

/// Runs one checked encode request; `cancel` stops it between the autoencoder's layers.
pub(crate) fn encode(
    m: &Movq,
    req: Checked,
    cancel: &Cancel,
) -> Result<v1::EncodeImagesResponse, ServiceError> {
    let sf = m.ae.scale_factor();
    let (pixels, mask) = match req.input {
        // The wire's pixels are in [-1, 1]; the aMUSEd VQ-GAN takes [0, 1].
        Input::Pixels(x) => match m.ae {
            Autoencoder::VqGan(_) => (x.affine(0.5, 0.5)?, None),
            Autoencoder::Movq(_) | Autoencoder::Kl(_) => (x, None),
        },
        Input::Images {
            images,
            masks,
            outpaint,
            h,
            w,
        } => {
            let size = (h, w, sf);
            match m.ae {
                Autoencoder::VqGan(_) => preprocess_tokens(&images, &masks, outpaint, size)?,
                Autoencoder::Movq(_) => {
                    preprocess(&images, &masks, outpaint, size, diffusers_image)?
                }
                Autoencoder::Kl(_) => preprocess(&images, &masks, outpaint, size, official_image)?,
            }
        }
    };
    let x = pixels
        .to_device(&m.device)
        .and_then(|x| x.to_dtype(m.ae.dtype()))?;
    let stop = || cancel.should_stop();
    let latents = match &m.ae {
        Autoencoder::VqGan(vq) => {
            cancel.check_at("before the VQ-GAN encoder")?;
            // (B, h, w) u32 → the wire's I64 token map.
            vq.encode_indices(&x, &stop)
                .map_err(|e| cancel.model_error(e))?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::I64)?
        }
        Autoencoder::Movq(vq) => {
            cancel.check_at("before the MoVQ encoder")?;
            vq.encode_interruptible(&x, &stop)
                .map_err(|e| cancel.model_error(e))?
                .to_dtype(DType::F32)?
        }
        Autoencoder::Kl(kl) => {
            cancel.check_at("before the KL encoder")?;
            // Kandinsky 2.0: `image_encoder.encode(image).sample() * scale`, each image's ε
            // from its own seed's posterior stream.
            let mut noise = posterior_noise(&req.seeds);
            kl.encode_interruptible(&x, &mut noise, &stop)
                .map_err(|e| cancel.model_error(e))?
                .to_dtype(DType::F32)?
        }
    };
    let wire = |t: &Tensor| kd_proto::to_wire(t).map_err(ServiceError::from);
    Ok(v1::EncodeImagesResponse {
        latents: Some(wire(&latents)?),
        mask: mask.as_ref().map(wire).transpose()?,
        model: Some(m.info.clone()),
    })
}
