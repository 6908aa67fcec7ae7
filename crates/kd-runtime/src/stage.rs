//! The per-RPC plumbing every service shares, in one place: metrics (request count, latency,
//! in-flight, failures by reason), validation before admission, admission (bounded queue →
//! RESOURCE_EXHAUSTED), the loaded model (UNAVAILABLE until ready), deadlines and cancellation,
//! and running synchronous model code off the async runtime.
//!
//! Every RPC is one of two shapes:
//! * [`Stage::unary`]: validate → admit → run → one answer;
//! * [`Stage::stream`]: validate → admit → run in a task that emits events through a [`Sink`]
//!   until it returns; the stream ends with the run's error, if any.
//!
//! Both count every request and every failure (validation failures included) in
//! `kd_requests_total` / `kd_failures_total`, stop at the caller's deadline with
//! DEADLINE_EXCEEDED, and hand the run a [`Cancel`] token that fires when the caller goes away.

use crate::admission::{Admission, Permit};
use crate::cancel::Cancel;
use crate::deadline;
use crate::error::ServiceError;
use crate::metrics::{Metrics, RequestGuard};
use kd_proto::v1;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// A loaded model that can say what it is (served on `kandinsky.v1.StageInfo`).
pub trait StageModel: Send + Sync + 'static {
    /// Family, weights revision, component, dtype and device.
    fn info(&self) -> &v1::ModelInfo;
}

/// What a call brings besides its message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call {
    /// When the work must be done (the caller's `grpc-timeout`, less a small margin so this
    /// service answers DEADLINE_EXCEEDED before the transport's own timer fires).
    pub deadline: Option<Instant>,
}

/// Kept back from the caller's deadline: the transport cancels a call exactly at its
/// `grpc-timeout` ("Timeout expired", CANCELLED); answering a little earlier gives the caller
/// one status, DEADLINE_EXCEEDED, whatever the race.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

impl Call {
    /// The call of `request` (its deadline from `grpc-timeout`, less [`DEADLINE_MARGIN`]).
    pub fn of<T>(request: &Request<T>) -> Self {
        Self::with_margin(request, DEADLINE_MARGIN)
    }

    /// The call of `request`, its work ending `margin` before the caller's deadline.
    pub fn with_margin<T>(request: &Request<T>, margin: Duration) -> Self {
        Self {
            deadline: deadline::deadline_of(request.metadata())
                .map(|d| d.checked_sub(margin).unwrap_or(d)),
        }
    }
}

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

/// A call that passed validation and admission.
pub struct Admitted<M, P> {
    /// The loaded model.
    pub model: Arc<M>,
    /// What validation made of the request.
    pub plan: P,
    guard: RequestGuard,
    permit: Permit,
}

/// The response stream of a streaming RPC.
pub type EventStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// Where a streaming run sends its events.
pub struct Sink<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    cancel: Cancel,
}

impl<T> Clone for Sink<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

