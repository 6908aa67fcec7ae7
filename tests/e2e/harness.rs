//! Starts the whole system in one test process: the four stage services and the gateway, each a
//! real gRPC server on its own loopback port (bound to port 0), talking over real connections.

use kd_proto::v1::gateway_client::GatewayClient;
use kd_runtime::server::Listeners;
use kd_runtime::Shutdown;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// The bundled fixture model: the tiny prior and the deep (real 4-level) decoder.
pub fn prior_dir() -> PathBuf {
    kd_testkit::parity::fixtures_dir().join("tiny/kandinsky-2-2-prior")
}

/// The bundled decoder folder.
pub fn decoder_dir() -> PathBuf {
    kd_testkit::parity::fixtures_dir().join("deep/kandinsky-2-2-decoder")
}

/// Which bundled checkpoints a stack serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// The tiny 2.2 prior and the deep (real 4-level) 2.2 decoder.
    Kandinsky22,
    /// The tiny multilingual Kandinsky 2.1 prior and decoder (`tests/fixtures/kd21`).
    Kandinsky21,
    /// As [`Model::Kandinsky21`] with the 9-channel inpainting decoder.
    Kandinsky21Inpaint,
}

impl Model {
    /// The prior folder (text encoder and prior stages).
    pub fn prior_dir(self) -> PathBuf {
        match self {
            Self::Kandinsky22 => prior_dir(),
            Self::Kandinsky21 | Self::Kandinsky21Inpaint => {
                kd_testkit::parity::fixtures_dir().join("kd21/kandinsky-2-1-prior")
            }
        }
    }

    /// The decoder folder (denoiser and MoVQ stages; the 2.1 text encoder's XLM-R).
    pub fn decoder_dir(self) -> PathBuf {
        match self {
            Self::Kandinsky22 => decoder_dir(),
            Self::Kandinsky21 => kd_testkit::parity::fixtures_dir().join("kd21/kandinsky-2-1"),
            Self::Kandinsky21Inpaint => {
                kd_testkit::parity::fixtures_dir().join("kd21/kandinsky-2-1-inpaint")
            }
        }
    }
}

