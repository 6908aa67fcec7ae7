//! What a request costs before it runs. Each stage times its own work at warm-up, on the device
//! it serves from, at two sizes, and fits `fixed + per-unit × units` ([`Cost`]); a request whose
//! estimate, even at [`SAFETY`] × it, cannot finish before its deadline is refused at once
//! ([`check`]: DEADLINE_EXCEEDED naming the estimate and the time left) instead of computing
//! for a caller that will have gone. The fits are linear, so they under-estimate the largest
//! inputs (attention grows faster than the area): only hopeless work is refused.

use crate::error::ServiceError;
use std::time::{Duration, Instant};

/// Only work whose estimate × this cannot finish in time is refused (the default of
/// `--admission-safety`; 0 refuses nothing).
pub const SAFETY: f64 = 0.5;

/// `fixed + per-unit × units` seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Seconds whatever the size (launch and per-layer overhead).
    pub fixed_s: f64,
    /// Seconds per unit (latent pixel, image pixel, sampling step).
    pub per_unit_s: f64,
}

impl Cost {
    /// The line through two timed runs `(units, time)`, a smaller and a larger one. Timing noise
    /// that makes the larger one faster gives a zero per-unit cost (no refusal by size), never
    /// a negative one.
    pub fn fit(small: (f64, Duration), large: (f64, Duration)) -> Self {
        let (u1, t1) = (small.0, small.1.as_secs_f64());
        let (u2, t2) = (large.0, large.1.as_secs_f64());
        let per_unit_s = if u2 > u1 {
            ((t2 - t1) / (u2 - u1)).max(0.0)
        } else {
            0.0
        };
        Self {
            fixed_s: (t1 - per_unit_s * u1).max(0.0),
            per_unit_s,
        }
    }

    /// Estimated seconds for `units`.
    pub fn seconds(&self, units: f64) -> f64 {
        self.fixed_s + self.per_unit_s * units
    }
}

/// How long `f` takes to produce its tensor, counted until the result reaches the host (an
/// asynchronous device has then finished the work).
#[cfg(feature = "models")]
pub fn time_to_host(
    f: impl FnOnce() -> Result<candle_core::Tensor, ServiceError>,
) -> Result<Duration, ServiceError> {
    let t = Instant::now();
    f()?.sum_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?;
    Ok(t.elapsed())
}

/// DEADLINE_EXCEEDED when `estimate_s` seconds of `work` cannot finish before `deadline` even
/// at `safety` × the estimate (0: never).
pub fn check(
    estimate_s: f64,
    safety: f64,
    deadline: Option<Instant>,
    work: impl std::fmt::Display,
) -> Result<(), ServiceError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .as_secs_f64();
    if estimate_s * safety <= remaining {
        return Ok(());
    }
    Err(ServiceError::DeadlineExceeded(format!(
        "the request deadline would pass before its work ends: about {estimate_s:.1} s of \
         {work} (calibrated at warm-up on this device) against {remaining:.1} s left"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_separates_overhead_from_per_unit_cost_and_never_goes_negative() {
        let ms = Duration::from_millis;
        let c = Cost::fit((64.0, ms(110)), (256.0, ms(140)));
        assert!((c.per_unit_s - 0.03 / 192.0).abs() < 1e-12, "{c:?}");
        assert!((c.seconds(64.0) - 0.110).abs() < 1e-12, "{c:?}");
        let c = Cost::fit((64.0, ms(120)), (256.0, ms(100)));
        assert_eq!(c.per_unit_s, 0.0);
        assert!((c.fixed_s - 0.120).abs() < 1e-12);
    }

    #[test]
    fn only_work_that_cannot_finish_even_at_half_its_estimate_is_refused() {
        let soon = Some(Instant::now() + Duration::from_secs(10));
        check(19.0, SAFETY, soon, "x").unwrap();
        check(1e9, 0.0, soon, "x").unwrap();
        let e = check(25.0, SAFETY, soon, "denoising").unwrap_err();
        assert!(matches!(e, ServiceError::DeadlineExceeded(_)), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("about 25.0 s of denoising") && m.contains("s left"),
            "{m}"
        );
        check(1e9, SAFETY, None, "x").unwrap();
    }
}
