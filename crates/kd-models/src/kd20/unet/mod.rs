//! The Kandinsky 2.0 UNet: the official `kandinsky2/model/text2im_model.py: Text2ImUNet` (and
//! `InpaintText2ImUNet`) on guided-diffusion's `UNetModel` (`model/unet.py`), read from the
//! official plain state dict (`Kandinsky-2-0.pt`, `Kandinsky-2-0-inpainting.pt`) with its own key
//! names.
//!
//! ```text
//! emb    = time_embed(timestep_embedding(t, C)) + xf_proj
//! xf_proj = ln_model2(proj(pooled_emb1)) + ln_model3(proj2(full_emb2))      (proj2: AttentionPooling)
//! xf_out  = ln_model1(cat([to_model_dim(full_emb1), to_model_dim2(full_emb2)], tokens)) → NCL
//! h = input_blocks → middle_block → output_blocks (skip concat) → out (GN+SiLU, conv)
//! ```
//!
//! Official quirks kept: `pooled_emb2` is ignored (`get_text_emb` overwrites it with the pooled
//! mT5 states); `proj2` pools over every token of `full_emb2` and the attention blocks attend to
//! every text token (no mask anywhere); the text keys/values come before the image ones; the
//! official model caches the text embedding across calls (`cache_text_emb`): here the caller
//! computes it once with [`Text2ImUNet::text_embedding`] and passes it to
//! [`Text2ImUNet::forward_with_text_emb`]. The inpainting model concatenates
//! `[x, image * mask, mask]` (zeros when not given, as upstream).

pub mod blocks;
pub mod config;

pub use config::Kd20UnetConfig;

use crate::checkpoint::Weights;
use crate::conv::{conv2d, Conv2d};
use crate::error::{ModelError, Result};
use crate::interrupt::{check, Stop};
use crate::norm::{group_norm, GroupNorm};
use blocks::{AttentionBlock, AttentionPooling, ConvResample, ResBlock, Updown};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, linear, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use std::path::Path;

/// The text inputs of one forward pass (`Kandinsky2.encode_text` outputs).
#[derive(Debug, Clone, Copy)]
pub struct Kd20UnetText<'a> {
    /// M-CLIP token states (B, L1, text_encoder_in_dim1).
    pub full1: &'a Tensor,
    /// M-CLIP pooled output (B, text_encoder_in_dim2).
    pub pooled1: &'a Tensor,
    /// mT5 token states (B, L2, text_encoder2_dim).
    pub full2: &'a Tensor,
    /// Ignored, as by the official `get_text_emb` (mT5 has no pooled output).
    pub pooled2: Option<&'a Tensor>,
}

/// What `get_text_emb` returns (and the official model caches).
#[derive(Debug, Clone)]
pub struct Kd20TextEmb {
    /// (B, 4·C), added to the time embedding.
    pub xf_proj: Tensor,
    /// (B, model_dim, L1 + L2), the attention blocks' extra keys/values.
    pub xf_out: Tensor,
}

/// The inpainting model's extra inputs.
#[derive(Debug, Clone, Copy)]
pub struct Kd20Inpaint<'a> {
    /// (B, in_channels, H, W).
    pub image: &'a Tensor,
    /// (B, 1, H, W).
    pub mask: &'a Tensor,
}

/// Intermediates of [`Text2ImUNet::forward_traced`].
#[derive(Debug, Clone)]
pub struct Kd20UnetTrace {
    /// `time_embed(timestep_embedding(t))` (B, 4·C).
    pub time_emb: Tensor,
    /// time_emb + xf_proj.
    pub emb: Tensor,
    /// Output of every input block.
    pub input_blocks: Vec<Tensor>,
    /// Output of the middle block.
    pub middle: Tensor,
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(AttentionBlock),
    Resample(ConvResample),
}

