//! `Movq.DecodeLatents`: latents → encoded images (and optionally the post-processed pixels).

use crate::model::Movq;
use candle_core::{DType, Tensor};
use kd_models::image::{encode_image, postprocess, postprocess_nhwc01, OutputFormat};
use kd_proto::v1;
use kd_runtime::{Cancel, ServiceError};

/// Largest latent side accepted (2048 px at the real MoVQ's scale factor 8).
const MAX_LATENT_SIDE: usize = 256;
/// Default JPEG quality.
const DEFAULT_QUALITY: u32 = 90;

/// The output encoding requested by `format` / `quality`.
pub(crate) fn output_format(format: i32, quality: u32) -> Result<OutputFormat, ServiceError> {
    let q = if quality == 0 {
        DEFAULT_QUALITY
    } else {
        quality
    };
    if q > 100 {
        return Err(ServiceError::invalid(
            "quality",
            format!("{quality}; allowed: 1..=100 (0 = default {DEFAULT_QUALITY})"),
        ));
    }
    match v1::ImageFormat::try_from(format) {
        Ok(v1::ImageFormat::Unspecified | v1::ImageFormat::Png) => Ok(OutputFormat::Png),
        Ok(v1::ImageFormat::Jpeg) => Ok(OutputFormat::jpeg(q as u8)?),
        Ok(v1::ImageFormat::Webp) => Ok(OutputFormat::WebP),
        Err(_) => Err(ServiceError::invalid(
            "format",
            format!("{format}; allowed: IMAGE_FORMAT_PNG, IMAGE_FORMAT_JPEG, IMAGE_FORMAT_WEBP"),
        )),
    }
}

/// Decodes and checks the `latents` field: (B, latent_channels, h, w) with B ≤ max batch.
fn latents(m: &Movq, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    let t = t.ok_or_else(|| ServiceError::invalid("latents", "required: (B, 4, h, w) tensor"))?;
    let x = kd_proto::from_wire(t, &m.device, &Default::default())
        .map_err(|e| ServiceError::tensor("latents", e))?;
    let c = m.vq.config().latent_channels;
    let dims = x.dims().to_vec();
    let ok = dims.len() == 4
        && dims[1] == c
        && (1..=m.max_batch).contains(&dims[0])
        && (1..=MAX_LATENT_SIDE).contains(&dims[2])
        && (1..=MAX_LATENT_SIDE).contains(&dims[3]);
    if !ok {
        return Err(ServiceError::invalid(
            "latents",
            format!("shape {dims:?}; allowed (B, {c}, h, w) with B in 1..={} and h, w in 1..={MAX_LATENT_SIDE}", m.max_batch),
        ));
    }
    let sf = m.vq.scale_factor();
    m.check_pixels("latents", dims[2] * sf, dims[3] * sf)?;
    if x.dtype() == DType::I64 {
        return Err(ServiceError::invalid(
            "latents",
            "dtype I64; allowed: F32, F16, BF16",
        ));
    }
    Ok(x)
}

/// A checked decode request.
pub(crate) struct Checked {
    format: OutputFormat,
    latents: Tensor,
    return_pixels: bool,
}

/// Checks one decode request against the loaded model and its deadline (before admission).
pub(crate) fn check(
    m: &Movq,
    req: &v1::DecodeLatentsRequest,
    deadline: Option<std::time::Instant>,
) -> Result<Checked, ServiceError> {
    let checked = Checked {
        format: output_format(req.format, req.quality)?,
        latents: latents(m, req.latents.as_ref())?,
        return_pixels: req.return_pixels,
    };
    let (b, _, h, w) = checked.latents.dims4()?;
    m.check_budget(true, b, h * w, deadline)?;
    Ok(checked)
}

/// Runs one checked decode request; `cancel` stops it between MoVQ layers.
pub(crate) fn decode(
    m: &Movq,
    req: Checked,
    cancel: &Cancel,
) -> Result<v1::DecodeLatentsResponse, ServiceError> {
    let format = req.format;
    let z = req.latents.to_dtype(m.vq.dtype())?;
    cancel.check_at("before the MoVQ decoder")?;
    let pixels =
        m.vq.decode_interruptible(&z, &|| cancel.should_stop())
            .map_err(|e| cancel.model_error(e))?
            .to_dtype(DType::F32)?;
    let images = postprocess(&pixels)?
        .iter()
        .map(|img| {
            Ok(v1::Image {
                data: encode_image(img, format)?,
                format: match format {
                    OutputFormat::Png => v1::ImageFormat::Png,
                    OutputFormat::Jpeg { .. } => v1::ImageFormat::Jpeg,
                    OutputFormat::WebP => v1::ImageFormat::Webp,
                } as i32,
                width: img.width(),
                height: img.height(),
            })
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    let pixels = if req.return_pixels {
        Some(kd_proto::to_wire(&postprocess_nhwc01(&pixels)?)?)
    } else {
        None
    };
    Ok(v1::DecodeLatentsResponse {
        images,
        pixels,
        model: Some(m.info.clone()),
    })
}

/// One small decode, so the first real request does not pay for lazy initialisation.
pub(crate) fn warm_up(m: &Movq) -> Result<(), ServiceError> {
    let c = m.vq.config().latent_channels;
    let z = Tensor::zeros((1, c, 8, 8), m.vq.dtype(), &m.device)?;
    m.vq.decode(&z)?;
    Ok(())
}