impl<T: Send + 'static> Sink<T> {
    /// A sink of `capacity` events under `cancel`, and the receiving end: for a run driven
    /// outside [`Stage::stream`] (a scheduling loop under test).
    pub fn channel(capacity: usize, cancel: Cancel) -> (Self, mpsc::Receiver<Result<T, Status>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, cancel }, rx)
    }

    /// Sends one event; fails when the caller went away.
    pub async fn send(&self, event: T) -> Result<(), ServiceError> {
        self.tx.send(Ok(event)).await.map_err(|_| {
            self.cancel.cancel();
            ServiceError::client_gone("while events were streamed")
        })
    }

    /// Sends one event from the blocking pool: waits for room in the stream, checking the
    /// cancellation token, so a caller that stops reading cannot block the worker for ever.
    pub fn send_blocking(&self, event: T) -> Result<(), ServiceError> {
        let mut event = Ok(event);
        loop {
            match self.tx.try_send(event) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.cancel.cancel();
                    return Err(ServiceError::client_gone("while events were streamed"));
                }
                Err(mpsc::error::TrySendError::Full(back)) => {
                    self.cancel.check_at("while the caller was not reading")?;
                    event = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// The cancellation token of the call.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }
}

impl<M: Send + Sync + 'static> Stage<M> {
    /// A stage called `name` (its metrics' `stage` label) with `concurrency` execution slots
    /// and `max_queue` waiting places.
    pub fn new(name: &'static str, concurrency: usize, max_queue: usize) -> Self {
        Self {
            model: Arc::new(OnceLock::new()),
            admission: Admission::new(concurrency, max_queue),
            metrics: Metrics::new(name),
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

    /// Counts the call, validates it (a bad request is answered at once, never queued) and
    /// admits it (or refuses it at once with RESOURCE_EXHAUSTED). Every failure is counted in
    /// `kd_failures_total` with its reason and logged.
    pub async fn admit<P>(
        &self,
        method: &'static str,
        validate: impl FnOnce(&M) -> Result<P, ServiceError>,
    ) -> Result<Admitted<M, P>, Status> {
        let guard = self.metrics.start(method);
        let admitted = async {
            let model = self.model()?;
            let plan = validate(&model)?;
            let permit = self
                .admission
                .admit()
                .instrument(tracing::info_span!("queue"))
                .await?;
            self.metrics.queue_wait(permit.queued);
            Ok::<_, ServiceError>((model, plan, permit))
        }
        .await;
        match admitted {
            Ok((model, plan, permit)) => Ok(Admitted {
                model,
                plan,
                guard,
                permit,
            }),
            Err(e) => Err(self.fail(method, guard, e)),
        }
    }

    fn fail(&self, method: &'static str, guard: RequestGuard, e: ServiceError) -> Status {
        tracing::warn!(stage = self.metrics.stage(), method, error = %e, "request failed");
        guard.finish::<()>(&Err(e.clone()));
        Status::from(e)
    }

    /// One unary call: validate → admit → `run(model, plan, cancel)` until the deadline.
    pub async fn unary<P, T, F, Fut>(
        &self,
        method: &'static str,
        call: Call,
        validate: impl FnOnce(&M) -> Result<P, ServiceError>,
        run: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Arc<M>, P, Cancel) -> Fut,
        Fut: Future<Output = Result<T, ServiceError>>,
    {
        let Admitted {
            model,
            plan,
            guard,
            permit,
        } = self.admit(method, validate).await?;
        let (cancel, _cancel_on_drop) = Cancel::new(call.deadline);
        // The slot is free when this call and every piece of blocking work it started end.
        let cancel = cancel.holding(permit);
        let held = cancel.clone();
        let result = with_deadline(
            call.deadline,
            run(model, plan, cancel).instrument(tracing::info_span!("compute", method)),
        )
        .await;
        drop(held);
        match result {
            Ok(v) => {
                guard.finish::<()>(&Ok(()));
                Ok(Response::new(v))
            }
            Err(e) => Err(self.fail(method, guard, e)),
        }
    }

    /// One server-streaming call: validate → admit → `run(model, plan, sink)` in a task that
    /// lives as long as the stream (and so does the call's span). The stream ends after `run`
    /// returns, with its error as the last item if it failed; the caller going away or the
    /// deadline passing stops `run` (its [`Cancel`] fires for work on the blocking pool).
    pub async fn stream<P, T, F, Fut>(
        &self,
        method: &'static str,
        call: Call,
        validate: impl FnOnce(&M) -> Result<P, ServiceError>,
        run: F,
    ) -> Result<Response<EventStream<T>>, Status>
    where
        T: Send + 'static,
        P: Send + 'static,
        F: FnOnce(Arc<M>, P, Sink<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), ServiceError>> + Send + 'static,
    {
        let Admitted {
            model,
            plan,
            guard,
            permit,
        } = self.admit(method, validate).await?;
        let (tx, rx) = mpsc::channel(16);
        let (cancel, cancel_on_drop) = Cancel::new(call.deadline);
        // The slot is free when this stream's task and all blocking work it started end.
        let cancel = cancel.holding(permit);
        let held = cancel.clone();
        let sink = Sink {
            tx: tx.clone(),
            cancel,
        };
        let stage = self.clone();
        // The server span (the caller's trace) lasts until the stream ends, not until the
        // handler returned the stream.
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let _cancel_on_drop = cancel_on_drop;
                let result = tokio::select! {
                    r = with_deadline(call.deadline, run(model, plan, sink)) => r,
                    _ = tx.closed() => Err(ServiceError::client_gone("while the stream was open")),
                };
                drop(held);
                match result {
                    Ok(()) => guard.finish::<()>(&Ok(())),
                    Err(e) => {
                        let status = stage.fail(method, guard, e);
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Runs `fut` until `deadline` (DEADLINE_EXCEEDED after it).
pub async fn with_deadline<T>(
    deadline: Option<Instant>,
    fut: impl Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    match deadline {
        None => fut.await,
        Some(d) => tokio::time::timeout_at(d.into(), fut)
            .await
            .map_err(|_| ServiceError::deadline("before the work finished"))?,
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

/// `kandinsky.v1.StageInfo` of one stage: answers from the loaded model, outside admission, so
/// it never waits behind a running call.
pub struct StageInfoService<M> {
    stage: Stage<M>,
}

impl<M: StageModel> StageInfoService<M> {
    /// The service over `stage`.
    pub fn new(stage: Stage<M>) -> v1::stage_info_server::StageInfoServer<Self> {
        v1::stage_info_server::StageInfoServer::new(Self { stage })
    }
}

#[tonic::async_trait]
impl<M: StageModel> v1::stage_info_server::StageInfo for StageInfoService<M> {
    async fn info(
        &self,
        _request: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, Status> {
        let guard = self.stage.metrics.start("Info");
        let info = self.stage.model().map(|m| m.info().clone());
        guard.finish(&info);
        info.map(|model| Response::new(v1::InfoResponse { model: Some(model) }))
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn stage() -> Stage<u32> {
        Stage::new("test", 1, 0)
    }

    async fn add_one(stage: &Stage<u32>) -> Result<Response<u32>, Status> {
        stage
            .unary(
                "Call",
                Call::default(),
                |_| Ok(()),
                |m, (), _| async move { blocking(move || Ok(*m + 1)).await },
            )
            .await
    }

    #[tokio::test]
    async fn unavailable_until_loaded_then_runs() {
        let stage = stage();
        let err = add_one(&stage).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("test model is not loaded yet"));
        stage.set_model(Arc::new(7));
        assert_eq!(add_one(&stage).await.unwrap().into_inner(), 8);
        let text = stage.metrics.render();
        assert!(
            text.contains(
                "kd_failures_total{method=\"Call\",reason=\"unavailable\",stage=\"test\"} 1"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn validation_failures_are_counted_and_never_admitted() {
        let stage = stage();
        stage.set_model(Arc::new(1));
        // Hold the only slot: a bad request must still be answered at once.
        let busy = stage.admission.admit().await.unwrap();
        let err = stage
            .unary(
                "Call",
                Call::default(),
                |_| Err::<(), _>(ServiceError::invalid("width", "must be > 0")),
                |_, (), _| async { Ok(()) },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(stage.admission.in_flight(), 1);
        drop(busy);
        let text = stage.metrics.render();
        assert!(
            text.contains(
                "kd_failures_total{method=\"Call\",reason=\"invalid_argument\",stage=\"test\"} 1"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unary_stops_at_the_deadline_and_cancels_blocking_work() {
        let stage = stage();
        stage.set_model(Arc::new(1));
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let call = Call {
            deadline: Some(Instant::now() + Duration::from_millis(50)),
        };
        let err = stage
            .unary(
                "Call",
                call,
                |_| Ok(()),
                |_, (), cancel| async move {
                    blocking(move || loop {
                        if let Err(e) = cancel.check() {
                            let _ = seen_tx.send(e.to_string());
                            return Err::<(), _>(e);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    })
                    .await
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err
            .message()
            .starts_with("deadline exceeded: the request deadline passed"));
        // The blocking loop saw the token fire and stopped.
        let seen = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!seen.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_past_its_deadline_keeps_its_slot_until_its_blocking_work_ends() {
        // One slot, and a queue place for the second call.
        let stage = Stage::new("test", 1, 1);
        stage.set_model(Arc::new(1));
        let work = Duration::from_millis(400);
        let first = {
            let stage = stage.clone();
            tokio::spawn(async move {
                let call = Call {
                    deadline: Some(Instant::now() + Duration::from_millis(50)),
                };
                // Work that never looks at its token (a long single operation).
                let run = move |_, (), cancel: Cancel| async move {
                    cancel
                        .run_blocking(move |_| {
                            std::thread::sleep(work);
                            Ok(())
                        })
                        .await
                };
                stage.unary("Call", call, |_| Ok(()), run).await
            })
        };
        let t = Instant::now();
        let err = first.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(
            t.elapsed() < work,
            "the caller got its answer at the deadline"
        );
        // The next call waits for the slot until the first call's work has ended.
        let run = |m: Arc<u32>, (), _| async move { Ok(*m) };
        let answer = stage.unary("Call", Call::default(), |_| Ok(()), run).await;
        assert_eq!(answer.unwrap().into_inner(), 1);
        assert!(
            t.elapsed() >= work,
            "admitted after {:?}, while the first call's work still ran",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn stream_emits_then_ends_with_the_error_and_stops_when_the_caller_leaves() {
        let stage = stage();
        stage.set_model(Arc::new(3));
        let resp = stage
            .stream(
                "Stream",
                Call::default(),
                |_| Ok(2u32),
                |m, n, sink: Sink<u32>| async move {
                    for i in 0..n {
                        sink.send(*m + i).await?;
                    }
                    Err(ServiceError::invalid("x", "bad"))
                },
            )
            .await
            .unwrap();
        let items: Vec<_> = resp.into_inner().collect().await;
        assert_eq!(items.len(), 3);
        assert_eq!(*items[0].as_ref().unwrap(), 3);
        assert_eq!(*items[1].as_ref().unwrap(), 4);
        assert_eq!(
            items[2].as_ref().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        // A caller that drops the stream cancels the blocking worker.
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let resp = stage
            .stream(
                "Stream",
                Call::default(),
                |_| Ok(()),
                move |_, (), sink: Sink<u32>| async move {
                    blocking(move || loop {
                        if let Err(e) = sink.send_blocking(1) {
                            let _ = seen_tx.send(e.to_string());
                            return Err(e);
                        }
                    })
                    .await
                },
            )
            .await
            .unwrap();
        let mut s = resp.into_inner();
        assert!(s.next().await.unwrap().is_ok());
        drop(s);
        let seen = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(seen.contains("caller went away"), "{seen}");
        // Both finished; the second counts as cancelled.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = stage.metrics.render();
        assert!(
            text.contains(
                "kd_failures_total{method=\"Stream\",reason=\"cancelled\",stage=\"test\"} 1"
            ),
            "{text}"
        );
    }
}
