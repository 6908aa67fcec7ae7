//! The Kandinsky 2.0 text-to-image pipeline: `kandinsky2_model.py: Kandinsky2` built from the
//! official checkpoint folder and `generate_text2img` → `generate_img` run as upstream runs them.
//!
//! Layout read by [`Kd20Pipeline::load`] (the hub repo `sberbank-ai/Kandinsky_2.0`):
//! `Kandinsky-2-0.pt` (the `Text2ImUNet` state dict), `vae.ckpt` (`{"state_dict": ...}`),
//! `text_encoder1/`, `text_encoder2/`. Two optional sidecars override the built-in
//! `CONFIG_2_0` values (upstream has none; the tiny test checkpoints need them):
//! `unet.json` ([`Kd20UnetConfig`], `model_config` keys + `norm_num_groups`,
//! `text_encoder2_dim`) and `vae.json` ([`KlConfig`], the `image_enc_params` entry).
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

use super::text::Kd20TextEncoders;
use super::unet::{Kd20UnetConfig, Kd20UnetText, Text2ImUNet};
use crate::error::{ModelError, Result};
use crate::interrupt;
use crate::kl::{AutoencoderKl, KlConfig};
use crate::noise::NoiseSource;
use crate::schedulers::guided::{
    img2img_start, pipeline_diffusion, DiffusionConfig, GaussianDiffusion, GenerateImg, SamplerKind,
};
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

/// The pipeline's output.
#[derive(Debug, Clone)]
pub struct Kd20Images {
    /// The decoded, cropped images (B, 3, h, w), f32, unclamped (what `process_images` gets).
    pub raw: Tensor,
    /// `process_images`' arrays: (B, h, w, 3) `u8`.
    pub uint8: Tensor,
}

/// Kandinsky 2.0: both text encoders, the `Text2ImUNet` and the `AutoencoderKL`.
pub struct Kd20Pipeline {
    text: Kd20TextEncoders,
    unet: Text2ImUNet,
    vae: AutoencoderKl,
    diffusion: DiffusionConfig,
    device: Device,
}

