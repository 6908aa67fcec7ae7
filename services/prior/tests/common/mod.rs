//! A real prior server on 127.0.0.1:0 over the committed tiny fixture, and the helpers a
//! gateway-like test client needs.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use kd_models::clip::{ClipTextEncoder, TextConditioning};
use kd_models::prior::ImagePrior;
use kd_models::CheckpointDir;
use kd_prior::{run_with_listeners_gated, Config, MAX_MESSAGE_BYTES};
use kd_proto::v1::prior_client::PriorClient;
use kd_proto::{from_wire, to_wire, v1, TensorLimits};
use kd_runtime::launch::LaunchError;
use kd_runtime::Shutdown;
use kd_testkit::parity::fixtures_dir;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub const SERVICE: &str = "kandinsky.v1.Prior";

pub fn model_dir() -> PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior")
}

pub fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

/// The prompt encoder, in process (the test plays the gateway + text-encoder).
pub fn text() -> &'static ClipTextEncoder {
    static T: OnceLock<ClipTextEncoder> = OnceLock::new();
    T.get_or_init(|| {
        ClipTextEncoder::load(
            &CheckpointDir::open(model_dir()).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    })
}

/// The library sampler the service must agree with.
pub fn library() -> &'static ImagePrior {
    static P: OnceLock<ImagePrior> = OnceLock::new();
    P.get_or_init(|| {
        ImagePrior::load(
            &CheckpointDir::open(model_dir()).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    })
}

/// Conditioning as the text-encoder sends it (mask as i64).
pub fn wire_cond(c: &TextConditioning) -> v1::TextEmbeddings {
    v1::TextEmbeddings {
        text_embeds: Some(to_wire(&c.text_embeds).unwrap()),
        hidden_states: Some(to_wire(&c.hidden_states).unwrap()),
        attention_mask: Some(to_wire(&c.mask.to_dtype(DType::I64).unwrap()).unwrap()),
    }
}

pub fn decode(t: Option<v1::Tensor>) -> Tensor {
    from_wire(&t.unwrap(), &Device::Cpu, &TensorLimits::default()).unwrap()
}

pub struct Server {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), LaunchError>>,
    gate: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Starts a server whose model load waits for [`Server::release`].
    pub async fn start_gated(extra: &[&str]) -> Self {
        let dir = model_dir();
        let mut args = vec![
            "kd-prior",
            "--model-dir",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with_listeners_gated(
            config,
            grpc,
            metrics,
            shutdown.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            grpc: grpc_addr,
            metrics: metrics_addr,
            shutdown,
            task,
            gate: Some(tx),
        }
    }

    pub fn release(&mut self) {
        if let Some(tx) = self.gate.take() {
            let _ = tx.send(());
        }
    }

    /// Starts a server and waits until it reports SERVING.
    pub async fn start(extra: &[&str]) -> Self {
        let mut s = Self::start_gated(extra).await;
        s.release();
        let mut health = HealthClient::new(s.channel().await);
        for _ in 0..600 {
            if status(&mut health, SERVICE).await == ServingStatus::Serving {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server never became SERVING");
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> PriorClient<Channel> {
        PriorClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

pub async fn status(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let r = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// `GET /metrics` over a plain TCP connection.
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
