//! Admission control: a bounded queue in front of a fixed number of execution slots.
//!
//! A request first takes a queue place with `try_acquire` (never waits): when all places are
//! taken the request fails at once with RESOURCE_EXHAUSTED instead of adding unbounded latency.
//! It then waits for an execution slot. Dropping the [`Permit`] frees both.

use crate::error::ServiceError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A bounded queue plus execution slots.
#[derive(Debug, Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    capacity: usize,
}

/// Held while a request is admitted; frees its place and slot on drop.
#[derive(Debug)]
pub struct Permit {
    _place: OwnedSemaphorePermit,
    _slot: OwnedSemaphorePermit,
    /// Time spent waiting for the execution slot.
    pub queued: Duration,
}

impl Admission {
    /// `concurrency` requests run at once; up to `max_queue` more wait.
    pub fn new(concurrency: usize, max_queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            places: Arc::new(Semaphore::new(concurrency + max_queue)),
            slots: Arc::new(Semaphore::new(concurrency)),
            capacity: concurrency + max_queue,
        }
    }

    /// Admits a request or fails at once with [`ServiceError::Overloaded`].
    pub async fn admit(&self) -> Result<Permit, ServiceError> {
        let place = self.places.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Overloaded(format!(
                "all {} admission places are taken; retry later",
                self.capacity
            ))
        })?;
        let start = Instant::now();
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Unavailable("shutting down".into()))?;
        Ok(Permit {
            _place: place,
            _slot: slot,
            queued: start.elapsed(),
        })
    }

    /// Requests admitted and not yet finished (running + waiting).
    pub fn in_flight(&self) -> usize {
        self.capacity - self.places.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn excess_requests_are_rejected_at_once_and_places_come_back() {
        let a = Admission::new(1, 2);
        let p1 = a.admit().await.unwrap();
        // Two more fit in the queue (they would wait for the slot).
        let a2 = a.clone();
        let waiting1 = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        let a3 = a.clone();
        let waiting2 = tokio::spawn(async move { a3.admit().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.in_flight(), 3);
        let err = a.admit().await.unwrap_err();
        assert!(matches!(err, ServiceError::Overloaded(_)), "{err}");
        assert!(err.to_string().contains("all 3 admission places are taken"));
        drop(p1);
        waiting1.await.unwrap().unwrap();
        waiting2.await.unwrap().unwrap();
        assert_eq!(a.in_flight(), 0);
        a.admit().await.unwrap();
    }
}
