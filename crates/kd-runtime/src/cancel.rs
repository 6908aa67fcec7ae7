//! One cancellation token for every long computation: it says stop when the caller went away
//! (the RPC future was dropped, or a stream's receiver closed) or when the request's deadline
//! passed. Model code runs on the blocking pool, where dropping a future cannot reach it, so it
//! polls [`Cancel::check`] between pieces of work (denoising steps, UNet and MoVQ layers).
//!
//! The token also holds the request's execution slot ([`Cancel::holding`]): the slot is free
//! only when the last clone is dropped, and work started with [`Cancel::run_blocking`] keeps a
//! clone until it returns. So a request whose caller gave up (a deadline, a disconnect) keeps
//! its slot until its blocking work has really stopped, and the next request never runs beside
//! a computation that is still going.

use crate::error::ServiceError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Whether a request should stop, and why.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    gone: Arc<AtomicBool>,
    deadline: Option<Instant>,
    slot: Option<Arc<Slot>>,
}

/// What a request holds while it computes (its admission permit); released on drop, with a log
/// line when that happens after the request's deadline (how long its work outlived it).
struct Slot {
    _held: Box<dyn Send + Sync>,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(late) = self
            .deadline
            .and_then(|d| Instant::now().checked_duration_since(d))
        {
            tracing::info!(
                after_deadline_ms = late.as_millis() as u64,
                "execution slot freed after the request's deadline"
            );
        }
    }
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
                slot: None,
            },
            CancelOnDrop(gone),
        )
    }

    /// This token (and every clone) holds `slot` until the last clone is dropped.
    pub fn holding(mut self, slot: impl Send + Sync + 'static) -> Self {
        self.slot = Some(Arc::new(Slot {
            _held: Box::new(slot),
            deadline: self.deadline,
        }));
        self
    }

    /// Runs `f(&cancel)` on the blocking pool; the work holds a clone of this token (and so the
    /// request's slot) until it returns, whether or not the caller still waits for it.
    pub async fn run_blocking<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        F: FnOnce(&Cancel) -> Result<T, ServiceError> + Send + 'static,
        T: Send + 'static,
    {
        let c = self.clone();
        crate::stage::blocking(move || f(&c)).await
    }

    /// A stop check for model code between pieces of work: true once the caller is gone or
    /// the deadline passed.
    pub fn should_stop(&self) -> bool {
        self.is_gone() || self.is_expired()
    }

    /// The service error for a model error: an interruption asked for by this token becomes
    /// the reason it stopped (DEADLINE_EXCEEDED, CANCELLED) saying where; anything else maps as
    /// usual.
    #[cfg(feature = "models")]
    pub fn model_error(&self, e: kd_models::ModelError) -> ServiceError {
        if let kd_models::ModelError::Interrupted { piece } = &e {
            if let Err(reason) = self.check_at(format_args!("in {piece}")) {
                return reason;
            }
        }
        e.into()
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
        assert!(c.is_gone() && c.should_stop());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_slot_is_held_until_the_last_clone_and_blocking_work_end() {
        let slot = Arc::new(());
        let (c, _guard) = Cancel::new(None);
        let c = c.holding(slot.clone());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let work = tokio::spawn({
            let c = c.clone();
            async move {
                c.run_blocking(move |_| {
                    started_tx.send(()).unwrap();
                    finish_rx.recv().unwrap();
                    Ok(())
                })
                .await
            }
        });
        started_rx.recv().unwrap();
        // The caller gives up: its handle and the waiting future go, the work goes on.
        drop(c);
        work.abort();
        assert_eq!(
            Arc::strong_count(&slot),
            2,
            "the running work still holds the slot"
        );
        finish_tx.send(()).unwrap();
        let t = Instant::now();
        while Arc::strong_count(&slot) > 1 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the slot was never freed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
