//! β schedules and the NumPy/torch-equivalent range helpers the schedulers need.
//!
//! `linear` and `scaled_linear` follow `torch.linspace(..., dtype=float32)` (f32 arithmetic,
//! computed from both ends like ATen); `squaredcos_cap_v2` is the cosine ᾱ schedule computed in
//! f64 with **float** `t = i / n` (candle's `betas_for_alpha_bar` divides integers).

use crate::error::Result;
use crate::schedulers::unsupported;

/// `torch.linspace(start, end, n, dtype=float32)`.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `np.linspace(start, stop, n)` (f64, endpoint included).
pub fn linspace_f64(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for positive `start` and `step`.
pub fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..len).map(|i| start - i as f64 * step).collect()
}

/// The β schedule named by a diffusers config (`trained_betas` take precedence).
pub fn betas(
    schedule: &str,
    start: f64,
    end: f64,
    n: usize,
    trained: Option<&[f64]>,
) -> Result<Vec<f32>> {
    if let Some(t) = trained {
        return Ok(t.iter().map(|&b| b as f32).collect());
    }
    Ok(match schedule {
        "linear" => linspace_f32(start, end, n),
        "scaled_linear" => linspace_f32(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        "squaredcos_cap_v2" => {
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - f(t2) / f(t1)).min(0.999) as f32
                })
                .collect()
        }
        other => {
            return Err(unsupported(
                "beta_schedule",
                other,
                "linear, scaled_linear, squaredcos_cap_v2",
            ))
        }
    })
}

/// ᾱ_t = Π (1 − β_i), accumulated in f32 like `torch.cumprod`.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f32;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}
