//! Stopping a sample whose caller left or whose deadline passed, between denoising steps.
//!
//! Sampling runs on the blocking pool, where dropping the RPC future (client gone, or tonic
//! enforcing the caller's `grpc-timeout`) cannot reach it. Every scheduler step with t > 0 draws
//! noise, so the check sits in the noise source: [`GuardedNoise`] refuses to draw once the
//! [`Watchdog`] says stop, the model returns early, and the service reports why.

use candle_core::{Device, Tensor};
use kd_models::noise::NoiseSource;
use kd_models::ModelError;
use kd_runtime::ServiceError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why a request should stop: its future was dropped, or its deadline passed.
#[derive(Debug, Clone, Default)]
pub struct Watchdog {
    cancelled: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

/// Cancels its [`Watchdog`] when dropped (keep it in the RPC future).
#[derive(Debug)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Watchdog {
    /// A watchdog for a request with an optional deadline, and the guard that cancels it.
    pub fn new(deadline: Option<Instant>) -> (Self, CancelOnDrop) {
        let cancelled = Arc::new(AtomicBool::new(false));
        (
            Self {
                cancelled: cancelled.clone(),
                deadline,
            },
            CancelOnDrop(cancelled),
        )
    }

    /// The reason to stop now, if any.
    pub fn check(&self) -> Result<(), ServiceError> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(ServiceError::Cancelled(
                "the caller went away; sampling stopped".into(),
            ));
        }
        if kd_runtime::deadline::expired(self.deadline) {
            return Err(ServiceError::DeadlineExceeded(
                "the request deadline passed during sampling".into(),
            ));
        }
        Ok(())
    }
}

/// A noise source that stops drawing when its watchdog says so.
pub struct GuardedNoise<'a, N> {
    inner: N,
    watchdog: &'a Watchdog,
    stopped: Option<ServiceError>,
}

impl<'a, N: NoiseSource> GuardedNoise<'a, N> {
    /// Wraps `inner`.
    pub fn new(inner: N, watchdog: &'a Watchdog) -> Self {
        Self {
            inner,
            watchdog,
            stopped: None,
        }
    }

    /// The service error of a failed model call: the watchdog's reason when it stopped the
    /// call, else the model's own error.
    pub fn explain(&mut self, e: ModelError) -> ServiceError {
        self.stopped.take().unwrap_or_else(|| e.into())
    }
}

impl<N: NoiseSource> NoiseSource for GuardedNoise<'_, N> {
    fn randn(&mut self, shape: &[usize], device: &Device) -> kd_models::Result<Tensor> {
        if let Err(e) = self.watchdog.check() {
            self.stopped = Some(e);
            return Err(ModelError::invalid("noise", "sampling stopped"));
        }
        self.inner.randn(shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kd_models::noise::SeededNoise;
    use std::time::Duration;

    #[test]
    fn draws_until_cancelled_or_expired() {
        let (w, guard) = Watchdog::new(None);
        let mut n = GuardedNoise::new(SeededNoise::new(&[1]), &w);
        n.randn(&[1, 4], &Device::Cpu).unwrap();
        drop(guard);
        let e = n.randn(&[1, 4], &Device::Cpu).unwrap_err();
        assert!(matches!(n.explain(e), ServiceError::Cancelled(_)));

        let (w, _guard) = Watchdog::new(Some(Instant::now() - Duration::from_millis(1)));
        let mut n = GuardedNoise::new(SeededNoise::new(&[1]), &w);
        let e = n.randn(&[1, 4], &Device::Cpu).unwrap_err();
        assert!(matches!(n.explain(e), ServiceError::DeadlineExceeded(_)));
        // A model error that is not the watchdog's stays what it was.
        let e = n.explain(ModelError::invalid("latents", "bad"));
        assert!(matches!(e, ServiceError::InvalidArgument { .. }));
    }
}
