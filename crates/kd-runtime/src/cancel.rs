//! One cancellation token for every long computation: it says stop when the caller went away
//! (the RPC future was dropped, or a stream's receiver closed) or when the request's deadline
//! passed. Model code runs on the blocking pool, where dropping a future cannot reach it, so it
//! polls [`Cancel::check`] between pieces of work (denoising steps, sampling steps).

use crate::error::ServiceError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Whether a request should stop, and why.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    gone: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

/// Marks its [`Cancel`] as "the caller went away" when dropped: keep it in the RPC future (or
/// the stream task), so that a dropped call stops its blocking work.
#[derive(Debug)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Cancel {
    /// A token for a request with an optional deadline, and the guard that cancels it on drop.
    pub fn new(deadline: Option<Instant>) -> (Self, CancelOnDrop) {
        let gone = Arc::new(AtomicBool::new(false));
        (
            Self {
                gone: gone.clone(),
                deadline,
            },
            CancelOnDrop(gone),
        )
    }

    /// Marks the caller as gone.
    pub fn cancel(&self) {
        self.gone.store(true, Ordering::Relaxed);
    }

    /// Whether the caller went away.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Whether the deadline passed.
    pub fn is_expired(&self) -> bool {
        crate::deadline::expired(self.deadline)
    }

    /// `Ok` to go on, else the reason to stop, saying `when` (e.g. "after 3 of 10 steps").
    pub fn check_at(&self, when: impl std::fmt::Display) -> Result<(), ServiceError> {
        if self.is_gone() {
            return Err(ServiceError::client_gone(when));
        }
        if self.is_expired() {
            return Err(ServiceError::deadline(when));
        }
        Ok(())
    }

    /// [`Cancel::check_at`] without saying where.
    pub fn check(&self) -> Result<(), ServiceError> {
        self.check_at("while the request was computed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stops_when_the_guard_drops_or_the_deadline_passes() {
        let (c, guard) = Cancel::new(None);
        c.check().unwrap();
        drop(guard);
        let e = c.check_at("after step 2").unwrap_err();
        assert!(matches!(e, ServiceError::Cancelled(_)), "{e}");
        assert!(e.to_string().contains("after step 2"), "{e}");

        let (c, _guard) = Cancel::new(Some(Instant::now() - Duration::from_millis(1)));
        let e = c.check().unwrap_err();
        assert!(matches!(e, ServiceError::DeadlineExceeded(_)), "{e}");

        let (c, _guard) = Cancel::new(Some(Instant::now() + Duration::from_secs(60)));
        c.check().unwrap();
        c.cancel();
        assert!(c.is_gone());
    }
}
