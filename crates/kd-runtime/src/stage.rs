//! The per-RPC plumbing every service shares, in one place: metrics (request count, latency,
//! in-flight, failures by reason), admission (bounded queue → RESOURCE_EXHAUSTED), the loaded
//! model (UNAVAILABLE until ready) and running synchronous model code off the async runtime.

use crate::admission::Admission;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tonic::{Response, Status};
use tracing::Instrument;

/// A stage's shared state: its model (once loaded), admission and metrics.
pub struct Stage<M> {
    model: Arc<OnceLock<Arc<M>>>,
    /// Admission control of this stage.
    pub admission: Admission,
    /// Metrics of this stage.
    pub metrics: Metrics,
}

impl<M> Clone for Stage<M> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            admission: self.admission.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<M: Send + Sync + 'static> Stage<M> {
    /// A stage with no model yet.
    pub fn new(admission: Admission, metrics: Metrics) -> Self {
        Self {
            model: Arc::new(OnceLock::new()),
            admission,
            metrics,
        }
    }

    /// Installs the loaded model (first call wins).
    pub fn set_model(&self, model: Arc<M>) {
        let _ = self.model.set(model);
    }

    /// The model, or UNAVAILABLE while it is still loading.
    pub fn model(&self) -> Result<Arc<M>, ServiceError> {
        self.model.get().cloned().ok_or_else(|| {
            ServiceError::Unavailable(format!("{} model is not loaded yet", self.metrics.stage()))
        })
    }

    /// Runs one unary call: counts it, admits it (or rejects it at once when the queue is full),
    /// runs `f` with the model, records the outcome and maps errors to a status.
    pub async fn unary<T, F, Fut>(&self, method: &'static str, f: F) -> Result<Response<T>, Status>
    where
        F: FnOnce(Arc<M>) -> Fut,
        Fut: Future<Output = Result<T, ServiceError>>,
    {
        let guard = self.metrics.start(method);
        let result = async {
            let model = self.model()?;
            let permit = self
                .admission
                .admit()
                .instrument(tracing::info_span!("queue"))
                .await?;
            self.metrics.queue_wait(permit.queued);
            let out = f(model)
                .instrument(tracing::info_span!("compute", method))
                .await;
            drop(permit);
            out
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(stage = self.metrics.stage(), method, error = %e, "request failed");
        }
        guard.finish(&result);
        result.map(Response::new).map_err(Status::from)
    }
}

/// A streaming call that passed admission: keep it alive for the life of the stream and call
/// [`Admitted::finish`] with the outcome.
pub struct Admitted<M> {
    /// The loaded model.
    pub model: Arc<M>,
    guard: crate::metrics::RequestGuard,
    _permit: crate::admission::Permit,
}

impl<M> Admitted<M> {
    /// Records the outcome and frees the admission place.
    pub fn finish<T>(self, result: &Result<T, ServiceError>) {
        self.guard.finish(result);
    }
}

impl<M: Send + Sync + 'static> Stage<M> {
    /// Admits a streaming call (counted, queued, or rejected at once with RESOURCE_EXHAUSTED).
    pub async fn admit(&self, method: &'static str) -> Result<Admitted<M>, Status> {
        let guard = self.metrics.start(method);
        let admitted = async {
            let model = self.model()?;
            let permit = self
                .admission
                .admit()
                .instrument(tracing::info_span!("queue"))
                .await?;
            self.metrics.queue_wait(permit.queued);
            Ok::<_, ServiceError>((model, permit))
        }
        .await;
        match admitted {
            Ok((model, permit)) => Ok(Admitted {
                model,
                guard,
                _permit: permit,
            }),
            Err(e) => {
                guard.finish::<()>(&Err(e.clone()));
                Err(Status::from(e))
            }
        }
    }
}

/// Runs synchronous model code on the blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, ServiceError>
where
    F: FnOnce() -> Result<T, ServiceError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("model task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unavailable_until_loaded_then_runs() {
        let stage: Stage<u32> = Stage::new(Admission::new(1, 0), Metrics::new("test"));
        let err = stage
            .unary("Call", |m| async move { Ok(*m) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("test model is not loaded yet"));
        stage.set_model(Arc::new(7));
        let ok = stage
            .unary(
                "Call",
                |m| async move { blocking(move || Ok(*m + 1)).await },
            )
            .await;
        assert_eq!(ok.unwrap().into_inner(), 8);
        let text = stage.metrics.render();
        assert!(
            text.contains(
                "kd_failures_total{method=\"Call\",reason=\"unavailable\",stage=\"test\"} 1"
            ),
            "{text}"
        );
    }
}
