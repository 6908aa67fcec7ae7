//! `Movq.DecodeLatents`: latents → encoded images (and optionally the post-processed pixels).
//! For an aMUSEd folder the latents are a (B, h, w) token map, decoded by the VQ-GAN.

use crate::model::Movq;
use candle_core::{DType, Device, Tensor};
use kd_models::image::{encode_image, postprocess, postprocess_nhwc01, rgb_images, OutputFormat};
use kd_models::interrupt;
use kd_proto::v1;
use kd_runtime::{Cancel, ServiceError};

/// Largest latent side accepted (2048 px at the real MoVQ's scale factor 8).
const MAX_LATENT_SIDE: usize = 256;
/// Largest image side (pixels) of a decoded token map: its token sides are at most this over the
/// VQ-GAN's scale factor (128 for the real aMUSEd VQ-GAN, scale factor 16).
const MAX_TOKEN_IMAGE_SIDE: usize = 2048;
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

/// Decodes and checks the `latents` field: (B, latent_channels, h, w) with B ≤ max batch, or for
/// an aMUSEd VQ-GAN a (B, h, w) token map.
fn latents(m: &Movq, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    if m.tokens {
        return token_map(m, t);
    }
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

/// Decodes and checks the `latents` field of an aMUSEd VQ-GAN: a (B, h, w) integer token map with
/// B ≤ max batch, sides within the pixel limits and every id in the codebook. Returns it as U32
/// on the CPU (the codebook lookup moves it to the device).
fn token_map(m: &Movq, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    let n = m.vq.config().num_vq_embeddings;
    let sf = m.vq.scale_factor();
    let max_side = (MAX_TOKEN_IMAGE_SIDE / sf).max(1);
    let allowed = format!(
        "allowed: a (B, h, w) I64 token map (this stage serves an aMUSEd VQ-GAN) with B in 1..={}, \
         h, w in 1..={max_side} and ids in 0..{n}",
        m.max_batch
    );
    let t = t.ok_or_else(|| ServiceError::invalid("latents", format!("required; {allowed}")))?;
    let x = kd_proto::from_wire(t, &Device::Cpu, &Default::default())
        .map_err(|e| ServiceError::tensor("latents", e))?;
    let dims = x.dims().to_vec();
    let ok = !x.dtype().is_float()
        && dims.len() == 3
        && (1..=m.max_batch).contains(&dims[0])
        && (1..=max_side).contains(&dims[1])
        && (1..=max_side).contains(&dims[2]);
    if !ok {
        return Err(ServiceError::invalid(
            "latents",
            format!("shape {dims:?}, dtype {:?}; {allowed}", x.dtype()),
        ));
    }
    m.check_pixels("latents", dims[1] * sf, dims[2] * sf)?;
    let ids = x.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    if let Some((i, bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &v)| v < 0 || v as u64 >= n as u64)
    {
        let (row, rest) = (i / (dims[1] * dims[2]), i % (dims[1] * dims[2]));
        let (y, x) = (rest / dims[2], rest % dims[2]);
        return Err(ServiceError::invalid(
            "latents",
            format!(
                "token {bad} at ({row}, {y}, {x}) is outside the codebook; ids must be in 0..{n}"
            ),
        ));
    }
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    Ok(Tensor::from_vec(ids, dims, &Device::Cpu)?)
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
    let (b, h, w) = match *checked.latents.dims() {
        [b, h, w] => (b, h, w),
        _ => {
            let (b, _, h, w) = checked.latents.dims4()?;
            (b, h, w)
        }
    };
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
    let stop = || cancel.should_stop();
    let (images, nhwc01) = if m.tokens {
        cancel.check_at("before the VQ-GAN decoder")?;
        // aMUSEd: `vqvae.decode(ids, force_not_quantize=True, shape=…).sample.clip(0, 1)`, as
        // `AmusedPipeline::decode`.
        let x01 =
            m.vq.decode_indices(&req.latents, &stop)
                .map_err(|e| cancel.model_error(e))?
                .to_dtype(DType::F32)?
                .clamp(0f32, 1f32)?;
        let nhwc = x01
            .to_device(&Device::Cpu)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        (rgb_images(&nhwc)?, nhwc)
    } else {
        let z = req.latents.to_dtype(m.vq.dtype())?;
        cancel.check_at("before the MoVQ decoder")?;
        let pixels =
            m.vq.decode_interruptible(&z, &stop)
                .map_err(|e| cancel.model_error(e))?
                .to_dtype(DType::F32)?;
        (postprocess(&pixels)?, postprocess_nhwc01(&pixels)?)
    };
    let images = images
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
        Some(kd_proto::to_wire(&nhwc01)?)
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
    if m.tokens {
        let ids = Tensor::zeros((1, 8, 8), DType::U32, &Device::Cpu)?;
        m.vq.decode_indices(&ids, &interrupt::never)?;
        return Ok(());
    }
    let c = m.vq.config().latent_channels;
    let z = Tensor::zeros((1, c, 8, 8), m.vq.dtype(), &m.device)?;
    m.vq.decode(&z)?;
    Ok(())
}