fn args(bin: &str, model_dir: Option<&PathBuf>, extra: &[&str]) -> Vec<String> {
    let mut a = vec![bin.to_string()];
    if let Some(d) = model_dir {
        a.extend([
            "--model-dir".into(),
            d.display().to_string(),
            "--device".into(),
            "cpu".into(),
        ]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A running stage: its gRPC address and its own shutdown signal.
pub struct Running {
    /// gRPC address.
    pub addr: SocketAddr,
    /// `/metrics` address.
    pub metrics: SocketAddr,
    /// Stops this service.
    pub shutdown: Shutdown,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Spawns a service `run(listeners, shutdown)` on `listeners`.
pub fn spawn_on<F, Fut, E>(listeners: Listeners, run: F) -> Running
where
    F: FnOnce(Listeners, Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let (addr, metrics) = (
        listeners.grpc.local_addr().unwrap(),
        listeners.metrics.local_addr().unwrap(),
    );
    let shutdown = Shutdown::new();
    tokio::spawn(run(listeners, shutdown.clone()));
    Running {
        addr,
        metrics,
        shutdown,
    }
}

/// Parses a service's flags.
fn config<C: clap::Parser>(bin: &str, model_dir: &PathBuf, extra: &[&str]) -> C {
    C::parse_from(args(bin, Some(model_dir), extra))
}

/// Starts the MoVQ stage on `listeners`.
pub async fn start_movq(listeners: Listeners) -> Running {
    start_movq_of(Model::Kandinsky22, listeners).await
}

/// Starts the MoVQ stage of `model` on `listeners`.
pub async fn start_movq_of(model: Model, listeners: Listeners) -> Running {
    let c: kd_movq::Config = config("kd-movq", &model.decoder_dir(), &[]);
    spawn_on(listeners, |l, s| kd_movq::run_with_listeners(c, l, s))
}

/// The five services of one deployment.
pub struct Stack {
    pub text_encoder: Running,
    pub prior: Running,
    pub denoiser: Running,
    pub movq: Running,
    pub gateway: Running,
}

impl Stack {
    /// Starts every stage, then the gateway with `gateway_args`, and waits until all are SERVING.
    pub async fn start(gateway_args: &[&str]) -> Self {
        Self::start_with(&[], gateway_args).await
    }

    /// As [`Stack::start`], with extra flags for the text encoder.
    pub async fn start_with(text_encoder_args: &[&str], gateway_args: &[&str]) -> Self {
        Self::start_model(Model::Kandinsky22, text_encoder_args, gateway_args).await
    }

    /// As [`Stack::start_with`], serving `model`.
    pub async fn start_model(
        model: Model,
        text_encoder_args: &[&str],
        gateway_args: &[&str],
    ) -> Self {
        let loopback = || async { Listeners::loopback().await.unwrap() };
        let decoder = format!("--decoder-model-dir={}", model.decoder_dir().display());
        let mut te_args = vec![decoder.as_str()];
        te_args.extend_from_slice(text_encoder_args);
        let te: kd_text_encoder::Config = config("kd-text-encoder", &model.prior_dir(), &te_args);
        let text_encoder = spawn_on(loopback().await, |l, s| {
            kd_text_encoder::run_with_listeners(te, l.grpc, l.metrics, s)
        });
        let pr: kd_prior::Config = config("kd-prior", &model.prior_dir(), &[]);
        let prior = spawn_on(loopback().await, |l, s| {
            kd_prior::run_with_listeners(pr, l.grpc, l.metrics, s)
        });
        let de: kd_denoiser::Config = config("kd-denoiser", &model.decoder_dir(), &[]);
        let denoiser = spawn_on(loopback().await, |l, s| {
            kd_denoiser::run_with_listeners(de, l.grpc, l.metrics, s)
        });
        let movq = start_movq_of(model, Listeners::loopback().await.unwrap()).await;
        let gateway =
            Self::start_gateway(&text_encoder, &prior, &denoiser, movq.addr, gateway_args).await;
        let stack = Self {
            text_encoder,
            prior,
            denoiser,
            movq,
            gateway,
        };
        for (r, service) in [
            (&stack.text_encoder, "kandinsky.v1.TextEncoder"),
            (&stack.prior, "kandinsky.v1.Prior"),
            (&stack.denoiser, "kandinsky.v1.Denoiser"),
            (&stack.movq, "kandinsky.v1.Movq"),
            (&stack.gateway, "kandinsky.v1.Gateway"),
        ] {
            wait_serving(r.addr, service).await;
        }
        stack
    }

    /// Starts a gateway over the given stages.
    pub async fn start_gateway(
        te: &Running,
        prior: &Running,
        denoiser: &Running,
        movq: SocketAddr,
        extra: &[&str],
    ) -> Running {
        let urls = [
            format!("--text-encoder-url=http://{}", te.addr),
            format!("--prior-url=http://{}", prior.addr),
            format!("--denoiser-url=http://{}", denoiser.addr),
            format!("--movq-url=http://{movq}"),
        ];
        let mut a: Vec<&str> = urls.iter().map(String::as_str).collect();
        a.extend_from_slice(extra);
        let c = <kd_gateway::Config as clap::Parser>::parse_from(args("kd-gateway", None, &a));
        spawn_on(Listeners::loopback().await.unwrap(), |l, s| {
            kd_gateway::run_with_listeners(c, l, s)
        })
    }

    /// A client of the gateway.
    pub async fn client(&self) -> GatewayClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.gateway.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        GatewayClient::new(ch).max_decoding_message_size(64 << 20)
    }
}

/// The RGB pixels of a generated image.
pub fn pixels(img: &kd_proto::v1::GeneratedImage) -> image::RgbImage {
    image::load_from_memory(&img.image.as_ref().unwrap().data)
        .unwrap()
        .to_rgb8()
}

/// Waits until `service` at `addr` reports SERVING (at most 120 s).
pub async fn wait_serving(addr: SocketAddr, service: &str) {
    let start = Instant::now();
    loop {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let req = HealthCheckRequest {
            service: service.into(),
        };
        if let Ok(r) = HealthClient::new(ch).check(req).await {
            if r.into_inner().status() == ServingStatus::Serving {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{service} at {addr} is not SERVING"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One scraped Prometheus series value (0 when absent).
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .map(|v| v.parse().unwrap())
        })
        .unwrap_or(0.0)
}
