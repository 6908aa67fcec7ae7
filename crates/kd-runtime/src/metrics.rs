//! Prometheus metrics shared by every service (names prefixed `kd_`, every series labelled with
//! the service's `stage`), and the HTTP endpoint that serves them on `/metrics`.

use crate::error::ServiceError;
use crate::shutdown::Shutdown;
use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// The metric families of one service process.
#[derive(Clone)]
pub struct Metrics {
    stage: &'static str,
    registry: Registry,
    requests: IntCounterVec,
    failures: IntCounterVec,
    latency: HistogramVec,
    queue_wait: HistogramVec,
    in_flight: IntGaugeVec,
    batch_size: HistogramVec,
    cache: IntCounterVec,
    model_load: GaugeVec,
    steps: IntCounterVec,
    batch_requests: HistogramVec,
    step_seconds: HistogramVec,
    batch_wait: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("stage", &self.stage)
            .finish()
    }
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram")
}

impl Metrics {
    /// Registers every family for `stage` (e.g. `"denoiser"`).
    pub fn new(stage: &'static str) -> Self {
        let registry = Registry::new();
        let latency_buckets = exponential_buckets(0.005, 2.0, 16).expect("buckets");
        let step_buckets = exponential_buckets(0.001, 2.0, 16).expect("buckets");
        let m = Self {
            batch_requests: histogram(
                "kd_batch_requests",
                "Requests sharing one model call (step-level batching).",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                &["stage"],
            ),
            step_seconds: histogram(
                "kd_step_seconds",
                "Time of one batched model call: a denoiser sampling step (one UNet call and the \
                 requests' updates), a text-encoder or movq micro-batch, a prior micro-batch's \
                 sampling loop.",
                step_buckets,
                &["stage"],
            ),
            batch_wait: histogram(
                "kd_batch_wait_seconds",
                "Time a request waited to join the running batch, by shape class (height x width).",
                latency_buckets.clone(),
                &["stage", "shape"],
            ),
            stage,
            requests: IntCounterVec::new(
                Opts::new("kd_requests_total", "Requests received, by method."),
                &["stage", "method"],
            )
            .expect("valid"),
            failures: IntCounterVec::new(
                Opts::new(
                    "kd_failures_total",
                    "Failed requests, by method and reason.",
                ),
                &["stage", "method", "reason"],
            )
            .expect("valid"),
            latency: histogram(
                "kd_request_duration_seconds",
                "Request latency, admission to last byte.",
                latency_buckets.clone(),
                &["stage", "method"],
            ),
            queue_wait: histogram(
                "kd_queue_wait_seconds",
                "Time requests waited for an execution slot.",
                latency_buckets,
                &["stage"],
            ),
            in_flight: IntGaugeVec::new(
                Opts::new("kd_in_flight", "Requests admitted and not finished."),
                &["stage"],
            )
            .expect("valid"),
            batch_size: histogram(
                "kd_batch_size",
                "Rows (images or prompts) per model call.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                &["stage"],
            ),
            cache: IntCounterVec::new(
                Opts::new(
                    "kd_cache_requests_total",
                    "Embedding cache look-ups by result (hit, miss, error).",
                ),
                &["stage", "result"],
            )
            .expect("valid"),
            model_load: GaugeVec::new(
                Opts::new(
                    "kd_model_load_seconds",
                    "Time taken to load and warm the model.",
                ),
                &["stage"],
            )
            .expect("valid"),
            steps: IntCounterVec::new(
                Opts::new(
                    "kd_denoise_steps_total",
                    "Sampling steps executed (rate = steps/s).",
                ),
                &["stage"],
            )
            .expect("valid"),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.failures.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.cache.clone()),
            Box::new(m.model_load.clone()),
            Box::new(m.steps.clone()),
            Box::new(m.batch_requests.clone()),
            Box::new(m.step_seconds.clone()),
            Box::new(m.batch_wait.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        // Make the per-stage series exist from the start so dashboards show zeros, not gaps.
        m.in_flight.with_label_values(&[stage]).set(0);
        m.steps.with_label_values(&[stage]).inc_by(0);
        m
    }

    /// The stage label.
    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// Counts a request and returns a guard that tracks in-flight and records latency/outcome.
    pub fn start(&self, method: &'static str) -> RequestGuard {
        self.requests.with_label_values(&[self.stage, method]).inc();
        self.in_flight.with_label_values(&[self.stage]).inc();
        RequestGuard {
            metrics: self.clone(),
            method,
            start: std::time::Instant::now(),
            finished: false,
        }
    }

    /// Records a failure with its reason.
    pub fn failure(&self, method: &str, err: &ServiceError) {
        self.failures
            .with_label_values(&[self.stage, method, err.reason()])
            .inc();
    }

    /// Records time spent waiting in the admission queue.
    pub fn queue_wait(&self, d: Duration) {
        self.queue_wait
            .with_label_values(&[self.stage])
            .observe(d.as_secs_f64());
    }

    /// Records the rows of one model call.
    pub fn batch(&self, rows: usize) {
        self.batch_size
            .with_label_values(&[self.stage])
            .observe(rows as f64);
    }

    /// Records a cache look-up result: `hit`, `miss` or `error`.
    pub fn cache(&self, result: &str) {
        self.cache.with_label_values(&[self.stage, result]).inc();
    }

    /// Records the model load time.
    pub fn model_loaded(&self, d: Duration) {
        let g: Gauge = self.model_load.with_label_values(&[self.stage]);
        g.set(d.as_secs_f64());
    }

    /// Records one batched step: the requests sharing its model call and how long it took.
    pub fn batched_step(&self, requests: usize, took: Duration) {
        self.batch_requests
            .with_label_values(&[self.stage])
            .observe(requests as f64);
        self.step_seconds
            .with_label_values(&[self.stage])
            .observe(took.as_secs_f64());
    }

    /// Records how long a request of shape class `shape` waited to join the running batch.
    pub fn batch_wait(&self, shape: &str, d: Duration) {
        self.batch_wait
            .with_label_values(&[self.stage, shape])
            .observe(d.as_secs_f64());
    }

    /// Counts sampling steps.
    pub fn steps(&self, n: u64) {
        self.steps.with_label_values(&[self.stage]).inc_by(n);
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    /// Serves `/metrics`, and `/healthz` (200 while `serving`, else 503: the probe of a pod
    /// whose gRPC port speaks TLS), on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: Shutdown,
        serving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<()> {
        let healthz = axum::routing::get(move || async move {
            if serving.load(std::sync::atomic::Ordering::Relaxed) {
                (axum::http::StatusCode::OK, "SERVING\n")
            } else {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
            }
        });
        let app = axum::Router::new().route("/healthz", healthz).route(
            "/metrics",
            axum::routing::get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
    }
}

/// Tracks one request: in-flight while alive; latency and outcome when finished.
pub struct RequestGuard {
    metrics: Metrics,
    method: &'static str,
    start: std::time::Instant,
    finished: bool,
}

impl RequestGuard {
    /// Records the outcome (a failure counts with its reason) and the latency.
    pub fn finish<T>(mut self, result: &Result<T, ServiceError>) {
        if let Err(e) = result {
            self.metrics.failure(self.method, e);
        }
        self.record();
    }

    fn record(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let m = &self.metrics;
        m.in_flight.with_label_values(&[m.stage]).dec();
        m.latency
            .with_label_values(&[m.stage, self.method])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for RequestGuard {
    /// A request dropped without `finish` (the client went away) counts as cancelled.
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .failure(self.method, &ServiceError::Cancelled(String::new()));
            self.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_series() {
        let m = Metrics::new("prior");
        let g = m.start("Sample");
        g.finish::<()>(&Err(ServiceError::invalid("x", "y")));
        m.start("Sample").finish(&Ok(()));
        drop(m.start("Sample"));
        m.queue_wait(Duration::from_millis(3));
        m.cache("hit");
        m.batch(2);
        m.steps(5);
        m.model_loaded(Duration::from_millis(1500));
        let text = m.render();
        for line in [
            "kd_requests_total{method=\"Sample\",stage=\"prior\"} 3",
            "kd_failures_total{method=\"Sample\",reason=\"invalid_argument\",stage=\"prior\"} 1",
            "kd_failures_total{method=\"Sample\",reason=\"cancelled\",stage=\"prior\"} 1",
            "kd_request_duration_seconds_count{method=\"Sample\",stage=\"prior\"} 3",
            "kd_in_flight{stage=\"prior\"} 0",
            "kd_queue_wait_seconds_count{stage=\"prior\"} 1",
            "kd_cache_requests_total{result=\"hit\",stage=\"prior\"} 1",
            "kd_batch_size_sum{stage=\"prior\"} 2",
            "kd_denoise_steps_total{stage=\"prior\"} 5",
            "kd_model_load_seconds{stage=\"prior\"} 1.5",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// Every `kd_*` series the Grafana dashboard queries is one the services export.
    #[test]
    fn dashboard_queries_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../charts/kandinsky/dashboards/kandinsky-serve.json"
        );
        let text = std::fs::read_to_string(path).expect("dashboard JSON");
        let m = Metrics::new("denoiser");
        m.start("Denoise")
            .finish::<()>(&Err(ServiceError::Overloaded(String::new())));
        m.queue_wait(Duration::from_millis(1));
        m.batch(1);
        m.cache("hit");
        m.steps(1);
        m.model_loaded(Duration::from_secs(1));
        m.batched_step(2, Duration::from_millis(5));
        m.batch_wait("64x64", Duration::from_millis(1));
        let exported = m.render();
        let mut queried = 0;
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(pos) = text[i..].find("kd_") {
            let start = i + pos;
            let end = start
                + bytes[start..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                    .count();
            let name = &text[start..end];
            assert!(
                exported
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                "the dashboard queries `{name}`, which no service exports"
            );
            queried += 1;
            i = end;
        }
        assert!(
            queried >= 10,
            "the dashboard should query the kd_ metrics ({queried} found)"
        );
    }
}
