//! A real prior server on 127.0.0.1:0 over the committed tiny fixture, and the helpers a
//! gateway-like test client needs.
#![allow(dead_code)]

use candle_core::{DType, Device};
use clap::Parser;
use kd_models::clip::{ClipTextEncoder, TextConditioning};
use kd_models::prior::ImagePrior;
use kd_models::CheckpointDir;
use kd_prior::{run_with_listeners, Config};

/// The stages' default message limit.
const MAX_MESSAGE_BYTES: usize = kd_runtime::launch::STAGE_MESSAGE_LIMIT;
use kd_proto::v1;
use kd_proto::v1::prior_client::PriorClient;
use kd_testkit::{fixtures_dir, stage_args, wait_serving, wire, TestServer};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::Channel;

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
        text_embeds: Some(wire(&c.text_embeds)),
        hidden_states: Some(wire(&c.hidden_states)),
        attention_mask: Some(wire(&c.mask.to_dtype(DType::I64).unwrap())),
    }
}

fn config(extra: &[&str]) -> Config {
    Config::try_parse_from(stage_args("kd-prior", &model_dir(), extra)).unwrap()
}

/// A prior server whose model load waits for [`TestServer::release`].
pub async fn start_gated(extra: &[&str]) -> TestServer {
    let config = config(extra);
    TestServer::spawn_gated(|l, s| run_with_listeners(config, l, s)).await
}

/// A prior server, SERVING.
pub async fn start(extra: &[&str]) -> TestServer {
    let config = config(extra);
    let server = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&server, SERVICE, Duration::from_secs(60)).await;
    server
}

pub async fn client(server: &TestServer) -> PriorClient<Channel> {
    PriorClient::new(server.channel().await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
