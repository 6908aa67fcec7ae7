//! Shared test harness: a real in-process denoiser on 127.0.0.1:0, a real tonic client, the
//! fixtures and a `/metrics` scrape over HTTP.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use kd_denoiser::{run_with_listeners, Config};
use kd_proto::v1::{self, denoiser_client::DenoiserClient};
use kd_testkit::{fixtures_dir, stage_args, wire, TestServer};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

pub const SERVICE: &str = "kandinsky.v1.Denoiser";

/// The tiny text2img decoder checkpoint.
pub fn tiny() -> PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-decoder")
}

/// Starts a denoiser on `model_dir` with extra flags; does not wait for readiness.
pub async fn start_with(model_dir: &Path, extra: &[&str]) -> TestServer {
    let config = <Config as clap::Parser>::parse_from(stage_args("kd-denoiser", model_dir, extra));
    TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await
}

/// Starts a denoiser and waits until health says SERVING.
pub async fn start(model_dir: &Path) -> TestServer {
    let s = start_with(model_dir, &[]).await;
    kd_testkit::wait_serving(&s, SERVICE, Duration::from_secs(30)).await;
    s
}

pub async fn client(server: &TestServer) -> DenoiserClient<Channel> {
    DenoiserClient::new(server.channel().await).max_decoding_message_size(512 << 20)
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

/// Sends `req` with a `budget` deadline: the status it ends with.
pub async fn with_deadline(
    c: &mut DenoiserClient<Channel>,
    req: v1::DenoiseRequest,
    budget: Duration,
) -> tonic::Status {
    let mut req = tonic::Request::new(req);
    req.set_timeout(budget);
    match c.denoise(req).await {
        Err(s) => s,
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("finished within {budget:?}"),
                    Err(e) => break e,
                }
            }
        }
    }
}
