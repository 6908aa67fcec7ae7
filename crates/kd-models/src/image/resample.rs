//! Pillow-exact resizing of 8-bit images, as diffusers' Kandinsky pipelines call it:
//! `Image.resize(size, BICUBIC, reducing_gap=1)` for images and `Image.resize(size, LANCZOS)` for
//! masks, plus `convert("L")`.
//!
//! Re-implements Pillow's `libImaging/Resample.c` (separable convolution, horizontal pass first,
//! coefficients rounded to 22-bit fixed point, each pass clipped to u8) and `Reduce.c` (the
//! integer box-average that `reducing_gap` applies first, with its reciprocal-multiply rounding
//! and partial edge blocks), so that the bytes match Pillow 13.

use crate::error::{ModelError, Result};

/// The resampling filters used by the pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Keys' cubic convolution, a = −0.5, support 2 (`Image.BICUBIC`).
    Bicubic,
    /// Lanczos-3 windowed sinc, support 3 (`Image.LANCZOS`).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// An interleaved 8-bit image: `h` rows of `w` pixels of `c` channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// Width in pixels.
    pub w: usize,
    /// Height in pixels.
    pub h: usize,
    /// Channels per pixel (1 = L, 3 = RGB).
    pub c: usize,
    /// Row-major HWC bytes.
    pub data: Vec<u8>,
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first source index, number of taps; and the fixed-point taps.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn horizontal(src: &Pixels, rows: std::ops::Range<usize>, out_w: usize, co: &Coeffs) -> Pixels {
    let c = src.c;
    let out_h = rows.len();
    let mut data = vec![0u8; out_w * out_h * c];
    for (oy, y) in rows.enumerate() {
        let line = &src.data[y * src.w * c..(y + 1) * src.w * c];
        for xx in 0..out_w {
            let (xmin, n) = co.bounds[xx];
            let k = &co.kk[xx * co.ksize..xx * co.ksize + n];
            for ch in 0..c {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (x, &kx) in k.iter().enumerate() {
                    ss = ss.wrapping_add(line[(x + xmin) * c + ch] as i32 * kx);
                }
                data[(oy * out_w + xx) * c + ch] = clip8(ss);
            }
        }
    }
    Pixels {
        w: out_w,
        h: out_h,
        c,
        data,
    }
}

fn vertical(src: &Pixels, out_h: usize, co: &Coeffs, shift: usize) -> Pixels {
    let (w, c) = (src.w, src.c);
    let mut data = vec![0u8; w * out_h * c];
    for yy in 0..out_h {
        let (ymin, n) = co.bounds[yy];
        let ymin = ymin - shift;
        let k = &co.kk[yy * co.ksize..yy * co.ksize + n];
        for i in 0..w * c {
            let mut ss: i32 = 1 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss = ss.wrapping_add(src.data[(y + ymin) * w * c + i] as i32 * ky);
            }
            data[yy * w * c + i] = clip8(ss);
        }
    }
    Pixels {
        w,
        h: out_h,
        c,
        data,
    }
}

/// Pillow `ImagingResample` over the source box `[x0, y0, x1, y1]` (f32, as Pillow passes it).
fn resample(src: &Pixels, out_w: usize, out_h: usize, filter: Filter, b: [f32; 4]) -> Pixels {
    let need_h = out_w != src.w || b[0] != 0.0 || b[2] != out_w as f32;
    let need_v = out_h != src.h || b[1] != 0.0 || b[3] != out_h as f32;
    let ch = precompute(src.w, b[0], b[2], out_w, filter);
    let cv = precompute(src.h, b[1], b[3], out_h, filter);
    let first = cv.bounds[0].0;
    let (lmin, ln) = cv.bounds[out_h - 1];
    let last = lmin + ln;
    match (need_h, need_v) {
        (true, true) => {
            let tmp = horizontal(src, first..last, out_w, &ch);
            vertical(&tmp, out_h, &cv, first)
        }
        (true, false) => horizontal(src, 0..src.h, out_w, &ch),
        (false, true) => vertical(src, out_h, &cv, 0),
        (false, false) => src.clone(),
    }
}

