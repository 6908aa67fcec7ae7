//! Shared test harness: a real in-process denoiser on 127.0.0.1:0, a real tonic client, the
//! fixtures and a `/metrics` scrape over HTTP.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use kd_denoiser::{run_with_listeners, Config};
use kd_proto::v1::{self, denoiser_client::DenoiserClient};
use kd_runtime::Shutdown;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// `tests/fixtures` of the workspace.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny text2img decoder checkpoint.
pub fn tiny() -> PathBuf {
    fixtures().join("tiny/kandinsky-2-2-decoder")
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Starts a denoiser on `model_dir` with extra flags; does not wait for readiness.
pub async fn start_with(model_dir: &Path, extra: &[&str]) -> Server {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let mut args = vec![
        "kd-denoiser".to_string(),
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = <Config as clap::Parser>::parse_from(args);
    let shutdown = Shutdown::new();
    let task = tokio::spawn(run_with_listeners(config, grpc, metrics, shutdown.clone()));
    Server {
        addr,
        metrics_addr,
        shutdown,
        task,
    }
}

/// Starts a denoiser and waits until health says SERVING.
pub async fn start(model_dir: &Path) -> Server {
    let s = start_with(model_dir, &[]).await;
    wait_serving(s.addr).await;
    s
}

pub async fn channel(addr: SocketAddr) -> Channel {
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {addr} did not start");
}

pub async fn client(addr: SocketAddr) -> DenoiserClient<Channel> {
    DenoiserClient::new(channel(addr).await).max_decoding_message_size(512 << 20)
}

pub async fn health_status(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut h = HealthClient::new(channel(addr).await);
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

pub async fn wait_serving(addr: SocketAddr) {
    for _ in 0..1500 {
        if health_status(addr, "kandinsky.v1.Denoiser").await == ServingStatus::Serving {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("denoiser never became SERVING");
}

/// `GET /metrics` over plain HTTP/1.1.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    buf
}

/// The value of a metric line that starts with `prefix` (e.g. `kd_denoise_steps_total{`).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn wire(t: &Tensor) -> v1::Tensor {
    kd_proto::to_wire(t).unwrap()
}

pub fn unwire(t: &v1::Tensor) -> Tensor {
    kd_proto::from_wire(t, &Device::Cpu, &Default::default()).unwrap()
}

/// Deterministic embeddings (rows, dim) with distinct rows.
pub fn embeds(rows: usize, dim: usize, salt: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * dim)
        .map(|i| (i as f32 * 0.37 + salt).sin())
        .collect();
    Tensor::from_vec(v, (rows, dim), &Device::Cpu).unwrap()
}

/// A text2img request of `rows` rows for the tiny checkpoint (embed dim 32).
pub fn request(rows: usize, steps: u32, seeds: Vec<u64>) -> v1::DenoiseRequest {
    v1::DenoiseRequest {
        conditioning: Some(v1::DecoderConditioning {
            image_embeds: Some(wire(&embeds(rows, 32, 0.0))),
            ..Default::default()
        }),
        negative_conditioning: Some(v1::DecoderConditioning {
            image_embeds: Some(wire(&embeds(1, 32, 1.5))),
            ..Default::default()
        }),
        height: 64,
        width: 64,
        num_inference_steps: steps,
        guidance_scale: 4.0,
        seeds,
        ..Default::default()
    }
}

/// All events of a Denoise call: (progress events, final latents).
pub async fn collect(
    c: &mut DenoiserClient<Channel>,
    req: v1::DenoiseRequest,
) -> Result<(Vec<v1::DenoiseProgress>, v1::Tensor), tonic::Status> {
    let mut stream = c.denoise(req).await?.into_inner();
    let mut progress = Vec::new();
    let mut latents = None;
    while let Some(ev) = stream.message().await? {
        match ev.event.unwrap() {
            v1::denoise_event::Event::Progress(p) => progress.push(p),
            v1::denoise_event::Event::Result(r) => {
                assert!(latents.is_none(), "two results");
                latents = r.latents;
            }
        }
    }
    Ok((progress, latents.expect("a result event")))
}

/// A checkpoint folder whose `unet` and `movq` are links to `src`'s and whose scheduler
/// config is `scheduler_json` (or `src`'s when `None`).
pub fn linked_checkpoint(src: &Path, scheduler_json: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = src.canonicalize().unwrap();
    for c in ["unet", "movq"] {
        std::os::unix::fs::symlink(src.join(c), dir.path().join(c)).unwrap();
    }
    std::fs::create_dir(dir.path().join("scheduler")).unwrap();
    let sched = match scheduler_json {
        Some(s) => s.to_string(),
        None => std::fs::read_to_string(src.join("scheduler/scheduler_config.json")).unwrap(),
    };
    std::fs::write(dir.path().join("scheduler/scheduler_config.json"), sched).unwrap();
    dir
}
