//! Serving the original latent-diffusion key names of `vae.ckpt` to the diffusers-named MoVQ
//! blocks ([`crate::movq::Encoder`] / [`crate::movq::Decoder`] with group norms), the mapping
//! diffusers' `convert_ldm_vae_checkpoint` applies:
//!
//! | diffusers (what the blocks ask for)                         | latent diffusion (`vae.ckpt`)           |
//! |-------------------------------------------------------------|-----------------------------------------|
//! | `encoder.down_blocks.{i}.resnets.{j}.*`                     | `encoder.down.{i}.block.{j}.*`          |
//! | `….attentions.{j}.*`                                        | `….attn.{j}.*`                          |
//! | `encoder.down_blocks.{i}.downsamplers.0.conv`               | `encoder.down.{i}.downsample.conv`      |
//! | `{en,de}coder.mid_block.resnets.{0,1}`                      | `{en,de}coder.mid.block_{1,2}`          |
//! | `{en,de}coder.mid_block.attentions.0`                       | `{en,de}coder.mid.attn_1`               |
//! | `decoder.up_blocks.{k}.*` (k = 0: lowest resolution)        | `decoder.up.{levels − 1 − k}.*`         |
//! | `decoder.up_blocks.{k}.upsamplers.0.conv`                   | `decoder.up.{levels − 1 − k}.upsample.conv` |
//! | `conv_shortcut`                                             | `nin_shortcut` (1×1)                    |
//! | `conv_norm_out`                                             | `norm_out`                              |
//! | attention `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`  | `norm`, `q`, `k`, `v`, `proj_out`       |
//!
//! Attention projections are 1×1 convolutions upstream, (C, C, 1, 1), and `Linear`s in the
//! blocks, (C, C): those weights are loaded (shape-checked) as 4-D and reshaped. Lookups go
//! through [`Weights::load`], so a missing or misshapen tensor is reported with its upstream
//! key, the file and the expected upstream shape.

use crate::checkpoint::Weights;
use crate::error::ModelError;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// A [`SimpleBackend`] that renames diffusers keys to latent-diffusion ones.
pub(crate) struct LdmNames {
    weights: Weights,
    /// Resolution levels (`len(ch_mult)`), to reverse the decoder's up-block order.
    levels: usize,
}

impl LdmNames {
    pub(crate) fn new(weights: Weights, levels: usize) -> Self {
        Self { weights, levels }
    }
}

/// The latent-diffusion key of a diffusers key, and whether it is an attention projection
/// weight (a 1×1 conv upstream, a linear here).
pub(crate) fn ldm_key(name: &str, levels: usize) -> (String, bool) {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len());
    let mut in_attention = false;
    let mut projection = false;
    let mut i = 0;
    while i < parts.len() {
        let next = parts.get(i + 1).copied();
        match (parts[i], next) {
            ("down_blocks", Some(n)) => {
                out.extend(["down".into(), n.into()]);
                i += 2;
            }
            ("up_blocks", Some(n)) => {
                let k = n.parse::<usize>().ok().filter(|&k| k < levels);
                match k {
                    Some(k) => out.extend(["up".into(), (levels - 1 - k).to_string()]),
                    // Out of range: keep a name that cannot exist, so the lookup fails by name.
                    None => out.extend(["up_blocks".into(), n.into()]),
                }
                i += 2;
            }
            ("mid_block", Some(kind)) => {
                let j = parts.get(i + 2).and_then(|n| n.parse::<usize>().ok());
                match (kind, j) {
                    ("resnets", Some(j)) => {
                        out.extend(["mid".into(), format!("block_{}", j + 1)]);
                    }
                    ("attentions", Some(j)) => {
                        out.extend(["mid".into(), format!("attn_{}", j + 1)]);
                        in_attention = true;
                    }
                    _ => out.extend(["mid_block".into(), kind.into()]),
                }
                i += 3;
            }
            ("resnets", _) => {
                out.push("block".into());
                i += 1;
            }
            ("attentions", _) => {
                out.push("attn".into());
                in_attention = true;
                i += 1;
            }
            ("downsamplers", Some("0")) => {
                out.push("downsample".into());
                i += 2;
            }
            ("upsamplers", Some("0")) => {
                out.push("upsample".into());
                i += 2;
            }
            ("conv_shortcut", _) => {
                out.push("nin_shortcut".into());
                i += 1;
            }
            ("conv_norm_out", _) => {
                out.push("norm_out".into());
                i += 1;
            }
            ("group_norm", _) if in_attention => {
                out.push("norm".into());
                i += 1;
            }
            (p @ ("to_q" | "to_k" | "to_v"), _) if in_attention => {
                out.push(p[3..].into());
                projection = parts.get(i + 1) == Some(&"weight");
                i += 1;
            }
            ("to_out", Some("0")) if in_attention => {
                out.push("proj_out".into());
                projection = parts.get(i + 2) == Some(&"weight");
                i += 2;
            }
            (p, _) => {
                out.push(p.into());
                i += 1;
            }
        }
    }
    (out.join("."), projection)
}

impl SimpleBackend for LdmNames {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (key, projection) = ldm_key(name, self.levels);
        match (projection, s.dims()) {
            (true, &[o, i]) => self
                .weights
                .load(&key, &[o, i, 1, 1], dtype, dev)
                .and_then(|t| Ok(t.reshape((o, i))?)),
            _ => self.weights.load(&key, s.dims(), dtype, dev),
        }
        .map_err(ModelError::into_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (key, projection) = ldm_key(name, self.levels);
        let t = self
            .weights
            .load_unchecked(&key, dtype, dev)
            .map_err(ModelError::into_candle)?;
        match (projection, t.dims()) {
            (true, &[o, i, 1, 1]) => t.reshape((o, i)),
            _ => Ok(t),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.info(&ldm_key(name, self.levels).0).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::ldm_key;

    #[test]
    fn diffusers_names_map_to_latent_diffusion_ones() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight", false),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
                false,
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
                false,
            ),
            (
                "encoder.down_blocks.2.attentions.1.group_norm.weight",
                "encoder.down.2.attn.1.norm.weight",
                false,
            ),
            (
                "encoder.mid_block.resnets.1.norm2.bias",
                "encoder.mid.block_2.norm2.bias",
                false,
            ),
            (
                "encoder.mid_block.attentions.0.to_q.weight",
                "encoder.mid.attn_1.q.weight",
                true,
            ),
            (
                "decoder.mid_block.attentions.0.to_v.bias",
                "decoder.mid.attn_1.v.bias",
                false,
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
                true,
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
                false,
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
                false,
            ),
            (
                "decoder.up_blocks.3.attentions.0.to_k.weight",
                "decoder.up.0.attn.0.k.weight",
                true,
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias", false),
            ("decoder.conv_out.weight", "decoder.conv_out.weight", false),
            ("quant_conv.weight", "quant_conv.weight", false),
            ("post_quant_conv.bias", "post_quant_conv.bias", false),
            // Outside the attention blocks the names are not attention ones.
            (
                "encoder.down_blocks.0.resnets.0.norm1.weight",
                "encoder.down.0.block.0.norm1.weight",
                false,
            ),
        ];
        for (diffusers, ldm, projection) in cases {
            assert_eq!(
                ldm_key(diffusers, 4),
                (ldm.to_string(), projection),
                "{diffusers}"
            );
        }
    }
}