impl Layer {
    fn forward(&self, h: &Tensor, emb: &Tensor, xf_out: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(h),
            Layer::Res(r) => r.forward(h, emb),
            Layer::Attn(a) => a.forward(h, xf_out),
            Layer::Resample(r) => r.forward(h),
        }
    }
}

type Block = Vec<Layer>;

fn run_block(
    block: &Block,
    h: &Tensor,
    emb: &Tensor,
    xf_out: &Tensor,
    stop: Stop,
) -> Result<Tensor> {
    let mut h = h.clone();
    for (i, layer) in block.iter().enumerate() {
        if i > 0 {
            check(stop, "kd20 unet layer")?;
        }
        h = layer.forward(&h, emb, xf_out)?;
    }
    Ok(h)
}

/// `Text2ImUNet` / `InpaintText2ImUNet` of Kandinsky 2.0.
#[derive(Debug, Clone)]
pub struct Text2ImUNet {
    cfg: Kd20UnetConfig,
    time_embed: (Linear, Linear),
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    to_model_dim: Linear,
    proj: Linear,
    proj2: AttentionPooling,
    to_model_dim2: Linear,
    ln_model1: LayerNorm,
    ln_model2: LayerNorm,
    ln_model3: LayerNorm,
    levels: usize,
    dtype: DType,
}

fn shape_err(field: &'static str, expected: String, got: &Tensor) -> ModelError {
    ModelError::invalid(
        field,
        format!("expected shape {expected}, got {:?}", got.dims()),
    )
}

impl Text2ImUNet {
    /// Reads the official state dict (`torch.save(state_dict)`) at `path`.
    pub fn load(path: &Path, cfg: &Kd20UnetConfig, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate(path)?;
        let weights = Weights::open_pickle(path, None)?;
        Self::new(cfg, weights.var_builder(dtype, device))
    }

