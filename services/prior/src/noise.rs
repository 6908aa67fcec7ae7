//! Stopping a sample whose caller left or whose deadline passed, between denoising steps.
//!
//! Sampling runs on the blocking pool, where dropping the RPC future cannot reach it. Every
//! scheduler step with t > 0 draws noise, so the check sits in the noise source: [`StopNoise`]
//! refuses to draw once the call's [`Cancel`] fires, the model returns early, and the service
//! reports why.

use candle_core::{Device, Tensor};
use kd_models::noise::NoiseSource;
use kd_models::ModelError;
use kd_runtime::{Cancel, ServiceError};

/// A noise source that stops drawing when its call is cancelled.
pub struct StopNoise<'a, N> {
    inner: N,
    cancel: &'a Cancel,
    stopped: Option<ServiceError>,
}

impl<'a, N: NoiseSource> StopNoise<'a, N> {
    /// Wraps `inner`.
    pub fn new(inner: N, cancel: &'a Cancel) -> Self {
        Self {
            inner,
            cancel,
            stopped: None,
        }
    }

    /// The service error of a failed model call: the cancellation's reason when it stopped the
    /// call, else the model's own error.
    pub fn explain(&mut self, e: ModelError) -> ServiceError {
        self.stopped.take().unwrap_or_else(|| e.into())
    }
}

impl<N: NoiseSource> StopNoise<'_, N> {
    /// Fails the draw (remembering why) when the request was cancelled.
    fn check(&mut self) -> kd_models::Result<()> {
        if let Err(e) = self.cancel.check_at("during sampling") {
            self.stopped = Some(e);
            return Err(ModelError::invalid("noise", "sampling stopped"));
        }
        Ok(())
    }
}

impl<N: NoiseSource> NoiseSource for StopNoise<'_, N> {
    fn randn(&mut self, shape: &[usize], device: &Device) -> kd_models::Result<Tensor> {
        self.check()?;
        self.inner.randn(shape, device)
    }

    fn rand(&mut self, shape: &[usize], device: &Device) -> kd_models::Result<Tensor> {
        self.check()?;
        self.inner.rand(shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kd_models::noise::SeededNoise;
    use std::time::{Duration, Instant};

    #[test]
    fn draws_until_cancelled_or_expired() {
        let (c, guard) = Cancel::new(None);
        let mut n = StopNoise::new(SeededNoise::new(&[1]), &c);
        n.randn(&[1, 4], &Device::Cpu).unwrap();
        drop(guard);
        let e = n.randn(&[1, 4], &Device::Cpu).unwrap_err();
        assert!(matches!(n.explain(e), ServiceError::Cancelled(_)));

        let (c, _guard) = Cancel::new(Some(Instant::now() - Duration::from_millis(1)));
        let mut n = StopNoise::new(SeededNoise::new(&[1]), &c);
        let e = n.randn(&[1, 4], &Device::Cpu).unwrap_err();
        assert!(matches!(n.explain(e), ServiceError::DeadlineExceeded(_)));
        // A model error that is not the token's stays what it was.
        let e = n.explain(ModelError::invalid("latents", "bad"));
        assert!(matches!(e, ServiceError::InvalidArgument { .. }));
    }
}