/// Pillow `Image.reduce((fx, fy))` over the whole image: box averages, output size
/// `ceil(w / fx) × ceil(h / fy)`; partial edge blocks average what they cover.
fn reduce(src: &Pixels, fx: usize, fy: usize) -> Pixels {
    let (w, h, c) = (src.w, src.h, src.c);
    let ow = w.div_ceil(fx);
    let oh = h.div_ceil(fy);
    let mut data = vec![0u8; ow * oh * c];
    for oy in 0..oh {
        let y0 = oy * fy;
        let y1 = (y0 + fy).min(h);
        for ox in 0..ow {
            let x0 = ox * fx;
            let x1 = (x0 + fx).min(w);
            let n = ((y1 - y0) * (x1 - x0)) as u32;
            // `division_UINT32(n, 8)`: 2^32 / (256 n) in f32, truncated.
            let multiplier = (4_294_967_296.0f32 / (256 * n) as f32) as u32;
            for ch in 0..c {
                let mut ss = n / 2;
                for y in y0..y1 {
                    for x in x0..x1 {
                        ss += src.data[(y * w + x) * c + ch] as u32;
                    }
                }
                data[(oy * ow + ox) * c + ch] = (ss.wrapping_mul(multiplier) >> 24) as u8;
            }
        }
    }
    Pixels {
        w: ow,
        h: oh,
        c,
        data,
    }
}

/// Pillow `Image.resize((out_w, out_h), filter, reducing_gap=reducing_gap)`.
/// Source and target sides must be positive and `data` must hold `w·h·c` bytes.
pub fn resize(
    src: &Pixels,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    reducing_gap: Option<f64>,
) -> Result<Pixels> {
    if src.data.len() != src.w * src.h * src.c || src.c == 0 {
        return Err(ModelError::invalid(
            "image",
            format!(
                "pixel buffer holds {} bytes, expected {}×{}×{}",
                src.data.len(),
                src.w,
                src.h,
                src.c
            ),
        ));
    }
    if src.w == 0 || src.h == 0 || out_w == 0 || out_h == 0 {
        return Err(ModelError::invalid(
            "image",
            format!(
                "cannot resize {}×{} to {out_w}×{out_h}: sides must be at least 1",
                src.w, src.h
            ),
        ));
    }
    if (src.w, src.h) == (out_w, out_h) {
        return Ok(src.clone());
    }
    let mut img = std::borrow::Cow::Borrowed(src);
    let mut b = [0.0f32, 0.0, src.w as f32, src.h as f32];
    if let Some(gap) = reducing_gap {
        let fx = ((src.w as f64 / out_w as f64 / gap) as usize).max(1);
        let fy = ((src.h as f64 / out_h as f64 / gap) as usize).max(1);
        if fx > 1 || fy > 1 {
            img = std::borrow::Cow::Owned(reduce(src, fx, fy));
            b = [
                0.0,
                0.0,
                (src.w as f64 / fx as f64) as f32,
                (src.h as f64 / fy as f64) as f32,
            ];
        }
    }
    Ok(resample(&img, out_w, out_h, filter, b))
}

/// Pillow `convert("L")` of an RGB image: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
/// A one-channel image is returned unchanged.
pub fn rgb_to_luma(src: &Pixels) -> Result<Pixels> {
    if src.c == 1 {
        return Ok(src.clone());
    }
    if src.c != 3 || src.data.len() != src.w * src.h * 3 {
        return Err(ModelError::invalid(
            "image",
            format!(
                "expected an RGB buffer of {}×{}×3 bytes, got {} channels / {} bytes",
                src.w,
                src.h,
                src.c,
                src.data.len()
            ),
        ));
    }
    let data = src
        .data
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    Ok(Pixels {
        w: src.w,
        h: src.h,
        c: 1,
        data,
    })
}
