//! The Kandinsky 2.0 pipeline: `kandinsky2_model.py: Kandinsky2` built from the official
//! checkpoint folder, and `generate_text2img` / `generate_img2img` / `generate_inpainting` →
//! `generate_img` run as upstream runs them.
//!
//! Layout read by [`Kd20Pipeline::load`] (the hub repo `sberbank-ai/Kandinsky_2.0`):
//! `Kandinsky-2-0.pt` (the `Text2ImUNet` state dict; or `Kandinsky-2-0-inpainting.pt`, the
//! `InpaintText2ImUNet` one, see [`Kd20Denoiser::load`]), `vae.ckpt` (`{"state_dict": ...}`),
//! `text_encoder1/`, `text_encoder2/`. Two optional sidecars override the built-in
//! `CONFIG_2_0` values (upstream has none; the tiny test checkpoints need them):
//! `unet.json` ([`Kd20UnetConfig`](super::unet::Kd20UnetConfig), `model_config` keys +
//! `norm_num_groups`, `text_encoder2_dim`) and `vae.json` ([`KlConfig`], the
//! `image_enc_params` entry).
//!
//! What `generate_img` does, and this module with it:
//! * the text rows are `[prompt] · B + [""] · B` through both encoders (no negative prompt
//!   upstream: the unconditional rows are the empty prompt), the UNet's text embedding computed
//!   once (the official `cache_text_emb`);
//! * latents `(2B, 4, ⌈h/64⌉·8, ⌈w/64⌉·8)` sampled by [`GenerateImg`] (classifier-free guidance
//!   on `cat([half, half])`, p-sampler respaced to `num_steps` with dynamic thresholding, DDIM at
//!   eta 0, PLMS), the first `B` rows kept;
//! * `image_encoder.decode(samples / scale)`, cropped to `[:h, :w]`, and `process_images`:
//!   `((x + 1) · 127.5).round().clamp(0, 255)` as `u8`, NHWC (torch rounds half to even).
//!
//! [`Kd20Pipeline::img2img`] is `generate_img2img`: the init image is encoded
//! (`image_encoder.encode(image).sample() · scale`, one draw), noised by `q_sample` to
//! `timestep_map[start_step − 1]` on the unrespaced linear schedule (one draw), repeated for the
//! guidance halves and sampled from `init_step = int(num_timesteps · (1 − strength))`. The
//! official `prepare_image` (bicubic resize to 512×512, `/ 127.5 − 1`) is the caller's: this
//! takes the prepared tensor, and the latents follow its size (`generate_img` is called without
//! `h`/`w`, so upstream's 512 crop is a no-op there and is not applied here).
//!
//! [`Kd20Pipeline::inpaint`] is `generate_inpainting` (a folder holding
//! `Kandinsky-2-0-inpainting.pt` and no `Kandinsky-2-0.pt`): the init image is encoded (one
//! draw), the official KEEP mask (1 = keep, 0 = repaint) resized to the latents
//! (`F.interpolate(mode="nearest")`) and grown by `prepare_mask`, and `generate_img` samples
//! with the UNet's inpainting inputs (and, for the p-sampler only, the mask-blending
//! `denoised_fn`). The init image is prepared by the caller as for img2img; upstream samples at
//! `generate_img`'s default 512×512 (64×64 latents, the size of its prepared image), here the
//! latents' size, uncropped.
//!
//! Everything from the text conditioning to the latents is [`Kd20Denoiser::sample`] (what the
//! denoiser service runs): the pipeline only adds the text encoders and the VAE around it.

use super::denoise::{check_keep_mask, Kd20Denoiser, Kd20Sampling, Kd20Task, Kd20Text};
use super::text::Kd20TextEncoders;
use super::unet::Text2ImUNet;
use crate::error::{ModelError, Result};
use crate::interrupt;
use crate::kl::{AutoencoderKl, KlConfig};
use crate::noise::NoiseSource;
use crate::schedulers::guided::{DenoisedType, DiffusionConfig, SamplerKind};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The UNet checkpoint's file name in the official folder.
pub const KD20_UNET_FILE: &str = crate::checkpoint::KD20_UNET_FILES[0];
/// The inpainting UNet checkpoint's file name (`get_kandinsky2(task_type="inpainting")`).
pub const KD20_INPAINT_UNET_FILE: &str = crate::checkpoint::KD20_UNET_FILES[1];
/// The autoencoder checkpoint's file name in the official folder.
pub const KD20_VAE_FILE: &str = "vae.ckpt";

