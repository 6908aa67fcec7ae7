//! `EncodeImages`: CLIP vision embeddings of encoded images (PNG/JPEG/WebP, preprocessed as
//! `CLIPImageProcessor`) or of ready `pixel_values`.

use crate::model::PriorModel;
use crate::wire::{tensor, to_wire_f32};
use candle_core::Tensor;
use kd_models::clip::decode_image;
use kd_proto::v1;
use kd_runtime::model_info::check_requested_dtype;
use kd_runtime::{Metrics, ServiceError};

/// A checked request: what to embed.
pub enum Checked {
    /// Encoded images, decoded on the blocking pool.
    Images(Vec<Vec<u8>>),
    /// Ready pixel values (B, 3, 224, 224).
    Pixels(Tensor),
}

/// Validates one request (before admission): images or pixel values, and how many.
pub fn check(
    m: &PriorModel,
    req: v1::EmbedImagesRequest,
    max_batch: usize,
) -> Result<Checked, ServiceError> {
    check_requested_dtype(req.options.as_ref(), m.dtype)?;
    match (req.images.is_empty(), &req.pixel_values) {
        (false, Some(_)) => Err(ServiceError::invalid(
            "pixel_values",
            "give either images or pixel_values, not both",
        )),
        (true, None) => Err(ServiceError::invalid(
            "images",
            format!("give 1..={max_batch} encoded images (PNG, JPEG, WebP) or pixel_values (B, 3, 224, 224)"),
        )),
        (false, None) if req.images.len() > max_batch => Err(ServiceError::invalid(
            "images",
            format!("{} images, allowed 1..={max_batch}", req.images.len()),
        )),
        (false, None) => Ok(Checked::Images(req.images)),
        (true, Some(px)) => {
            let px = tensor("pixel_values", Some(px))?;
            let rows = px.dims().first().copied().unwrap_or(0);
            if rows > max_batch {
                return Err(ServiceError::invalid(
                    "pixel_values",
                    format!("{rows} images, allowed 1..={max_batch}"),
                ));
            }
            Ok(Checked::Pixels(px))
        }
    }
}

/// Embeds a checked request (on the blocking pool).
pub fn run(
    m: &PriorModel,
    req: Checked,
    metrics: &Metrics,
) -> Result<v1::EmbedImagesResponse, ServiceError> {
    let embeds = match req {
        Checked::Images(images) => {
            let images = images
                .iter()
                .enumerate()
                .map(|(i, bytes)| {
                    decode_image(bytes)
                        .map_err(|e| ServiceError::invalid(format!("images[{i}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            m.prior.encode_images(&images)?
        }
        Checked::Pixels(px) => m.prior.encode_pixels(&px)?,
    };
    metrics.batch(embeds.dims()[0]);
    Ok(v1::EmbedImagesResponse {
        image_embeds: Some(to_wire_f32(&embeds)?),
        model: Some(m.info.clone()),
    })
}
