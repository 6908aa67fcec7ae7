//! One status per failure, seen from a client over real servers: an expired deadline is
//! DEADLINE_EXCEEDED in one message format; bytes that are not a valid message are
//! INVALID_ARGUMENT; a request over the size limit is RESOURCE_EXHAUSTED naming the limit;
//! reflection answers in v1 and v1alpha and lists only what the server serves; StageInfo answers
//! at once while the only execution slot is busy.

use bytes::{Buf, BufMut};
use kd_e2e::Stack;
use kd_proto::v1;
use kd_testkit::{connect, metric_at};
use std::time::{Duration, Instant};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives raw message bytes (to send what no typed client would).
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

/// A unary call of `path` with `body` as the message bytes.
async fn raw_call(ch: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

/// The services a server lists over reflection `version` ("v1" or "v1alpha").
async fn listed(ch: Channel, version: &str) -> Vec<String> {
    use tonic_reflection::pb::v1alpha as alpha;
    // v1 and v1alpha messages are the same on the wire.
    let req = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let path = match version {
        "v1" => "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        _ => "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    };
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<_, alpha::ServerReflectionResponse>::default();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter([req])),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    match first.message_response.unwrap() {
        alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            let mut names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

fn slow_request() -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a red cat".into(),
        width: Some(256),
        height: Some(256),
        seeds: vec![1],
        decoder: Some(v1::DecoderParams {
            num_inference_steps: Some(200),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_failure_has_one_status() {
    let stack = Stack::start(&["--max-message-bytes=100000"]).await;
    let gw = connect(stack.gateway.grpc).await;

    // Deadlines: identical calls whose deadline passes mid-work, or that the denoiser refuses
    // because they could not finish in time, all get DEADLINE_EXCEEDED with one message format
    // (never CANCELLED "Timeout expired").
    let mut c = stack.client().await;
    for timeout_ms in [100u64, 300, 300, 300, 600, 900] {
        let mut req = tonic::Request::new(slow_request());
        req.set_timeout(Duration::from_millis(timeout_ms));
        let e = c.generate(req).await.unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{timeout_ms} ms: {e:?}");
        assert!(
            e.message()
                .starts_with("deadline exceeded: the request deadline"),
            "{timeout_ms} ms: {}",
            e.message()
        );
    }

    // Bytes that are not a GenerateRequest: garbage, and invalid UTF-8 in `prompt` (field 2).
    for body in [vec![0xff; 12], vec![0x12, 0x02, 0xff, 0xfe]] {
        let e = raw_call(gw.clone(), "/kandinsky.v1.Gateway/Generate", body)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("not a valid message"),
            "{}",
            e.message()
        );
    }

    // Over the gateway's message limit (set to 100000 bytes above).
    let e = raw_call(
        gw.clone(),
        "/kandinsky.v1.Gateway/Generate",
        vec![0; 200_000],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("up to 100000 bytes"),
        "{}",
        e.message()
    );

    // Reflection in both versions; each server lists only what it serves.
    for version in ["v1", "v1alpha"] {
        assert_eq!(
            listed(gw.clone(), version).await,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "kandinsky.v1.Gateway",
            ],
            "gateway, reflection {version}"
        );
        assert_eq!(
            listed(connect(stack.movq.grpc).await, version).await,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "kandinsky.v1.Movq",
                "kandinsky.v1.StageInfo",
            ],
            "movq, reflection {version}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stage_info_answers_while_the_only_denoise_slot_is_busy() {
    let stack = Stack::start(&[]).await;
    // A long generation occupies the denoiser's only slot.
    let mut c = stack.client().await;
    let busy = tokio::spawn(async move { c.generate(slow_request()).await });
    let denoiser = connect(stack.denoiser.grpc).await;
    let mut info = v1::stage_info_client::StageInfoClient::new(denoiser);
    // Wait until the loop runs (steps are being counted), then ask.
    let start = Instant::now();
    let steps = [("stage", "denoiser")];
    while metric_at(stack.denoiser.metrics, "kd_denoise_steps_total", &steps).await < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the loop never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let answer = info
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    let took = asked.elapsed();
    assert!(!busy.is_finished(), "the slot was still busy when asked");
    assert!(took < Duration::from_millis(100), "StageInfo took {took:?}");
    assert_eq!(answer.component, "unet");
    assert_eq!(answer.family(), v1::ModelFamily::Kandinsky22);
    busy.abort();
}

/// A TCP relay in front of a stage that can cut every connection at once (the stage "dies").
struct Relay {
    addr: std::net::SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn to(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self { addr, tasks }
    }

    /// Drops every connection and stops accepting.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_that_dies_mid_stream_is_unavailable_naming_it() {
    let stack = Stack::start(&[]).await;
    let relay = Relay::to(stack.denoiser.grpc).await;
    let stages = [
        stack.text_encoder.grpc,
        stack.prior.grpc,
        relay.addr,
        stack.movq.grpc,
    ];
    let gateway = Stack::start_gateway(stages, &[]).await;
    let mut c = kd_e2e::gateway_client(&gateway).await;
    let mut events = c
        .generate_stream(slow_request())
        .await
        .unwrap()
        .into_inner();
    // Wait for the first denoising step, then the denoiser "dies".
    loop {
        let ev = events.message().await.unwrap().expect("the stream is open");
        if let Some(v1::generate_event::Event::Progress(p)) = ev.event {
            if p.stage == v1::Stage::Denoiser as i32 && p.step >= 1 {
                break;
            }
        }
    }
    relay.cut();
    let err = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("denoiser"), "{}", err.message());
}
