//! The gateway over real gRPC on loopback: input validation, a stage that is down, auth, health.

use kd_gateway::{run_with_listeners, Config};
use kd_proto::v1::{self, gateway_client::GatewayClient, generate_request::Task};
use kd_testkit::{connect, TestServer};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

/// A loopback port with nothing listening (bound, then released).
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

async fn start(api_keys: Option<&str>) -> (TestServer, Option<tempfile::NamedTempFile>) {
    start_with(api_keys, &[]).await
}

/// A gateway over stage addresses where nothing listens.
async fn start_with(
    api_keys: Option<&str>,
    extra: &[&str],
) -> (TestServer, Option<tempfile::NamedTempFile>) {
    let keys_file = api_keys.map(|k| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), format!("# keys\n{k}\n")).unwrap();
        f
    });
    let mut args = vec!["kd-gateway".to_string()];
    for flag in [
        "--text-encoder-url",
        "--prior-url",
        "--denoiser-url",
        "--movq-url",
    ] {
        args.push(flag.into());
        args.push(dead_url().await);
    }
    if let Some(f) = &keys_file {
        args.push("--api-keys-file".into());
        args.push(f.path().display().to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let config = <Config as clap::Parser>::parse_from(args);
    let server = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    (server, keys_file)
}

async fn client(addr: SocketAddr) -> GatewayClient<Channel> {
    GatewayClient::new(connect(addr).await)
}

fn valid() -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a red cat".into(),
        width: Some(64),
        height: Some(64),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let (server, _) = start(None).await;
    let addr = server.grpc;
    let mut c = client(addr).await;
    type Edit = fn(&mut v1::GenerateRequest);
    let cases: Vec<(&str, Edit)> = vec![
        ("prompt", |r| r.prompt = "   ".into()),
        ("prompt", |r| r.prompt = "x".repeat(5000)),
        ("negative_prompt", |r| r.negative_prompt = "y".repeat(5000)),
        ("width", |r| r.width = Some(0)),
        ("height", |r| r.height = Some(1_000_000)),
        ("width", |r| r.width = Some(100)),
        ("num_images", |r| r.num_images = Some(0)),
        ("num_images", |r| r.num_images = Some(99)),
        ("seeds", |r| {
            r.num_images = Some(2);
            r.seeds = vec![1, 2, 3];
        }),
        ("prior.num_inference_steps", |r| {
            r.prior = Some(v1::PriorParams {
                num_inference_steps: Some(1),
                guidance_scale: None,
            })
        }),
        ("decoder.num_inference_steps", |r| {
            r.decoder = Some(v1::DecoderParams {
                num_inference_steps: Some(0),
                ..Default::default()
            })
        }),
        ("decoder.num_inference_steps", |r| {
            r.decoder = Some(v1::DecoderParams {
                num_inference_steps: Some(5000),
                ..Default::default()
            })
        }),
        ("decoder.guidance_scale", |r| {
            r.decoder = Some(v1::DecoderParams {
                guidance_scale: Some(f32::NAN),
                ..Default::default()
            })
        }),
        ("prior.guidance_scale", |r| {
            r.prior = Some(v1::PriorParams {
                guidance_scale: Some(-1.0),
                num_inference_steps: None,
            })
        }),
        ("decoder.scheduler", |r| {
            r.decoder = Some(v1::DecoderParams {
                scheduler: 42,
                ..Default::default()
            })
        }),
        ("output.format", |r| {
            r.output = Some(v1::OutputOptions {
                format: 9,
                quality: 0,
            })
        }),
        ("output.quality", |r| {
            r.output = Some(v1::OutputOptions {
                format: v1::ImageFormat::Jpeg as i32,
                quality: 101,
            })
        }),
        ("model", |r| r.model = "kandinsky-3".into()),
        ("preview_every", |r| {
            r.decoder = Some(v1::DecoderParams {
                num_inference_steps: Some(5),
                ..Default::default()
            });
            r.preview_every = 6;
        }),
        ("image_to_image.image", |r| {
            r.task = Some(Task::ImageToImage(v1::ImageToImage {
                image: vec![],
                strength: None,
                hint: Vec::new(),
            }))
        }),
        ("image_to_image.strength", |r| {
            r.task = Some(Task::ImageToImage(v1::ImageToImage {
                image: vec![1],
                strength: Some(1.5),
                hint: Vec::new(),
            }))
        }),
        ("inpaint.mask", |r| {
            r.task = Some(Task::Inpaint(v1::Inpaint {
                image: vec![1],
                mask: vec![],
            }))
        }),
        ("fusion.items", |r| {
            r.task = Some(Task::Fusion(v1::Fusion { items: vec![] }))
        }),
        ("fusion.items[0].weight", |r| {
            r.task = Some(Task::Fusion(v1::Fusion {
                items: vec![v1::FusionItem {
                    item: Some(v1::fusion_item::Item::Text("a".into())),
                    weight: f32::INFINITY,
                }],
            }))
        }),
        ("outpaint", |r| {
            r.task = Some(Task::Outpaint(v1::Outpaint {
                image: vec![1],
                ..Default::default()
            }))
        }),
    ];
    assert!(cases.len() >= 15);
    for (field, edit) in cases {
        let mut req = valid();
        edit(&mut req);
        let err = c.generate(req.clone()).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(&format!("invalid `{field}`")),
            "{field}: {}",
            err.message()
        );
        // The streaming call validates the same way, before any event.
        let err = c.generate_stream(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field} (stream)");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stage_that_is_down_is_unavailable_naming_the_stage() {
    let (server, _) = start(None).await;
    let addr = server.grpc;
    let mut c = client(addr).await;
    let err = c.generate(valid()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("stage text_encoder is unavailable"),
        "{}",
        err.message()
    );
    // Streaming: the error arrives after the queued event.
    let mut s = c.generate_stream(valid()).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(v1::generate_event::Event::Progress(_))
    ));
    loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without the error"),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable);
                break;
            }
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn api_keys_are_enforced_when_configured() {
    let (server, _keys) = start(Some("s3cret")).await;
    let addr = server.grpc;
    let mut c = client(addr).await;
    let err = c.generate(valid()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization: Bearer"));
    let mut req = tonic::Request::new(valid());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        c.generate(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut req = tonic::Request::new(valid());
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    // Authenticated: passes auth and reaches the (down) stages.
    assert_eq!(c.generate(req).await.unwrap_err().code(), Code::Unavailable);
    // Listing models needs the key too; health does not.
    assert_eq!(
        c.list_models(v1::ListModelsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kandinsky.v1.Gateway".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    server.shutdown().await.unwrap();
}

/// `Generate` with `authorization: <value>`: the code (UNAVAILABLE = past auth, the stages are
/// down).
async fn auth_code(c: &mut GatewayClient<Channel>, value: &str) -> Code {
    let mut req = tonic::Request::new(valid());
    req.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    c.generate(req).await.unwrap_err().code()
}

#[tokio::test]
async fn a_keys_file_without_a_key_stops_the_start_instead_of_turning_auth_off() {
    for text in ["", "# keys come later\n\n", "k1 # the old key\n"] {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let path = f.path().display().to_string();
        let (mut server, _) = start_with(None, &["--api-keys-file", &path]).await;
        let err = server.join().await.unwrap_err();
        assert!(
            err.contains("--api-keys-file") && err.contains("allowed"),
            "{text:?}: {err}"
        );
    }
}

#[tokio::test]
async fn the_scheme_is_case_insensitive_and_a_rotated_keys_file_is_picked_up_live() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "# rotation 1\nfirst\n").unwrap();
    let path = f.path().display().to_string();
    let args = ["--api-keys-file", &path, "--api-keys-reload-secs", "0.1"];
    let (server, _) = start_with(None, &args).await;
    let mut c = client(server.grpc).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let code = auth_code(&mut c, &format!("{scheme} first")).await;
        assert_eq!(code, Code::Unavailable, "{scheme}");
    }
    assert_eq!(
        auth_code(&mut c, "Basic first").await,
        Code::Unauthenticated
    );

    // A Secret rotation: the new key works and the old one stops, without a restart.
    std::fs::write(f.path(), "# rotation 2\nsecond\n").unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while auth_code(&mut c, "Bearer second").await != Code::Unavailable {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was never accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        auth_code(&mut c, "Bearer first").await,
        Code::Unauthenticated
    );
    // A broken rewrite keeps the keys that were good.
    std::fs::write(f.path(), "").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(auth_code(&mut c, "Bearer second").await, Code::Unavailable);
    server.shutdown().await.unwrap();
}

fn outpaint(left: u32, top: u32, right: u32, bottom: u32) -> v1::GenerateRequest {
    let mut r = valid();
    r.task = Some(Task::Outpaint(v1::Outpaint {
        image: vec![1],
        left,
        top,
        right,
        bottom,
    }));
    r
}

#[tokio::test]
async fn outpaint_margins_that_overflow_are_invalid_argument_not_a_panic() {
    let (server, _) = start(None).await;
    let addr = server.grpc;
    let mut c = client(addr).await;
    let cases = [
        (
            outpaint(2147483648, 0, 2147483648, 0),
            "invalid `outpaint.left`",
        ),
        (outpaint(0, u32::MAX, 0, u32::MAX), "invalid `outpaint.top`"),
        (outpaint(1500, 0, 1500, 0), "left + right = 1500 + 1500"),
        (outpaint(0, 2048, 0, 1), "top + bottom = 2048 + 1"),
    ];
    for (req, want) in cases {
        let err = c.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    // The gateway still serves after them.
    let err = c.generate(valid()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    server.shutdown().await.unwrap();
}

fn image_to_image(bytes: usize) -> v1::GenerateRequest {
    let mut r = valid();
    r.task = Some(Task::ImageToImage(v1::ImageToImage {
        image: vec![7; bytes],
        strength: None,
        hint: Vec::new(),
    }));
    r
}

async fn big_client(addr: SocketAddr) -> GatewayClient<Channel> {
    client(addr)
        .await
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

#[tokio::test]
async fn the_transport_takes_a_32_mib_image_and_refuses_a_larger_request_naming_the_limit() {
    // Default limit (64 MiB): a 32 MiB image passes the transport and validation, and reaches
    // the (down) stages.
    let (server, _) = start(None).await;
    let addr = server.grpc;
    let mut c = big_client(addr).await;
    let err = c.generate(image_to_image(32 << 20)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    server.shutdown().await.unwrap();

    // A lowered limit: a request over it is refused naming the limit, before any stage call.
    let (server, _) = start_with(None, &["--max-message-bytes", "1000000"]).await;
    let addr = server.grpc;
    let mut c = big_client(addr).await;
    let err = c.generate(image_to_image(2_000_000)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::InvalidArgument),
        "{err:?}"
    );
    assert!(err.message().contains("1000000"), "{}", err.message());
    let err = c.generate(image_to_image(900_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    server.shutdown().await.unwrap();
}

/// A gateway whose default set has no prior (`--prior-url none`) plus `extra`, over stage
/// addresses where nothing listens.
async fn start_without_prior(extra: &[&str]) -> TestServer {
    let mut args = vec!["kd-gateway".to_string(), "--prior-url=none".into()];
    for flag in ["--text-encoder-url", "--denoiser-url", "--movq-url"] {
        args.push(format!("{flag}={}", dead_url().await));
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let config = <Config as clap::Parser>::parse_from(args);
    TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await
}

#[tokio::test]
async fn stage_sets_without_a_prior_start_and_a_misplaced_none_stops_the_start() {
    let spec = format!(
        "--extra-stack=text-encoder={},denoiser={},movq={}",
        dead_url().await,
        dead_url().await,
        dead_url().await
    );
    let server = start_without_prior(&[&spec]).await;
    let mut c = client(server.grpc).await;
    // Loaded: the first stage asked is the text encoder, which is down.
    let err = c.generate(valid()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("stage text_encoder is unavailable"),
        "{}",
        err.message()
    );
    server.shutdown().await.unwrap();

    // `none` listed with an address is a start-up error naming the flag.
    let (mut server, _) = start_with(None, &["--prior-url", "none"]).await;
    let err = server.join().await.unwrap_err();
    assert!(
        err.contains("--prior-url") && err.contains("stands alone"),
        "{err}"
    );
    // So is an extra stack that lacks a stage other than the prior.
    let mut server = start_without_prior(&["--extra-stack=text-encoder=http://t:1"]).await;
    let err = server.join().await.unwrap_err();
    assert!(
        err.contains("--extra-stack") && err.contains("missing denoiser, movq"),
        "{err}"
    );
}