impl Kd20Pipeline {
    /// Loads the official folder `dir` (see the module docs) in `dtype` on `device`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message: "missing: a Kandinsky 2.0 checkpoint folder".into(),
            });
        }
        let text = Kd20TextEncoders::load(dir, dtype, device)?;
        let unet_cfg = match dir.join("unet.json") {
            p if p.is_file() => Kd20UnetConfig::from_file(&p)?,
            _ => Kd20UnetConfig::default(),
        };
        if unet_cfg.inpainting {
            return Err(ModelError::invalid(
                "unet.json",
                "inpainting: true; the text-to-image pipeline needs the text2img model",
            ));
        }
        let unet = Text2ImUNet::load(&dir.join(KD20_UNET_FILE), &unet_cfg, dtype, device)?;
        let vae_cfg = match dir.join("vae.json") {
            p if p.is_file() => KlConfig::from_file(&p)?,
            _ => KlConfig::kandinsky_2_0(),
        };
        let vae = AutoencoderKl::load(&dir.join(KD20_VAE_FILE), &vae_cfg, dtype, device)?;
        Ok(Self {
            text,
            unet,
            vae,
            diffusion: DiffusionConfig::kandinsky_2_0(),
            device: device.clone(),
        })
    }

    pub fn text_encoders(&self) -> &Kd20TextEncoders {
        &self.text
    }

    pub fn unet(&self) -> &Text2ImUNet {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKl {
        &self.vae
    }

    /// `CONFIG_2_0["diffusion_config"]`.
    pub fn diffusion_config(&self) -> &DiffusionConfig {
        &self.diffusion
    }

    /// `get_new_h_w`: the latent size for an `h × w` request (`⌈h/64⌉·8`, `⌈w/64⌉·8`).
    pub fn latent_size(height: usize, width: usize) -> (usize, usize) {
        (height.div_ceil(64) * 8, width.div_ceil(64) * 8)
    }

    /// `generate_text2img`: every Gaussian draw comes from `noise`, in the official order.
    pub fn text2img(&self, args: &Kd20Text2Img, noise: &mut dyn NoiseSource) -> Result<Kd20Images> {
        args.validate()?;
        let diffusion = pipeline_diffusion(&self.diffusion, args.sampler, args.num_steps)?;
        let (lh, lw) = Self::latent_size(args.height, args.width);
        let gen = GenerateImg {
            num_steps: args.num_steps,
            guidance_scale: args.guidance_scale,
            ..GenerateImg::new(args.sampler, args.batch_size)
        };
        let decoded =
            self.sample_and_decode(&args.prompt, &gen, &diffusion, (lh, lw), None, noise)?;
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
    /// output is H × W.
    pub fn img2img(
        &self,
        args: &Kd20Img2Img,
        image: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Kd20Images> {
        Kd20Text2Img {
            prompt: args.prompt.clone(),
            batch_size: args.batch_size,
            num_steps: args.num_steps,
            guidance_scale: args.guidance_scale,
            height: 1,
            width: 1,
            sampler: args.sampler,
        }
        .validate()?;
        let (rows, _, _, _) = image.dims4()?;
        let b = args.batch_size;
        if rows != 1 && rows != b {
            return Err(ModelError::invalid(
                "image",
                format!("{rows} rows; allowed 1 or batch_size ({b})"),
            ));
        }
        let diffusion = pipeline_diffusion(&self.diffusion, args.sampler, args.num_steps)?;
        // Checked before any draw (img2img_start checks it again).
        diffusion.img2img_start_step(args.strength)?;
        let image = if rows == 1 && b > 1 {
            image.repeat((b, 1, 1, 1))?
        } else {
            image.clone()
        };
        let latents = self.vae.encode(&image.to_dtype(self.vae.dtype())?, noise)?;
        let start = img2img_start(&diffusion, &latents, args.strength, noise)?;
        let (_, _, lh, lw) = latents.dims4()?;
        let gen = GenerateImg {
            num_steps: args.num_steps,
            guidance_scale: args.guidance_scale,
            init_step: Some(start.init_step),
            ..GenerateImg::new(args.sampler, b)
        };
        let raw = self
            .sample_and_decode(
                &args.prompt,
                &gen,
                &diffusion,
                (lh, lw),
                Some(&start.x_t),
                noise,
            )?
            .contiguous()?;
        let uint8 = process_images(&raw)?;
        Ok(Kd20Images { raw, uint8 })
    }

    /// `generate_img` up to the decode: text conditioning, guided sampling of `(2B, C, lh, lw)`
    /// latents (from `x_t` when given), the first `B` rows decoded (f32, uncropped).
    fn sample_and_decode(
        &self,
        prompt: &str,
        gen: &GenerateImg,
        diffusion: &GaussianDiffusion,
        (lh, lw): (usize, usize),
        x_t: Option<&Tensor>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let b = gen.batch_size;
        // encode_text: [prompt] * B + [""] * B (cond rows first).
        let mut rows: Vec<&str> = vec![prompt; b];
        rows.extend(std::iter::repeat_n("", b));
        let cond = self.text.encode(&rows)?;
        let emb = self.unet.text_embedding(&Kd20UnetText {
            full1: &cond.full1,
            pooled1: &cond.pooled1,
            full2: &cond.full2,
            pooled2: None,
        })?;
        let unet = &self.unet;
        let mut model = |x: &Tensor, t: &Tensor| {
            unet.forward_with_text_emb(x, t, &emb, None, &interrupt::never)
        };
        let c = self.unet.config().in_channels;
        let samples = gen.run(
            diffusion,
            [c, lh, lw],
            x_t,
            None,
            &mut model,
            noise,
            &self.device,
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
