//! `Movq.Encode`: images (and inpaint masks) → latents (and the pre-processed repaint masks).

use crate::model::Movq;
use candle_core::{DType, Tensor};
use kd_models::image::{decode_image, decode_mask, preprocess_img2img, preprocess_inpaint};
use kd_proto::v1;
use kd_runtime::ServiceError;

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

/// Runs one encode request.
pub(crate) fn encode(
    m: &Movq,
    req: &v1::EncodeRequest,
) -> Result<v1::EncodeResponse, ServiceError> {
    let sf = m.vq.scale_factor();
    let (pixels, mask) = match (&req.pixels, req.images.is_empty()) {
        (Some(_), false) => {
            return Err(ServiceError::invalid(
                "images",
                "give either images or pixels, not both",
            ))
        }
        (None, true) => {
            return Err(ServiceError::invalid(
                "images",
                "required: at least one encoded image (or `pixels`)",
            ))
        }
        (Some(t), true) => {
            let x = kd_proto::from_wire(t, &candle_core::Device::Cpu, &Default::default())
                .map_err(|e| ServiceError::tensor("pixels", e))?;
            let d = x.dims().to_vec();
            if d.len() != 4
                || d[1] != 3
                || d[0] == 0
                || d[0] > m.max_batch
                || d[2] % sf != 0
                || d[3] % sf != 0
                || d[2] == 0
                || d[3] == 0
            {
                return Err(ServiceError::invalid(
                    "pixels",
                    format!("shape {d:?}; allowed (B, 3, H, W) with B in 1..={} and H, W positive multiples of {sf}", m.max_batch),
                ));
            }
            (x.to_dtype(DType::F32)?, None)
        }
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
            let mut px = Vec::with_capacity(req.images.len());
            let mut masks = Vec::with_capacity(req.masks.len());
            for (i, bytes) in req.images.iter().enumerate() {
                let img = decode_image(bytes)?;
                match req.masks.get(i) {
                    Some(mask_bytes) => {
                        let (keep, x) =
                            preprocess_inpaint(&img, &decode_mask(mask_bytes)?, h, w, sf)?;
                        // The denoiser takes the repaint mask (1 = repaint): invert the keep-mask.
                        masks.push((1.0 - keep.to_dtype(DType::F32)?)?);
                        px.push(x);
                    }
                    None => px.push(preprocess_img2img(&img, h, w, sf)?),
                }
            }
            let mask = if masks.is_empty() {
                None
            } else {
                Some(Tensor::cat(&masks, 0)?)
            };
            (Tensor::cat(&px, 0)?, mask)
        }
    };
    let x = pixels
        .to_device(&m.device)
        .and_then(|x| x.to_dtype(m.vq.dtype()))?;
    let latents = m.vq.encode(&x)?.to_dtype(DType::F32)?;
    let wire = |t: &Tensor| kd_proto::to_wire(t).map_err(ServiceError::from);
    Ok(v1::EncodeResponse {
        latents: Some(wire(&latents)?),
        mask: mask.as_ref().map(wire).transpose()?,
        model: Some(m.info.clone()),
    })
}