/// `generate_text2img`'s arguments (defaults: the official ones, see [`Self::new`]).
#[derive(Debug, Clone)]
pub struct Kd20Text2Img {
    pub prompt: String,
    /// Images for the prompt (`batch_size`); the sampled batch is twice that.
    pub batch_size: usize,
    pub num_steps: usize,
    pub guidance_scale: f64,
    /// Output height in pixels (`h`); latents are `⌈h/64⌉·8` high, the image is cropped.
    pub height: usize,
    /// Output width in pixels (`w`).
    pub width: usize,
    pub sampler: SamplerKind,
}

impl Kd20Text2Img {
    /// `generate_text2img`'s defaults: 100 steps, 1 image, guidance 7, 512×512, DDIM.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            batch_size: 1,
            num_steps: 100,
            guidance_scale: 7.0,
            height: 512,
            width: 512,
            sampler: SamplerKind::Ddim,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(ModelError::invalid("batch_size", "0; allowed ≥ 1"));
        }
        if self.num_steps == 0 {
            return Err(ModelError::invalid("num_steps", "0; allowed ≥ 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(ModelError::invalid(
                "guidance_scale",
                format!("{}; allowed a finite value", self.guidance_scale),
            ));
        }
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if v == 0 {
                return Err(ModelError::invalid(name, "0; allowed ≥ 1"));
            }
        }
        Ok(())
    }
}

/// `generate_img2img`'s arguments (defaults: the official ones, see [`Self::new`]).
#[derive(Debug, Clone)]
pub struct Kd20Img2Img {
    pub prompt: String,
    /// Images for the prompt; the init image has this many rows or one (then repeated first:
    /// each row gets its own posterior and `q_sample` draws). Upstream always has 1.
    pub batch_size: usize,
    /// `start_step = int(num_timesteps · (1 − strength))` must be ≥ 1.
    pub strength: f64,
    pub num_steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
}

impl Kd20Img2Img {
    /// `generate_img2img`'s defaults: strength 0.7, 100 steps, guidance 7, DDIM, 1 image.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            batch_size: 1,
            strength: 0.7,
            num_steps: 100,
            guidance_scale: 7.0,
            sampler: SamplerKind::Ddim,
        }
    }
}

/// `generate_inpainting`'s arguments (defaults: the official ones, see [`Self::new`]).
#[derive(Debug, Clone)]
pub struct Kd20InpaintArgs {
    pub prompt: String,
    /// Images for the prompt; the init image and the keep mask have this many rows or one
    /// (then repeated: each image row gets its own posterior draw). Upstream always has 1.
    pub batch_size: usize,
    pub num_steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    /// The p-sampler's `denoised_fn` percentile (unused by DDIM/PLMS, as upstream).
    pub dynamic_threshold_v: f64,
    /// The p-sampler's `denoised_fn` kind (unused by DDIM/PLMS, as upstream).
    pub denoised_type: DenoisedType,
}

impl Kd20InpaintArgs {
    /// `generate_inpainting`'s defaults: 100 steps, guidance 7, DDIM, `dynamic_threshold_v`
    /// 99.5, `"dynamic_threshold"`, 1 image (`ddim_eta` never reaches DDIM: not kept).
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            batch_size: 1,
            num_steps: 100,
            guidance_scale: 7.0,
            sampler: SamplerKind::Ddim,
            dynamic_threshold_v: 99.5,
            denoised_type: DenoisedType::DynamicThreshold,
        }
    }

    fn sampling(&self) -> Kd20Sampling {
        Kd20Sampling {
            dynamic_threshold_v: self.dynamic_threshold_v,
            denoised_type: self.denoised_type,
            ..Kd20Sampling::new(self.sampler, self.num_steps, self.guidance_scale)
        }
    }
}

/// The pipeline's output.
#[derive(Debug, Clone)]
pub struct Kd20Images {
    /// The decoded, cropped images (B, 3, h, w), f32, unclamped (what `process_images` gets).
    pub raw: Tensor,
    /// `process_images`' arrays: (B, h, w, 3) `u8`.
    pub uint8: Tensor,
}

fn check_batch(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(ModelError::invalid("batch_size", "0; allowed ≥ 1"));
    }
    Ok(())
}

/// Kandinsky 2.0: both text encoders, the UNet ([`Kd20Denoiser`]: text-to-image or
/// inpainting) and the `AutoencoderKL`.
pub struct Kd20Pipeline {
    text: Kd20TextEncoders,
    denoiser: Kd20Denoiser,
    vae: AutoencoderKl,
}

