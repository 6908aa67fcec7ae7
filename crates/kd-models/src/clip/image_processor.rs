//! CLIP image preprocessing as transformers 5 `CLIPImageProcessor` (PIL backend) does it:
//! convert to RGB (alpha composited onto opaque white), resize the shortest edge with PIL's
//! bicubic filter on uint8 (a port of Pillow's `Resample.c`: separable, antialiased when
//! downscaling, 22-bit fixed-point coefficients, horizontal pass first), centre crop, rescale
//! (`u8 · factor` in f64, then f32) and normalise per channel in f32.

use crate::config::{ClipImageProcessorConfig, ImageSize};
use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

#[derive(Debug, Clone, Copy)]
enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel (first input index,
/// fixed-point weights).
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.eval((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow `Image.resize((w, h), resample)` for an RGB image.
fn resize(img: &RgbImage, w: usize, h: usize, filter: Filter) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut cur: Vec<u8> = src.clone();
    let mut cur_w = iw;
    let vert = coefficients(ih, h, filter);
    // Horizontal pass over only the rows the vertical pass reads (as Pillow does).
    let (y_first, y_last) = (
        vert.first().map_or(0, |c| c.0),
        vert.last().map_or(ih, |c| c.0 + c.1.len()),
    );
    let mut y_offset = 0;
    if w != iw {
        let horiz = coefficients(iw, w, filter);
        let n_rows = y_last - y_first;
        let mut out = vec![0u8; n_rows * w * 3];
        for y in 0..n_rows {
            let row = &src[(y + y_first) * iw * 3..(y + y_first + 1) * iw * 3];
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = out;
        cur_w = w;
        y_offset = y_first;
    }
    if h != ih {
        let mut out = vec![0u8; h * cur_w * 3];
        for (yy, (ymin, k)) in vert.iter().enumerate() {
            for x in 0..cur_w {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        let y = ymin + i - y_offset;
                        ss += cur[(y * cur_w + x) * 3 + c] as i64 * kv as i64;
                    }
                    out[(yy * cur_w + x) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = out;
    }
    RgbImage::from_raw(w as u32, h as u32, cur).expect("buffer size matches")
}

/// transformers 5 `convert_to_rgb`: RGB as is; anything else via RGBA alpha-composited onto opaque
/// white with Pillow's integer `alpha_composite`.
pub fn convert_to_rgb(img: &DynamicImage) -> RgbImage {
    if let DynamicImage::ImageRgb8(rgb) = img {
        return rgb.clone();
    }
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    const P: u32 = 7;
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0.map(u32::from);
        if a == 0 {
            o.0 = [255, 255, 255];
            continue;
        }
        // dst = opaque white: blend = 255·(255 − a).
        let blend = 255 * (255 - a);
        let outa255 = a * 255 + blend;
        let coef1 = a * 255 * 255 * (1 << P) / outa255;
        let coef2 = 255 * (1 << P) - coef1;
        let ch = |s: u32| (shift_div255(s * coef1 + 255 * coef2 + (0x80 << P)) >> P) as u8;
        o.0 = [ch(r), ch(g), ch(b)];
    }
    out
}

/// Decodes PNG, JPEG or WebP bytes.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| {
        ModelError::invalid(
            "image",
            format!("cannot decode ({e}); supported formats: PNG, JPEG, WebP"),
        )
    })
}

/// `CLIPImageProcessor`.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    cfg: ClipImageProcessorConfig,
}

impl ClipImageProcessor {
    /// From a validated `preprocessor_config.json`.
    pub fn new(cfg: &ClipImageProcessorConfig) -> Self {
        Self { cfg: cfg.clone() }
    }

    fn filter(&self) -> Filter {
        if self.cfg.resample == 2 {
            Filter::Bilinear
        } else {
            Filter::Bicubic
        }
    }

    /// Output (height, width) of `do_resize` for an input of (height, width).
    pub fn resized_hw(&self, h: usize, w: usize) -> (usize, usize) {
        match self.cfg.size {
            ImageSize::Int(s) | ImageSize::ShortestEdge { shortest_edge: s } => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as usize;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
            ImageSize::HeightWidth { height, width } => (height, width),
        }
    }

    fn crop_hw(&self) -> (usize, usize) {
        match self.cfg.crop_size {
            ImageSize::Int(s) | ImageSize::ShortestEdge { shortest_edge: s } => (s, s),
            ImageSize::HeightWidth { height, width } => (height, width),
        }
    }

    /// Convert to RGB, resize and centre crop: the uint8 image the model sees.
    pub fn resize_and_crop(&self, img: &DynamicImage) -> Result<RgbImage> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(ModelError::invalid("image", "is empty (0 pixels)"));
        }
        let mut rgb = if self.cfg.do_convert_rgb {
            convert_to_rgb(img)
        } else {
            img.to_rgb8()
        };
        if self.cfg.do_resize {
            let (rh, rw) = self.resized_hw(h, w);
            if rh == 0 || rw == 0 {
                return Err(ModelError::invalid(
                    "image",
                    format!("{w}×{h} is too elongated to resize"),
                ));
            }
            if (rh, rw) != (h, w) {
                rgb = resize(&rgb, rw, rh, self.filter());
            }
        }
        if self.cfg.do_center_crop {
            rgb = center_crop(&rgb, self.crop_hw());
        }
        Ok(rgb)
    }

    /// `pixel_values` (1, 3, H, W) f32 for one image.
    pub fn preprocess(&self, img: &DynamicImage, device: &Device) -> Result<Tensor> {
        let rgb = self.resize_and_crop(img)?;
        self.normalize(&rgb, device)
    }

    /// Rescale and normalise a uint8 RGB image to (1, 3, H, W) f32.
    pub fn normalize(&self, rgb: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        let raw = rgb.as_raw();
        for c in 0..3 {
            let mean = self.cfg.image_mean[c] as f32;
            let std = self.cfg.image_std[c] as f32;
            for i in 0..h * w {
                let mut x = raw[i * 3 + c] as f64;
                if self.cfg.do_rescale {
                    x *= self.cfg.rescale_factor;
                }
                let mut x = x as f32;
                if self.cfg.do_normalize {
                    x = (x - mean) / std;
                }
                data[c * h * w + i] = x;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
    }
}

/// transformers `center_crop`: offset `(size − crop) // 2`, zero padding when the crop is larger.
fn center_crop(img: &RgbImage, (ch, cw): (usize, usize)) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ch, cw) = (ch as i64, cw as i64);
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    let mut out = RgbImage::new(cw as u32, ch as u32);
    for y in 0..ch {
        for x in 0..cw {
            let (sy, sx) = (y + top, x + left);
            if (0..h).contains(&sy) && (0..w).contains(&sx) {
                out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}
