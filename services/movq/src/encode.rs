//! `Movq.EncodeImages`: images (and inpaint masks) → latents (and the pre-processed repaint masks).

use crate::model::Movq;
use candle_core::{DType, Tensor};
use kd_models::image::{
    decode_image, decode_mask, outpaint_canvas, preprocess_img2img, preprocess_inpaint, Margins,
    MaskImage,
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

/// Decodes and pre-processes the images (as diffusers' img2img / inpaint pipelines do); with
/// masks, also the repaint masks (1 = repaint), as the denoiser takes them.
fn preprocess(
    images: &[Vec<u8>],
    masks: &[Vec<u8>],
    outpaint: Option<Margins>,
    (h, w, sf): (usize, usize, usize),
) -> Result<(Tensor, Option<Tensor>), ServiceError> {
    let mut px = Vec::with_capacity(images.len());
    let mut repaint = Vec::with_capacity(images.len());
    for (i, bytes) in images.iter().enumerate() {
        let img = decode_image(bytes)?;
        let (img, mask) = match (masks.get(i), outpaint) {
            (Some(mask_bytes), _) => (img, Some(decode_mask(mask_bytes)?)),
            (None, Some(margins)) => {
                let (canvas, mask) = outpaint_canvas(&img, w as u32, h as u32, margins)?;
                (canvas, Some(MaskImage::Luma(mask)))
            }
            (None, None) => (img, None),
        };
        match mask {
            Some(mask) => {
                let (keep, x) = preprocess_inpaint(&img, &mask, h, w, sf)?;
                repaint.push((1.0 - keep.to_dtype(DType::F32)?)?);
                px.push(x);
            }
            None => px.push(preprocess_img2img(&img, h, w, sf)?),
        }
    }
    let mask = if repaint.is_empty() {
        None
    } else {
        Some(Tensor::cat(&repaint, 0)?)
    };
    Ok((Tensor::cat(&px, 0)?, mask))
}

/// Runs one checked encode request; `cancel` stops it between MoVQ layers.
pub(crate) fn encode(
    m: &Movq,
    req: Checked,
    cancel: &Cancel,
) -> Result<v1::EncodeImagesResponse, ServiceError> {
    let (pixels, mask) = match req {
        Checked::Pixels(x) => (x, None),
        Checked::Images {
            images,
            masks,
            outpaint,
            h,
            w,
        } => preprocess(&images, &masks, outpaint, (h, w, m.vq.scale_factor()))?,
    };
    let x = pixels
        .to_device(&m.device)
        .and_then(|x| x.to_dtype(m.vq.dtype()))?;
    cancel.check_at("before the MoVQ encoder")?;
    let latents =
        m.vq.encode_interruptible(&x, &|| cancel.should_stop())
            .map_err(|e| cancel.model_error(e))?
            .to_dtype(DType::F32)?;
    let wire = |t: &Tensor| kd_proto::to_wire(t).map_err(ServiceError::from);
    Ok(v1::EncodeImagesResponse {
        latents: Some(wire(&latents)?),
        mask: mask.as_ref().map(wire).transpose()?,
        model: Some(m.info.clone()),
    })
}