impl Kd20Pipeline {
    /// Loads the official folder `dir` (see the module docs) in `dtype` on `device`: the
    /// text-to-image UNet when the folder has it, else the inpainting one
    /// ([`Kd20Denoiser::load`]).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message: "missing: a Kandinsky 2.0 checkpoint folder".into(),
            });
        }
        let text = Kd20TextEncoders::load(dir, dtype, device)?;
        let denoiser = Kd20Denoiser::load(dir, dtype, device)?;
        let vae_cfg = match dir.join("vae.json") {
            p if p.is_file() => KlConfig::from_file(&p)?,
            _ => KlConfig::kandinsky_2_0(),
        };
        let vae = AutoencoderKl::load(&dir.join(KD20_VAE_FILE), &vae_cfg, dtype, device)?;
        Ok(Self {
            text,
            denoiser,
            vae,
        })
    }

    pub fn text_encoders(&self) -> &Kd20TextEncoders {
        &self.text
    }

    /// The UNet and the sampling built on it.
    pub fn denoiser(&self) -> &Kd20Denoiser {
        &self.denoiser
    }

    pub fn unet(&self) -> &Text2ImUNet {
        self.denoiser.unet()
    }

    pub fn vae(&self) -> &AutoencoderKl {
        &self.vae
    }

    /// `CONFIG_2_0["diffusion_config"]`.
    pub fn diffusion_config(&self) -> &DiffusionConfig {
        self.denoiser.diffusion_config()
    }

    /// `get_new_h_w`: the latent size for an `h × w` request (`⌈h/64⌉·8`, `⌈w/64⌉·8`).
    pub fn latent_size(height: usize, width: usize) -> (usize, usize) {
        (height.div_ceil(64) * 8, width.div_ceil(64) * 8)
    }

    /// `generate_text2img`: every Gaussian draw comes from `noise`, in the official order.
    /// Refused (`task`) on the inpainting model.
    pub fn text2img(&self, args: &Kd20Text2Img, noise: &mut dyn NoiseSource) -> Result<Kd20Images> {
        args.validate()?;
        let (lh, lw) = Self::latent_size(args.height, args.width);
        let task = Kd20Task::TextToImage {
            latent_height: lh,
            latent_width: lw,
        };
        let sampling = Kd20Sampling::new(args.sampler, args.num_steps, args.guidance_scale);
        self.denoiser.total_steps(&sampling, &task)?;
        let decoded =
            self.sample_and_decode(&args.prompt, args.batch_size, &task, &sampling, noise)?;
        let (_, _, dh, dw) = decoded.dims4()?;
        let raw = decoded
            .narrow(2, 0, args.height.min(dh))?
            .narrow(3, 0, args.width.min(dw))?
            .contiguous()?;
        let uint8 = process_images(&raw)?;
        Ok(Kd20Images { raw, uint8 })
    }

    /// `generate_img2img` on an already prepared init image (B or 1, 3, H, W) in [-1, 1], H and
    /// W multiples of the VAE's scale factor (upstream: `prepare_image`'s 512×512, the
    /// caller's job). Draws, in order: the posterior sample, `q_sample`'s, the sampler's. The
    /// output is H × W. Refused (`task`) on the inpainting model.
    pub fn img2img(
        &self,
        args: &Kd20Img2Img,
        image: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        let sampling = self.img2img_sampling(args)?;
        // Checked before any draw (the denoiser checks it again).
        self.denoiser
            .check_params(&sampling)?
            .img2img_start_step(args.strength)?;
        let image = self.image_rows(image, args.batch_size)?;
        let latents = self.vae.encode(&image.to_dtype(self.vae.dtype())?, noise)?;
        self.img2img_latents(args, &latents, noise)
    }

    /// [`Self::img2img`] after the encoding: `latents` are the init image's posterior sample ×
    /// scale, `(batch_size, 4, h, w)`. Draws `q_sample`'s, then the sampler's.
    pub fn img2img_latents(
        &self,
        args: &Kd20Img2Img,
        latents: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        let sampling = self.img2img_sampling(args)?;
        let task = Kd20Task::ImageToImage {
            latents: latents.clone(),
            strength: args.strength,
        };
        self.denoiser.total_steps(&sampling, &task)?;
        self.decode_all(&args.prompt, args.batch_size, &task, &sampling, noise)
    }

    fn img2img_sampling(&self, args: &Kd20Img2Img) -> Result<Kd20Sampling> {
        check_batch(args.batch_size)?;
        self.denoiser.check_task_name("image_to_image")?;
        let sampling = Kd20Sampling::new(args.sampler, args.num_steps, args.guidance_scale);
        self.denoiser.check_params(&sampling)?;
        Ok(sampling)
    }

    /// `generate_inpainting` on an already prepared init image (B or 1, 3, H, W) in [-1, 1]
    /// (H, W multiples of the VAE's scale factor; upstream: `prepare_image`'s 512×512) and the
    /// official KEEP mask `keep_mask` (1 or B, 1, H', W') at any resolution (1 = keep, 0 =
    /// repaint; see [`Kd20Task::Inpaint`]). Draws, in order: the posterior sample, the
    /// sampler's. The output is H × W. Inpainting model only (`task` otherwise).
    pub fn inpaint(
        &self,
        args: &Kd20InpaintArgs,
        image: &Tensor,
        keep_mask: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        self.inpaint_checks(args, keep_mask)?;
        let image = self.image_rows(image, args.batch_size)?;
        let latents = self.vae.encode(&image.to_dtype(self.vae.dtype())?, noise)?;
        self.inpaint_latents(args, &latents, keep_mask, noise)
    }

    /// [`Self::inpaint`] after the encoding: `latents` are the init image's posterior sample ×
    /// scale, `(batch_size, 4, h, w)`. Draws the sampler's.
    pub fn inpaint_latents(
        &self,
        args: &Kd20InpaintArgs,
        latents: &Tensor,
        keep_mask: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        self.inpaint_checks(args, keep_mask)?;
        let task = Kd20Task::Inpaint {
            latents: latents.clone(),
            keep_mask: keep_mask.clone(),
        };
        let sampling = args.sampling();
        self.denoiser.total_steps(&sampling, &task)?;
        self.decode_all(&args.prompt, args.batch_size, &task, &sampling, noise)
    }

    fn inpaint_checks(&self, args: &Kd20InpaintArgs, keep_mask: &Tensor) -> Result<()> {
        check_batch(args.batch_size)?;
        self.denoiser.check_task_name("inpaint")?;
        self.denoiser.check_params(&args.sampling())?;
        // The mask's shape, before any draw.
        check_keep_mask(keep_mask, args.batch_size)
    }

    /// The init image with `batch_size` rows (one row repeated), checked.
    fn image_rows(&self, image: &Tensor, b: usize) -> Result<Tensor> {
        let d = image.dims();
        if d.len() != 4 || (d[0] != 1 && d[0] != b) {
            return Err(ModelError::invalid(
                "image",
                format!("shape {d:?}; allowed (1 or batch_size ({b}), 3, H, W)"),
            ));
        }
        Ok(if d[0] == 1 && b > 1 {
            image.repeat((b, 1, 1, 1))?
        } else {
            image.clone()
        })
    }

    /// Samples and decodes without cropping; `process_images` on the result.
    fn decode_all(
        &self,
        prompt: &str,
        b: usize,
        task: &Kd20Task,
        sampling: &Kd20Sampling,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        let raw = self
            .sample_and_decode(prompt, b, task, sampling, noise)?
            .contiguous()?;
        let uint8 = process_images(&raw)?;
        Ok(Kd20Images { raw, uint8 })
    }

    /// `generate_img` up to the decode: the text rows `[prompt]·B + [""]·B` through both
    /// encoders in one batch (the official `encode_text`), [`Kd20Denoiser::sample`], the `B`
    /// rows decoded (f32, uncropped).
    fn sample_and_decode(
        &self,
        prompt: &str,
        b: usize,
        task: &Kd20Task,
        sampling: &Kd20Sampling,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut rows: Vec<&str> = vec![prompt; b];
        rows.extend(std::iter::repeat_n("", b));
        let enc = self.text.encode(&rows)?;
        let text = Kd20Text {
            full1: enc.full1,
            pooled1: enc.pooled1,
            full2: enc.full2,
        };
        let samples = self.denoiser.sample(
            &text,
            task,
            sampling,
            noise,
            &mut |_| Ok(()),
            &interrupt::never,
        )?;
        Ok(self
            .vae
            .decode(&samples.to_dtype(self.vae.dtype())?)?
            .to_dtype(DType::F32)?)
    }
}

/// `utils.py: process_images` up to the arrays: `((x + 1) · 127.5).round().clamp(0, 255)` as
/// `u8` (round half to even, as torch), NCHW → NHWC.
pub fn process_images(images: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let v: Vec<f32> = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1()?;
    let out: Vec<u8> = v
        .iter()
        .map(|&x| {
            let y = ((x + 1.0) * 127.5).round_ties_even();
            if y.is_nan() {
                0
            } else {
                y.clamp(0.0, 255.0) as u8
            }
        })
        .collect();
    Ok(Tensor::from_vec(out, (b, h, w, c), images.device())?)
}
