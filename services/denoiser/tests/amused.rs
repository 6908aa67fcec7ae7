//! The denoiser serving an aMUSEd folder (`tests/fixtures/tiny/amused-256`): the token generator
//! over gRPC gives the token map of the in-process pipeline for the same seeds (text-to-image,
//! image-to-image, inpainting), streams one progress event per token step with previews, stops
//! when the caller goes away, and refuses what the family does not take by field name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use kd_models::amused::{AmusedPipeline, MicroConds, TokenParams, TokenTask};
use kd_models::noise::SeededNoise;
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_testkit::{fixtures_dir, unwire, wire};
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

fn amused() -> PathBuf {
    fixtures_dir().join("tiny/amused-256")
}

fn pipeline() -> AmusedPipeline {
    AmusedPipeline::load(
        &CheckpointDir::open(amused()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The conditioning of `prompts` (and of "" as the negative) as the text-encoder stage sends it.
fn conditioning(
    p: &AmusedPipeline,
    prompts: &[&str],
) -> (v1::DecoderConditioning, v1::DecoderConditioning) {
    let t = p.encode_text(prompts, &[], true).unwrap();
    let wire_of = |c: &kd_models::clip::TextConditioning| v1::DecoderConditioning {
        text_embeds: Some(wire(&c.text_embeds)),
        text_hidden_states: Some(wire(&c.hidden_states)),
        ..Default::default()
    };
    let uncond = t.uncond.unwrap().row(0).unwrap();
    (wire_of(&t.cond), wire_of(&uncond))
}

fn request(p: &AmusedPipeline, prompts: &[&str], seeds: Vec<u64>) -> v1::DenoiseRequest {
    let (cond, uncond) = conditioning(p, prompts);
    v1::DenoiseRequest {
        conditioning: Some(cond),
        negative_conditioning: Some(uncond),
        height: 64,
        width: 64,
        num_inference_steps: 6,
        guidance_scale: 10.0,
        seeds,
        ..Default::default()
    }
}

/// The in-process token map of `task` with `params` for `prompts` and `seeds`.
fn in_process(
    p: &AmusedPipeline,
    prompts: &[&str],
    task: &TokenTask,
    params: &TokenParams,
    seeds: &[u64],
) -> Tensor {
    let text = p.encode_text(prompts, &[], params.guided()).unwrap();
    let mut noise = SeededNoise::new(seeds);
    p.generate_tokens(&text, task, params, &mut noise, &mut |_, _, _| {})
        .unwrap()
}

fn ids(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[tokio::test]
async fn text2img_tokens_equal_the_in_process_pipeline() {
    let server = start(&amused()).await;
    let mut c = client(&server).await;
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info.family, v1::ModelFamily::Amused as i32);
    assert_eq!(info.default_steps, 12);
    assert_eq!(info.native_size, 16);
    let p = pipeline();
    let prompts = ["a red cat", "a blue dog"];
    let mut req = request(&p, &prompts, vec![3, 4]);
    req.preview_every = 2;
    req.masked_tokens = Some(v1::MaskedTokenParams {
        temperature_start: Some(1.5),
        aesthetic_score: Some(5.0),
        crop_top: 4,
        ..Default::default()
    });
    let (progress, tokens) = collect(&mut c, req).await.unwrap();
    let steps: Vec<(u32, u32)> = progress.iter().map(|e| (e.step, e.total_steps)).collect();
    assert_eq!(steps, (1..=6).map(|s| (s, 6)).collect::<Vec<_>>());
    let previews: Vec<u32> = progress
        .iter()
        .filter(|e| e.preview_latents.is_some())
        .map(|e| e.step)
        .collect();
    assert_eq!(previews, vec![2, 4, 6]);
    let preview = unwire(progress[1].preview_latents.as_ref().unwrap());
    assert_eq!(preview.dims(), &[2, 32, 32]);
    let tokens = unwire(&tokens);
    assert_eq!(tokens.dims(), &[2, 32, 32]);
    let params = TokenParams {
        steps: 6,
        guidance_scale: 10.0,
        temperature: (1.5, 0.0),
        micro: MicroConds {
            aesthetic_score: 5.0,
            crop_coord: (4.0, 0.0),
        },
    };
    let task = TokenTask::TextToImage {
        height: 64,
        width: 64,
    };
    let want = in_process(&p, &prompts, &task, &params, &[3, 4]);
    assert_eq!(ids(&tokens), ids(&want));
    // Each image depends on its own seed only.
    let one = in_process(&p, &prompts[1..], &task, &params, &[4]);
    assert_eq!(ids(&tokens.get(1).unwrap()), ids(&one));
}

#[tokio::test]
async fn img2img_and_inpaint_tokens_equal_the_in_process_pipeline() {
    let server = start(&amused()).await;
    let mut c = client(&server).await;
    let p = pipeline();
    let image = Tensor::rand(0f32, 1f32, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let init = p.encode_image(&image).unwrap();
    let params = TokenParams {
        steps: 6,
        ..Default::default()
    };

    let mut req = request(&p, &["a cat"], vec![11]);
    req.image_latents = Some(wire(&init.to_dtype(DType::I64).unwrap()));
    req.strength = 0.5;
    let (progress, tokens) = collect(&mut c, req).await.unwrap();
    assert_eq!(progress.len(), 3, "int(6 × 0.5) steps");
    let task = TokenTask::ImageToImage {
        tokens: init.clone(),
        strength: 0.5,
    };
    let want = in_process(&p, &["a cat"], &task, &params, &[11]);
    assert_eq!(ids(&unwire(&tokens)), ids(&want));

    let mut mask = vec![0f32; 32 * 32];
    for v in mask.iter_mut().skip(16 * 32) {
        *v = 1.0;
    }
    let mask = Tensor::from_vec(mask, (1, 1, 32, 32), &Device::Cpu).unwrap();
    let mut req = request(&p, &["a window"], vec![12]);
    req.image_latents = Some(wire(&init.to_dtype(DType::I64).unwrap()));
    req.mask = Some(wire(&mask));
    let (progress, tokens) = collect(&mut c, req).await.unwrap();
    assert_eq!(progress.len(), 6, "inpainting's unset strength is 1");
    let task = TokenTask::Inpaint {
        tokens: init.clone(),
        mask,
        strength: 1.0,
    };
    let want = in_process(&p, &["a window"], &task, &params, &[12]);
    let got = ids(&unwire(&tokens));
    assert_eq!(got, ids(&want));
    // The kept half is the init image's tokens.
    assert_eq!(got[..16 * 32], ids(&init)[..16 * 32]);
}

#[tokio::test]
async fn what_the_family_lacks_is_refused_by_field() {
    let server = start(&amused()).await;
    let mut c = client(&server).await;
    let p = pipeline();
    let good = request(&p, &["a cat"], vec![1]);
    let expect = |e: tonic::Status, field: &str, also: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(also),
            "{field}: {}",
            e.message()
        );
    };
    let zeros = |shape: &[usize], dt: DType| wire(&Tensor::zeros(shape, dt, &Device::Cpu).unwrap());

    let mut req = good.clone();
    req.conditioning.as_mut().unwrap().image_embeds = Some(zeros(&[1, 32], DType::F32));
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "conditioning.image_embeds",
        "aMUSEd",
    );
    let mut req = good.clone();
    req.scheduler = v1::Scheduler::Ddim as i32;
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "scheduler",
        "aMUSEd",
    );
    let mut req = good.clone();
    req.timesteps = vec![999];
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "timesteps",
        "aMUSEd",
    );
    let mut req = good.clone();
    req.image_latents = Some(zeros(&[1, 8, 32, 32], DType::F32));
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "image_latents",
        "integer token map",
    );
    let mut req = good.clone();
    req.image_latents = Some(zeros(&[1, 16, 16], DType::I64));
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "image_latents",
        "(1, 32, 32)",
    );
    let mut req = good.clone();
    req.image_latents = Some(wire(
        &Tensor::full(1000i64, (1, 32, 32), &Device::Cpu).unwrap(),
    ));
    req.strength = 0.5;
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "image_latents",
        "codebook",
    );
    let mut req = good.clone();
    req.image_latents = Some(zeros(&[1, 32, 32], DType::I64));
    req.strength = 0.1;
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "strength",
        "runs no step",
    );
    let mut req = good.clone();
    req.negative_conditioning = None;
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "negative_conditioning",
        "guidance_scale",
    );
    let mut req = good.clone();
    req.masked_tokens = Some(v1::MaskedTokenParams {
        temperature_end: Some(f32::NAN),
        ..Default::default()
    });
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "masked_tokens.temperature_end",
        "0..=100",
    );
    let mut req = good.clone();
    req.masked_tokens = Some(v1::MaskedTokenParams {
        aesthetic_score: Some(11.0),
        ..Default::default()
    });
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "masked_tokens.aesthetic_score",
        "0..=10",
    );
    let mut req = good.clone();
    req.height = 96;
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "height",
        "multiple of 64",
    );
    let mut req = good.clone();
    req.conditioning.as_mut().unwrap().text_hidden_states = Some(zeros(&[1, 77, 16], DType::F32));
    expect(
        collect(&mut c, req).await.unwrap_err(),
        "conditioning.text_hidden_states",
        "32",
    );
    // The good request still runs.
    collect(&mut c, good).await.unwrap();
}

#[tokio::test]
async fn a_caller_that_goes_away_stops_the_loop() {
    let server = start(&amused()).await;
    let mut c = client(&server).await;
    let p = pipeline();
    let mut req = request(&p, &["a cat"], vec![1]);
    req.num_inference_steps = 1000;
    req.height = 512;
    req.width = 512;
    let mut stream = c.denoise(req).await.unwrap().into_inner();
    // The first step arrives, then the caller leaves.
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(v1::denoise_event::Event::Progress(_))
    ));
    drop(stream);
    // The stage is free again well before 1000 steps could run: a short request completes.
    let quick = request(&p, &["a cat"], vec![2]);
    tokio::time::timeout(Duration::from_secs(60), collect(&mut c, quick))
        .await
        .expect("the abandoned loop stopped")
        .unwrap();
}
