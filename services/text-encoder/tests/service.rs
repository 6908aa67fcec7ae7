//! The text-encoder service end to end: a real server on 127.0.0.1:0 over the committed tiny
//! prior fixture, real tonic clients.

use candle_core::{DType, Device};
use clap::Parser;
use kd_models::clip::ClipTextEncoder;
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use kd_runtime::launch::LaunchError;
use kd_runtime::launch::STAGE_MESSAGE_LIMIT as MAX_MESSAGE_BYTES;
use kd_runtime::Listeners;
use kd_runtime::Shutdown;
use kd_testkit::{
    assert_health_lifecycle, fixtures_dir, scrape, stage_args, wait_serving, wire, TestServer,
};
use kd_text_encoder::{run_with_listeners, Config};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const SERVICE: &str = "kandinsky.v1.TextEncoder";

fn model_dir() -> std::path::PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior")
}

fn config(extra: &[&str]) -> Config {
    Config::try_parse_from(stage_args("kd-text-encoder", &model_dir(), extra)).unwrap()
}

/// A server whose model load waits for [`TestServer::release`].
async fn start_gated(extra: &[&str]) -> TestServer {
    let config = config(extra);
    TestServer::spawn_gated(|l, s| run_with_listeners(config, l, s)).await
}

/// A server, SERVING.
async fn start(extra: &[&str]) -> TestServer {
    let config = config(extra);
    let server = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&server, SERVICE, Duration::from_secs(60)).await;
    server
}

async fn client(server: &TestServer) -> TextEncoderClient<Channel> {
    TextEncoderClient::new(server.channel().await).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn encode_req(prompts: &[&str]) -> v1::EncodeTextRequest {
    v1::EncodeTextRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
    }
}

