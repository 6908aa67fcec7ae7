//! The text-encoder service end to end: a real server on 127.0.0.1:0 over the committed tiny
//! prior fixture, real tonic clients.

use candle_core::{DType, Device};
use clap::Parser;
use kd_models::clip::ClipTextEncoder;
use kd_models::CheckpointDir;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use kd_proto::{to_wire, v1};
use kd_runtime::launch::LaunchError;
use kd_runtime::Shutdown;
use kd_testkit::parity::fixtures_dir;
use kd_text_encoder::{run_with_listeners_gated, Config, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICE: &str = "kandinsky.v1.TextEncoder";

fn model_dir() -> std::path::PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior")
}

struct Server {
    grpc: SocketAddr,
    metrics: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), LaunchError>>,
    gate: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Starts a server whose model load waits for [`Server::release`].
    async fn start_gated(extra: &[&str]) -> Self {
        let dir = model_dir();
        let mut args = vec![
            "kd-text-encoder",
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

    fn release(&mut self) {
        if let Some(tx) = self.gate.take() {
            let _ = tx.send(());
        }
    }

    /// Starts a server and waits until it reports SERVING.
    async fn start(extra: &[&str]) -> Self {
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

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> TextEncoderClient<Channel> {
        TextEncoderClient::new(self.channel().await).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }
}

async fn status(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
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
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    buf
}

fn encode_req(prompts: &[&str]) -> v1::EncodeTextRequest {
    v1::EncodeTextRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
    }
}

#[tokio::test]
async fn health_goes_from_not_serving_to_serving_and_back_on_shutdown() {
    let mut server = Server::start_gated(&[]).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(
        status(&mut health, SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(status(&mut health, "").await, ServingStatus::NotServing);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::NotServing as i32);
    // While loading, the API answers UNAVAILABLE.
    let err = TextEncoderClient::new(channel.clone())
        .encode(encode_req(&["horse"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    server.release();
    let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::Serving as i32);
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving);

    server.shutdown.trigger();
    let last = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap();
    if let Ok(Some(m)) = last {
        assert_eq!(m.status, ServingStatus::NotServing as i32);
    }
    // An open Watch stream would hold the graceful drain open: close the client side.
    drop((watch, health, channel));
    tokio::time::timeout(Duration::from_secs(20), server.task)
        .await
        .expect("server stops once its calls are closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn encode_over_grpc_equals_the_library_bytes() {
    let server = Server::start(&[]).await;
    let long = "a very long prompt about horses ".repeat(30); // well over 77 tokens
    let prompts = [
        "a photo of a cat",
        "horse",
        "",
        long.as_str(),
        "Кот в сапогах",
    ];
    let resp = server
        .client()
        .await
        .encode(encode_req(&prompts))
        .await
        .unwrap()
        .into_inner();

    let dir = CheckpointDir::open(model_dir()).unwrap();
    let lib = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = lib.tokenize(&prompts).unwrap();
    let cond = lib.encode_tokens(&tokens).unwrap();
    let pc = resp.prior_conditioning.unwrap();
    assert_eq!(pc.text_embeds.unwrap(), to_wire(&cond.text_embeds).unwrap());
    assert_eq!(
        pc.hidden_states.unwrap(),
        to_wire(&cond.hidden_states).unwrap()
    );
    let mask = pc.attention_mask.unwrap();
    assert_eq!(mask.shape, [5, 77]);
    assert_eq!(mask.dtype, v1::DType::DtypeI64 as i32);
    let mask_lib = cond.mask.to_dtype(DType::I64).unwrap();
    assert_eq!(mask, to_wire(&mask_lib).unwrap());
    let ids = resp.input_ids.unwrap();
    assert_eq!(ids.shape, [5, 77]);
    let first_row: Vec<i64> = ids.data[..7 * 8]
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(first_row, [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(resp.decoder_conditioning.is_none());

    let model = resp.model.unwrap();
    assert_eq!(model.component, "text_encoder");
    assert_eq!(model.family, v1::ModelFamily::Kandinsky22 as i32);
    assert_eq!(model.dtype, v1::DType::DtypeF32 as i32);
    assert_eq!(model.device, "cpu");
    assert_eq!(model.revision.len(), 12);
    let info = server
        .client()
        .await
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info, model);
    server.stop().await;
}

#[tokio::test]
async fn bad_prompts_are_invalid_argument_naming_the_field() {
    let server = Server::start(&["--max-batch", "3"]).await;
    let mut client = server.client().await;
    let huge = "x".repeat(10_001);
    for (prompts, needle) in [
        (vec![], "allowed 1..=3"),
        (vec!["a", "b", "c", "d"], "4 prompts, allowed 1..=3"),
        (vec!["ok", huge.as_str()], "prompts[1] has 10001 characters"),
    ] {
        let err = client.encode(encode_req(&prompts)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("`prompts`"), "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
    }
    // Exactly at the limits is fine.
    let edge = "y".repeat(10_000);
    client
        .encode(encode_req(&["a", "b", edge.as_str()]))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_stage() {
    let server = Server::start(&[]).await;
    server
        .client()
        .await
        .encode(encode_req(&["horse"]))
        .await
        .unwrap();
    let _ = server.client().await.encode(encode_req(&[])).await;
    let text = scrape(server.metrics).await;
    assert!(
        text.contains(r#"kd_requests_total{method="Encode",stage="text_encoder"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"kd_failures_total{method="Encode",reason="invalid_argument",stage="text_encoder"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"kd_model_load_seconds{stage="text_encoder"}"#),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_broken_model_folder_fails_the_run() {
    let tmp = std::env::temp_dir().join(format!("kd-te-missing-{}", std::process::id()));
    let config = Config::try_parse_from([
        "kd-text-encoder",
        "--model-dir",
        tmp.to_str().unwrap(),
        "--device",
        "cpu",
    ])
    .unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = kd_text_encoder::run_with_listeners(config, grpc, metrics, Shutdown::new())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Load(_)), "{err}");
    assert!(err.to_string().contains("model_index.json"), "{err}");
}
