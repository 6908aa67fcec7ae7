//! `Movq.DecodeLatents`: latents → encoded images (and optionally the post-processed pixels).
//! For an aMUSEd folder the latents are a (B, h, w) token map, decoded by the VQ-GAN; for a
//! Kandinsky 2.0 folder they are the UNet's scaled latents, decoded by the KL autoencoder and
//! converted to bytes as the official `process_images` does.

use crate::model::{Autoencoder, Movq};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use kd_models::image::{encode_image, postprocess, postprocess_nhwc01, rgb_images, OutputFormat};
use kd_models::kd20::pipeline::process_images;
use kd_models::movq::VqModel;
use kd_proto::v1;
use kd_runtime::microbatch::shared_failure;
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

/// Decodes and checks the `latents` field: (B, latent_channels, h, w) floats with B ≤ max batch,
/// or for an aMUSEd VQ-GAN a (B, h, w) token map.
fn latents(m: &Movq, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    if let Autoencoder::VqGan(vq) = &m.ae {
        return token_map(m, vq, t);
    }
    let c = m.ae.latent_channels();
    let t = t.ok_or_else(|| {
        ServiceError::invalid("latents", format!("required: (B, {c}, h, w) tensor"))
    })?;
    let x = kd_proto::from_wire(t, &m.device, &Default::default())
        .map_err(|e| ServiceError::tensor("latents", e))?;
    if !x.dtype().is_float() {
        // Only an aMUSEd VQ-GAN decodes token maps.
        return Err(ServiceError::invalid(
            "latents",
            format!(
                "dtype {:?} (a token map); allowed: F32, F16, BF16 (this stage serves a {} of \
                 continuous latents)",
                x.dtype(),
                m.ae.what()
            ),
        ));
    }
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
    m.latent_pixels("latents", dims[2], dims[3])?;
    Ok(x)
}

/// Decodes and checks the `latents` field of an aMUSEd VQ-GAN: a (B, h, w) integer token map with
/// B ≤ max batch, sides within the pixel limits and every id in the codebook. Returns it as U32
/// on the CPU (the codebook lookup moves it to the device).
fn token_map(m: &Movq, vq: &VqModel, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    let n = vq.config().num_vq_embeddings;
    let sf = vq.scale_factor();
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
    m.latent_pixels("latents", dims[1], dims[2])?;
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

impl Checked {
    /// Which decodes may share a decoder call: same latent shape past the batch and dtype.
    pub(crate) fn class(&self) -> String {
        format!("{:?} {:?}", &self.latents.dims()[1..], self.latents.dtype())
    }

    /// Images asked for.
    pub(crate) fn rows(&self) -> usize {
        self.latents.dims().first().copied().unwrap_or(0)
    }
}

/// Runs checked decode requests of one class in one decoder call; each gets its own images, in
/// its own format. `stop` (every request of the call wants to stop) stops the decoder between
/// its layers.
pub(crate) fn decode_batch(
    m: &Movq,
    reqs: Vec<(Checked, Cancel)>,
    stop: &dyn Fn() -> bool,
) -> Vec<Result<v1::DecodeLatentsResponse, ServiceError>> {
    let latents: Vec<&Tensor> = reqs.iter().map(|(r, _)| &r.latents).collect();
    let decoded = match latents.as_slice() {
        [one] => decode_pixels(m, one, stop),
        all => Tensor::cat(all, 0)
            .map_err(ServiceError::from)
            .and_then(|z| decode_pixels(m, &z, stop)),
    };
    let mut start = 0;
    reqs.into_iter()
        .map(|(req, cancel)| {
            let n = req.rows();
            let reply = match &decoded {
                Ok((images, nhwc01)) => images
                    .get(start..start + n)
                    .ok_or_else(|| {
                        ServiceError::Internal(format!(
                            "the decoder returned {} images for {} asked",
                            images.len(),
                            start + n
                        ))
                    })
                    .and_then(|own| respond(m, &req, own, &nhwc01.narrow(0, start, n)?)),
                Err(e) => Err(shared_failure(&cancel, e, "in the decoder")),
            };
            start += n;
            reply
        })
        .collect()
}

/// The decoder's images of latents (or token maps) `z`, and the same as (B, H, W, 3) f32
/// pixels in [0, 1].
fn decode_pixels(
    m: &Movq,
    z: &Tensor,
    stop: &dyn Fn() -> bool,
) -> Result<(Vec<RgbImage>, Tensor), ServiceError> {
    Ok(match &m.ae {
        Autoencoder::VqGan(vq) => {
            // aMUSEd: `vqvae.decode(ids, force_not_quantize=True, shape=…).sample.clip(0, 1)`,
            // as `AmusedPipeline::decode`.
            let x01 = vq
                .decode_indices(z, &stop)?
                .to_dtype(DType::F32)?
                .clamp(0f32, 1f32)?;
            let nhwc = x01
                .to_device(&Device::Cpu)?
                .permute((0, 2, 3, 1))?
                .contiguous()?;
            (rgb_images(&nhwc)?, nhwc)
        }
        Autoencoder::Movq(vq) => {
            let z = z.to_dtype(vq.dtype())?;
            let pixels = vq.decode_interruptible(&z, &stop)?.to_dtype(DType::F32)?;
            (postprocess(&pixels)?, postprocess_nhwc01(&pixels)?)
        }
        Autoencoder::Kl(kl) => {
            // Kandinsky 2.0: `image_encoder.decode(latents / scale)`, then `process_images`.
            let x = kl.decode_interruptible(z, &stop)?.to_device(&Device::Cpu)?;
            official_images(&process_images(&x)?)?
        }
    })
}

/// One request's response: its images encoded in its format, and its pixels when asked.
fn respond(
    m: &Movq,
    req: &Checked,
    images: &[RgbImage],
    nhwc01: &Tensor,
) -> Result<v1::DecodeLatentsResponse, ServiceError> {
    let format = req.format;
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
        Some(kd_proto::to_wire(nhwc01)?)
    } else {
        None
    };
    Ok(v1::DecodeLatentsResponse {
        images,
        pixels,
        model: Some(m.info.clone()),
    })
}

/// The official Kandinsky 2.0 bytes (`process_images`' (B, H, W, 3) u8 NHWC on the CPU) as RGB
/// images, and as (B, H, W, 3) f32 `u8 / 255` pixels.
fn official_images(nhwc: &Tensor) -> Result<(Vec<RgbImage>, Tensor), ServiceError> {
    let (b, h, w, c) = nhwc.dims4()?;
    let bytes = nhwc.flatten_all()?.to_vec1::<u8>()?;
    let unit: Vec<f32> = bytes.iter().map(|&v| f32::from(v) / 255.0).collect();
    let size = |v: usize| {
        u32::try_from(v).map_err(|_| ServiceError::Internal(format!("image side {v} is over u32")))
    };
    let (iw, ih) = (size(w)?, size(h)?);
    let per_image = h * w * c;
    let images = bytes
        .chunks_exact(per_image.max(1))
        .take(b)
        .map(|px| {
            RgbImage::from_raw(iw, ih, px.to_vec()).ok_or_else(|| {
                ServiceError::Internal(format!("decoded image: {c} channels, expected 3"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((images, Tensor::from_vec(unit, (b, h, w, c), &Device::Cpu)?))
}