#[tokio::test]
async fn health_goes_from_not_serving_to_serving_and_back_on_shutdown() {
    assert_health_lifecycle(start_gated(&[]).await, SERVICE, |channel| async move {
        // While loading, the API answers UNAVAILABLE.
        let err = TextEncoderClient::new(channel)
            .encode_text(encode_req(&["horse"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn encode_over_grpc_equals_the_library_bytes() {
    let server = start(&[]).await;
    let long = "a very long prompt about horses ".repeat(30); // well over 77 tokens
    let prompts = [
        "a photo of a cat",
        "horse",
        "",
        long.as_str(),
        "Кот в сапогах",
    ];
    let resp = client(&server)
        .await
        .encode_text(encode_req(&prompts))
        .await
        .unwrap()
        .into_inner();

    let dir = CheckpointDir::open(model_dir()).unwrap();
    let lib = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = lib.tokenize(&prompts).unwrap();
    let cond = lib.encode_tokens(&tokens).unwrap();
    let pc = resp.prior_conditioning.unwrap();
    assert_eq!(pc.text_embeds.unwrap(), wire(&cond.text_embeds));
    assert_eq!(pc.hidden_states.unwrap(), wire(&cond.hidden_states));
    let mask = pc.attention_mask.unwrap();
    assert_eq!(mask.shape, [5, 77]);
    assert_eq!(mask.dtype, v1::DType::DtypeI64 as i32);
    let mask_lib = cond.mask.to_dtype(DType::I64).unwrap();
    assert_eq!(mask, wire(&mask_lib));
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
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info, model);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_prompts_are_invalid_argument_naming_the_field() {
    let server = start(&["--max-batch", "3"]).await;
    let mut client = client(&server).await;
    let huge = "x".repeat(10_001);
    for (prompts, needle) in [
        (vec![], "allowed 1..=3"),
        (vec!["a", "b", "c", "d"], "4 prompts, allowed 1..=3"),
        (vec!["ok", huge.as_str()], "prompts[1] has 10001 characters"),
    ] {
        let err = client.encode_text(encode_req(&prompts)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("`prompts`"), "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
    }
    // Exactly at the limits is fine.
    let edge = "y".repeat(10_000);
    client
        .encode_text(encode_req(&["a", "b", edge.as_str()]))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_count_requests_by_stage() {
    let server = start(&[]).await;
    client(&server)
        .await
        .encode_text(encode_req(&["horse"]))
        .await
        .unwrap();
    let _ = client(&server).await.encode_text(encode_req(&[])).await;
    let text = scrape(server.metrics).await;
    assert!(
        text.contains(r#"kd_requests_total{method="EncodeText",stage="text_encoder"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"kd_failures_total{method="EncodeText",reason="invalid_argument",stage="text_encoder"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"kd_model_load_seconds{stage="text_encoder"}"#),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_broken_model_folder_fails_the_run() {
    let tmp = std::env::temp_dir().join(format!("kd-te-missing-{}", std::process::id()));
    let config = Config::try_parse_from(stage_args("kd-text-encoder", &tmp, &[])).unwrap();
    let listeners = Listeners::loopback().await.unwrap();
    let err = run_with_listeners(config, listeners, Shutdown::new())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Load(_)), "{err}");
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

/// `--cache-memory-bytes` caps the in-process cache: with room for no entry, a repeated prompt
/// is computed again; with the default, it is served from the cache.
#[tokio::test]
async fn the_in_process_cache_keeps_to_its_byte_cap() {
    for (extra, hits) in [(&["--cache-memory-bytes", "1000"][..], 0.0), (&[][..], 1.0)] {
        let server = start(extra).await;
        let mut c = client(&server).await;
        for _ in 0..2 {
            c.encode_text(encode_req(&["a photo of a cat"]))
                .await
                .unwrap();
        }
        let text = scrape(server.metrics).await;
        let hit = kd_testkit::metric(&text, "kd_cache_requests_total", &[("result", "hit")]);
        assert_eq!(hit.unwrap_or(0.0), hits, "{extra:?}: {text}");
        server.shutdown().await.unwrap();
    }
}

/// Micro-batching: three concurrent calls (1, 2 and 2 prompts) fill one tower call of 5 rows;
/// each gets its own rows, equal to its prompts encoded alone, and the metrics show one model
/// call for three requests. Then the same calls with batching off run one by one.
#[tokio::test]
async fn concurrent_calls_share_one_tower_call_and_each_gets_its_own_rows() {
    let calls: [&[&str]; 3] = [
        &["a red horse"],
        &["a photo of a cat", ""],
        &["Кот в сапогах", "a very long prompt about horses"],
    ];
    let dir = CheckpointDir::open(model_dir()).unwrap();
    let lib = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    for (flags, batches) in [
        (
            &["--max-batch-rows", "5", "--batch-wait-ms", "5000"][..],
            1.0,
        ),
        (&["--max-batch-rows", "0"][..], 3.0),
    ] {
        let server = start(flags).await;
        let (mut c1, mut c2, mut c3) = (
            client(&server).await,
            client(&server).await,
            client(&server).await,
        );
        let (r1, r2, r3) = tokio::join!(
            c1.encode_text(encode_req(calls[0])),
            c2.encode_text(encode_req(calls[1])),
            c3.encode_text(encode_req(calls[2])),
        );
        let mut worst = 0f64;
        for (resp, prompts) in [r1, r2, r3].into_iter().zip(calls) {
            let resp = resp.unwrap().into_inner();
            let alone = lib.encode_tokens(&lib.tokenize(prompts).unwrap()).unwrap();
            let pc = resp.prior_conditioning.unwrap();
            let n = prompts.len() as i64;
            let got = [pc.text_embeds.unwrap(), pc.hidden_states.unwrap()];
            for (g, want) in got.iter().zip([&alone.text_embeds, &alone.hidden_states]) {
                assert_eq!(g.shape[0], n, "{flags:?}: rows of {prompts:?}");
                worst =
                    worst.max(kd_testkit::parity::rel_l2(&kd_testkit::unwire(g), want).unwrap());
            }
            let mask = alone.mask.to_dtype(DType::I64).unwrap();
            assert_eq!(pc.attention_mask.unwrap(), wire(&mask), "{flags:?}");
            assert_eq!(resp.input_ids.unwrap().shape, [n, 77], "{flags:?}");
        }
        // Rows of a larger GEMM may round differently; measured 0 (the tower's GEMMs give each
        // row the same reduction order at any batch).
        assert!(worst <= 1e-6, "{flags:?}: {worst:e}");
        let text = scrape(server.metrics).await;
        let calls_made = kd_testkit::metric(&text, "kd_batch_size_count", &[]);
        let rows = kd_testkit::metric(&text, "kd_batch_size_sum", &[]);
        assert_eq!(
            (calls_made, rows),
            (Some(batches), Some(5.0)),
            "{flags:?}: {text}"
        );
        server.shutdown().await.unwrap();
    }
}