    /// Builds the model from `vb` (official key names at its root).
    pub fn new(cfg: &Kd20UnetConfig, vb: VarBuilder) -> Result<Self> {
        let path = Path::new("<kd20 unet config>");
        cfg.validate(path)?;
        let mult = cfg.channel_mult(path)?;
        let attn_ds = cfg.attention_ds(path)?;
        let c = cfg.num_channels;
        let temb = 4 * c;
        let g = cfg.norm_num_groups;
        let ss = cfg.use_scale_shift_norm;
        let heads = |ch: usize, n: i64| -> usize {
            if cfg.num_head_channels > 0 {
                ch / cfg.num_head_channels as usize
            } else {
                n as usize
            }
        };
        let heads_up = if cfg.num_heads_upsample == -1 {
            cfg.num_heads
        } else {
            cfg.num_heads_upsample
        };
        let c3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let vbi = vb.pp("input_blocks");
        let mut ch = mult[0] * c;
        let input_ch = ch;
        let mut input_blocks: Vec<Block> = vec![vec![Layer::Conv(conv2d(
            cfg.model_in_channels(),
            ch,
            3,
            c3,
            vbi.pp("0").pp("0"),
        )?)]];
        let mut chans = vec![ch];
        let mut ds = 1;
        for (level, &m) in mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vbb = vbi.pp(input_blocks.len().to_string());
                let out = m * c;
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch,
                    temb,
                    out,
                    g,
                    ss,
                    Updown::None,
                    vbb.pp("0"),
                )?)];
                ch = out;
                if attn_ds.contains(&ds) {
                    layers.push(Layer::Attn(AttentionBlock::new(
                        ch,
                        heads(ch, cfg.num_heads),
                        cfg.model_dim,
                        g,
                        vbb.pp("1"),
                    )?));
                }
                input_blocks.push(layers);
                chans.push(ch);
            }
            if level + 1 != mult.len() {
                let vbb = vbi.pp(input_blocks.len().to_string());
                let layer = if cfg.resblock_updown {
                    Layer::Res(ResBlock::new(
                        ch,
                        temb,
                        ch,
                        g,
                        ss,
                        Updown::Down,
                        vbb.pp("0"),
                    )?)
                } else {
                    Layer::Resample(ConvResample::down(ch, vbb.pp("0"))?)
                };
                input_blocks.push(vec![layer]);
                chans.push(ch);
                ds *= 2;
            }
        }
        let vbm = vb.pp("middle_block");
        let middle_block = vec![
            Layer::Res(ResBlock::new(
                ch,
                temb,
                ch,
                g,
                ss,
                Updown::None,
                vbm.pp("0"),
            )?),
            Layer::Attn(AttentionBlock::new(
                ch,
                heads(ch, cfg.num_heads),
                cfg.model_dim,
                g,
                vbm.pp("1"),
            )?),
            Layer::Res(ResBlock::new(
                ch,
                temb,
                ch,
                g,
                ss,
                Updown::None,
                vbm.pp("2"),
            )?),
        ];
        let vbo = vb.pp("output_blocks");
        let mut output_blocks: Vec<Block> = Vec::new();
        for (level, &m) in mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let vbb = vbo.pp(output_blocks.len().to_string());
                let ich = chans.pop().expect("one skip per input block");
                let out = m * c;
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch + ich,
                    temb,
                    out,
                    g,
                    ss,
                    Updown::None,
                    vbb.pp("0"),
                )?)];
                ch = out;
                if attn_ds.contains(&ds) {
                    layers.push(Layer::Attn(AttentionBlock::new(
                        ch,
                        heads(ch, heads_up),
                        cfg.model_dim,
                        g,
                        vbb.pp("1"),
                    )?));
                }
                if level > 0 && i == cfg.num_res_blocks {
                    let key = layers.len().to_string();
                    layers.push(if cfg.resblock_updown {
                        Layer::Res(ResBlock::new(ch, temb, ch, g, ss, Updown::Up, vbb.pp(key))?)
                    } else {
                        Layer::Resample(ConvResample::up(ch, vbb.pp(key))?)
                    });
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }
        let d2 = cfg.text_encoder2_dim;
        Ok(Self {
            cfg: cfg.clone(),
            time_embed: (
                linear(c, temb, vb.pp("time_embed.0"))?,
                linear(temb, temb, vb.pp("time_embed.2"))?,
            ),
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: group_norm(g, ch, 1e-5, vb.pp("out.0"))?,
            out_conv: conv2d(input_ch, cfg.out_channels, 3, c3, vb.pp("out.2"))?,
            to_model_dim: linear(
                cfg.text_encoder_in_dim1,
                cfg.model_dim,
                vb.pp("to_model_dim"),
            )?,
            proj: linear(cfg.text_encoder_in_dim2, temb, vb.pp("proj"))?,
            proj2: AttentionPooling::new(8, d2, temb, vb.pp("proj2"))?,
            to_model_dim2: linear(d2, cfg.model_dim, vb.pp("to_model_dim2"))?,
            ln_model1: layer_norm(cfg.model_dim, 1e-5, vb.pp("ln_model1"))?,
            ln_model2: layer_norm(temb, 1e-5, vb.pp("ln_model2"))?,
            ln_model3: layer_norm(temb, 1e-5, vb.pp("ln_model3"))?,
            levels: mult.len(),
            dtype: vb.dtype(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Kd20UnetConfig {
        &self.cfg
    }

    /// Spatial sizes must be multiples of this.
    pub fn latent_multiple(&self) -> usize {
        1 << (self.levels - 1)
    }

    /// `get_text_emb` (no cache): validates the text inputs against each other.
    pub fn text_embedding(&self, text: &Kd20UnetText) -> Result<Kd20TextEmb> {
        let cfg = &self.cfg;
        let (b, _l1, d1) = text.full1.dims3().map_err(|_| {
            shape_err(
                "full_emb1",
                format!("(B, L1, {})", cfg.text_encoder_in_dim1),
                text.full1,
            )
        })?;
        if d1 != cfg.text_encoder_in_dim1 || text.full1.dim(1)? == 0 {
            return Err(shape_err(
                "full_emb1",
                format!("(B, L1 > 0, {})", cfg.text_encoder_in_dim1),
                text.full1,
            ));
        }
        if text.pooled1.dims() != [b, cfg.text_encoder_in_dim2] {
            return Err(shape_err(
                "pooled_emb1",
                format!("({b}, {})", cfg.text_encoder_in_dim2),
                text.pooled1,
            ));
        }
        let f2 = text.full2.dims();
        if f2.len() != 3 || f2[0] != b || f2[1] == 0 || f2[2] != cfg.text_encoder2_dim {
            return Err(shape_err(
                "full_emb2",
                format!("({b}, L2 > 0, {})", cfg.text_encoder2_dim),
                text.full2,
            ));
        }
        let dt = self.dtype;
        let full1 = text.full1.to_dtype(dt)?;
        let full2 = text.full2.to_dtype(dt)?;
        let xf_proj = self
            .ln_model2
            .forward(&self.proj.forward(&text.pooled1.to_dtype(dt)?)?)?;
        let pooled2 = self.ln_model3.forward(&self.proj2.forward(&full2)?)?;
        let xf_proj = (xf_proj + pooled2)?;
        let tokens = Tensor::cat(
            &[
                self.to_model_dim.forward(&full1)?,
                self.to_model_dim2.forward(&full2)?,
            ],
            1,
        )?;
        let xf_out = self
            .ln_model1
            .forward(&tokens)?
            .transpose(1, 2)?
            .contiguous()?;
        Ok(Kd20TextEmb { xf_proj, xf_out })
    }

    /// `time_embed(timestep_embedding(t, C))`; `t` (B,) any float or integer dtype.
    pub fn time_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let c = self.cfg.num_channels;
        let half = c / 2;
        let device = t.device();
        let t = t.to_dtype(DType::F32)?;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let mut parts = vec![args.cos()?, args.sin()?];
        if c % 2 == 1 {
            parts.push(Tensor::zeros((t.dim(0)?, 1), DType::F32, device)?);
        }
        let e = Tensor::cat(&parts, 1)?.to_dtype(self.dtype)?;
        let e = self.time_embed.0.forward(&e)?;
        Ok(self.time_embed.1.forward(&candle_nn::ops::silu(&e)?)?)
    }

    /// The forward pass (inpainting model: zero image and mask, as upstream); output f32
    /// (B, out_channels, H, W).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Kd20UnetText,
        stop: Stop,
    ) -> Result<Tensor> {
        let emb = self.text_embedding(text)?;
        self.forward_with_text_emb(x, t, &emb, None, stop)
    }

    /// [`Self::forward`] with the inpainting inputs (refused by a non-inpainting model).
    pub fn forward_inpaint(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Kd20UnetText,
        inpaint: Kd20Inpaint,
        stop: Stop,
    ) -> Result<Tensor> {
        let emb = self.text_embedding(text)?;
        self.forward_with_text_emb(x, t, &emb, Some(inpaint), stop)
    }

    /// The forward pass on a precomputed [`Kd20TextEmb`] (what the official cache holds).
    pub fn forward_with_text_emb(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Kd20TextEmb,
        inpaint: Option<Kd20Inpaint>,
        stop: Stop,
    ) -> Result<Tensor> {
        Ok(self.run(x, t, text, inpaint, stop, false)?.0)
    }

    /// [`Self::forward`] with intermediates.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Kd20UnetText,
        inpaint: Option<Kd20Inpaint>,
        stop: Stop,
    ) -> Result<(Tensor, Kd20UnetTrace)> {
        let emb = self.text_embedding(text)?;
        let (out, trace) = self.run(x, t, &emb, inpaint, stop, true)?;
        Ok((out, trace.expect("traced")))
    }

    fn prepare_input(&self, x: &Tensor, inpaint: Option<Kd20Inpaint>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let m = self.latent_multiple();
        let dims = x.dims();
        if dims.len() != 4
            || dims[1] != cfg.in_channels
            || dims[0] == 0
            || dims[2] == 0
            || dims[3] == 0
            || !dims[2].is_multiple_of(m)
            || !dims[3].is_multiple_of(m)
        {
            return Err(shape_err(
                "x",
                format!(
                    "(B, {}, H, W) with H, W positive multiples of {m}",
                    cfg.in_channels
                ),
                x,
            ));
        }
        let (b, _, h, w) = x.dims4()?;
        let x = x.to_dtype(self.dtype)?;
        if !cfg.inpainting {
            if inpaint.is_some() {
                return Err(ModelError::invalid(
                    "inpaint",
                    "this model is not an inpainting model",
                ));
            }
            return Ok(x);
        }
        let (image, mask) = match inpaint {
            Some(p) => {
                if p.image.dims() != [b, cfg.in_channels, h, w] {
                    return Err(shape_err(
                        "inpaint_image",
                        format!("({b}, {}, {h}, {w})", cfg.in_channels),
                        p.image,
                    ));
                }
                if p.mask.dims() != [b, 1, h, w] {
                    return Err(shape_err(
                        "inpaint_mask",
                        format!("({b}, 1, {h}, {w})"),
                        p.mask,
                    ));
                }
                let mask = p.mask.to_dtype(self.dtype)?;
                (p.image.to_dtype(self.dtype)?.broadcast_mul(&mask)?, mask)
            }
            None => (
                x.zeros_like()?,
                Tensor::zeros((b, 1, h, w), self.dtype, x.device())?,
            ),
        };
        Ok(Tensor::cat(&[&x, &image, &mask], 1)?)
    }

    fn run(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Kd20TextEmb,
        inpaint: Option<Kd20Inpaint>,
        stop: Stop,
        traced: bool,
    ) -> Result<(Tensor, Option<Kd20UnetTrace>)> {
        let h0 = self.prepare_input(x, inpaint)?;
        let b = h0.dim(0)?;
        if t.dims() != [b] {
            return Err(shape_err("timesteps", format!("({b},)"), t));
        }
        let temb = 4 * self.cfg.num_channels;
        if text.xf_proj.dims() != [b, temb] {
            return Err(shape_err(
                "text_emb.xf_proj",
                format!("({b}, {temb})"),
                &text.xf_proj,
            ));
        }
        let xd = text.xf_out.dims();
        if xd.len() != 3 || xd[0] != b || xd[1] != self.cfg.model_dim {
            return Err(shape_err(
                "text_emb.xf_out",
                format!("({b}, {}, L)", self.cfg.model_dim),
                &text.xf_out,
            ));
        }
        let time_emb = self.time_embedding(t)?;
        let emb = (&time_emb + text.xf_proj.to_dtype(self.dtype)?)?;
        let xf_out = text.xf_out.to_dtype(self.dtype)?;
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = h0;
        for block in &self.input_blocks {
            check(stop, "kd20 unet input block")?;
            h = run_block(block, &h, &emb, &xf_out, stop)?;
            hs.push(h.clone());
        }
        check(stop, "kd20 unet middle block")?;
        h = run_block(&self.middle_block, &h, &emb, &xf_out, stop)?;
        let middle = h.clone();
        let trace = traced.then(|| Kd20UnetTrace {
            time_emb: time_emb.clone(),
            emb: emb.clone(),
            input_blocks: hs.clone(),
            middle,
        });
        for block in &self.output_blocks {
            check(stop, "kd20 unet output block")?;
            let skip = hs.pop().expect("one skip per output block");
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = run_block(block, &h, &emb, &xf_out, stop)?;
        }
        let h = self.out_norm.forward_silu(&h)?;
        let out = self.out_conv.forward(&h)?.to_dtype(DType::F32)?;
        Ok((out, trace))
    }
}
