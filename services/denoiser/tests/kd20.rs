//! The denoiser serving a Kandinsky 2.0 folder (`tests/fixtures/kd20`, the official layout, and
//! `tests/fixtures/kd20-inpaint`): the official guided sampling over gRPC gives the latents of
//! the in-process sampler for the same seeds (p / DDIM / PLMS, text-to-image, image-to-image,
//! inpainting), streams one progress event per sampler step with previews, stops when the caller
//! goes away, and refuses what the family does not take by field name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use kd_models::kd20::{
    Kd20Denoiser, Kd20Sampling, Kd20Task, Kd20Text, Kd20TextConditioning, Kd20TextEncoders,
};
use kd_models::noise::SeededNoise;
use kd_models::schedulers::guided::SamplerKind;
use kd_proto::v1;
use kd_testkit::parity::rel_l2;
use kd_testkit::{fixtures_dir, unwire, wire};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

fn kd20() -> PathBuf {
    fixtures_dir().join("kd20")
}

fn kd20_inpaint() -> PathBuf {
    fixtures_dir().join("kd20-inpaint")
}

fn encoders() -> Kd20TextEncoders {
    Kd20TextEncoders::load(kd20(), DType::F32, &Device::Cpu).unwrap()
}

fn wire_of(c: &Kd20TextConditioning) -> v1::DecoderConditioning {
    v1::DecoderConditioning {
        text_embeds: Some(wire(&c.pooled1)),
        text_hidden_states: Some(wire(&c.full1)),
        text_hidden_states_2: Some(wire(&c.full2)),
        ..Default::default()
    }
}

/// The prompts' and the empty prompt's conditioning, as the text-encoder stage sends them.
fn texts(prompts: &[&str]) -> (Kd20TextConditioning, Kd20TextConditioning) {
    let e = encoders();
    (e.encode(prompts).unwrap(), e.encode(&[""]).unwrap())
}

fn request(prompts: &[&str], seeds: Vec<u64>, scheduler: v1::Scheduler) -> v1::DenoiseRequest {
    let (cond, uncond) = texts(prompts);
    v1::DenoiseRequest {
        conditioning: Some(wire_of(&cond)),
        negative_conditioning: Some(wire_of(&uncond)),
        height: 64,
        width: 128,
        num_inference_steps: 4,
        guidance_scale: 7.0,
        scheduler: scheduler as i32,
        seeds,
        ..Default::default()
    }
}

/// The in-process latents of `task` for `prompts`, the negative broadcast to every row.
fn in_process(
    dir: &Path,
    prompts: &[&str],
    task: &Kd20Task,
    params: &Kd20Sampling,
    seeds: &[u64],
) -> Tensor {
    let d = Kd20Denoiser::load(dir, DType::F32, &Device::Cpu).unwrap();
    let (cond, uncond) = texts(prompts);
    // The negative row broadcast to every image, as the stage does.
    let mut uncond_rows = uncond.clone();
    for _ in 1..prompts.len() {
        uncond_rows = Kd20TextConditioning::cat(&uncond_rows, &uncond).unwrap();
    }
    let text = Kd20Text::from_conditioning(&cond, &uncond_rows).unwrap();
    d.sample(
        &text,
        task,
        params,
        &mut SeededNoise::new(seeds),
        &mut |_| Ok(()),
        &kd_models::interrupt::never,
    )
    .unwrap()
}

fn same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let e = rel_l2(got, want).unwrap();
    eprintln!("{what}: served vs in-process rel L2 {e:e}");
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "{what}: the stage runs the in-process sampler"
    );
}

#[tokio::test]
async fn text2img_latents_equal_the_in_process_sampler_for_every_sampler() {
    let server = start(&kd20()).await;
    let mut c = client(&server).await;
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info.family, v1::ModelFamily::Kandinsky20 as i32);
    assert_eq!(info.decoder_kind, v1::DecoderKind::TextToImage as i32);
    assert_eq!(info.default_steps, 100);
    let prompts = ["рыжая лиса на снегу", "a red fox"];
    for (scheduler, sampler) in [
        (v1::Scheduler::Unspecified, SamplerKind::Ddim),
        (v1::Scheduler::Ddpm, SamplerKind::P),
        (v1::Scheduler::Plms, SamplerKind::Plms),
    ] {
        let mut req = request(&prompts, vec![5, 6], scheduler);
        req.preview_every = 2;
        let (progress, latents) = collect(&mut c, req).await.unwrap();
        let steps: Vec<(u32, u32)> = progress.iter().map(|e| (e.step, e.total_steps)).collect();
        assert_eq!(
            steps,
            (1..=4).map(|s| (s, 4)).collect::<Vec<_>>(),
            "{sampler:?}"
        );
        let previews: Vec<u32> = progress
            .iter()
            .filter(|e| e.preview_latents.is_some())
            .map(|e| e.step)
            .collect();
        assert_eq!(previews, vec![2, 4]);
        let preview = unwire(progress[1].preview_latents.as_ref().unwrap());
        assert_eq!(preview.dims(), &[2, 4, 8, 16]);
        let task = Kd20Task::TextToImage {
            latent_height: 8,
            latent_width: 16,
        };
        let params = Kd20Sampling::new(sampler, 4, 7.0);
        let want = in_process(&kd20(), &prompts, &task, &params, &[5, 6]);
        same(&unwire(&latents), &want, &format!("{sampler:?}"));
    }
    // Each image depends on its own seed only.
    let (_, both) = collect(&mut c, request(&prompts, vec![5, 6], v1::Scheduler::Ddim))
        .await
        .unwrap();
    let (_, one) = collect(&mut c, request(&prompts[1..], vec![6], v1::Scheduler::Ddim))
        .await
        .unwrap();
    let e = rel_l2(
        &unwire(&both).get(1).unwrap(),
        &unwire(&one).get(0).unwrap(),
    )
    .unwrap();
    assert!(e <= 1e-5, "row 1 alone vs in a batch: {e}");
}

#[tokio::test]
async fn img2img_and_inpaint_latents_equal_the_in_process_sampler() {
    let server = start(&kd20()).await;
    let mut c = client(&server).await;
    let init = Tensor::randn(0f32, 1f32, (1, 4, 8, 16), &Device::Cpu).unwrap();
    let mut req = request(&["a house"], vec![9], v1::Scheduler::Ddpm);
    req.image_latents = Some(wire(&init));
    req.strength = 0.5;
    let (progress, latents) = collect(&mut c, req).await.unwrap();
    assert_eq!(progress.len(), 2, "int(4 × (1 − 0.5)) p-sampler steps");
    let task = Kd20Task::ImageToImage {
        latents: init.clone(),
        strength: 0.5,
    };
    let want = in_process(
        &kd20(),
        &["a house"],
        &task,
        &Kd20Sampling::new(SamplerKind::P, 4, 7.0),
        &[9],
    );
    same(&unwire(&latents), &want, "img2img");

    // A mask on the text-to-image model is refused by field.
    let mut req = request(&["a house"], vec![9], v1::Scheduler::Ddim);
    req.image_latents = Some(wire(&init));
    req.mask = Some(wire(
        &Tensor::ones((1, 1, 64, 128), DType::F32, &Device::Cpu).unwrap(),
    ));
    let e = collect(&mut c, req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("mask") && e.message().contains("inpainting"),
        "{e:?}"
    );
    server.shutdown().await.unwrap();

    let server = start(&kd20_inpaint()).await;
    let mut c = client(&server).await;
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info.decoder_kind, v1::DecoderKind::Inpaint as i32);
    // Repaint the right part of the image, not aligned to the latent grid.
    let mut mask = vec![0f32; 64 * 128];
    for (i, v) in mask.iter_mut().enumerate() {
        if i % 128 >= 75 {
            *v = 1.0;
        }
    }
    let mask = Tensor::from_vec(mask, (1, 1, 64, 128), &Device::Cpu).unwrap();
    for (scheduler, sampler) in [
        (v1::Scheduler::Ddpm, SamplerKind::P),
        (v1::Scheduler::Ddim, SamplerKind::Ddim),
    ] {
        let mut req = request(&["a window"], vec![12], scheduler);
        req.image_latents = Some(wire(&init));
        req.mask = Some(wire(&mask));
        let (progress, latents) = collect(&mut c, req).await.unwrap();
        assert_eq!(progress.len(), 4);
        let task = Kd20Task::Inpaint {
            latents: init.clone(),
            keep_mask: mask.affine(-1.0, 1.0).unwrap(),
        };
        let want = in_process(
            &kd20_inpaint(),
            &["a window"],
            &task,
            &Kd20Sampling::new(sampler, 4, 7.0),
            &[12],
        );
        same(&unwire(&latents), &want, &format!("inpaint {sampler:?}"));
    }
    // Text-to-image on the inpainting model is refused by field.
    let e = collect(&mut c, request(&["a house"], vec![1], v1::Scheduler::Ddim))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mask"), "{e:?}");
}

#[tokio::test]
async fn what_the_family_lacks_is_refused_by_field() {
    let server = start(&kd20()).await;
    let mut c = client(&server).await;
    let good = request(&["a cat"], vec![1], v1::Scheduler::Ddim);
    let expect = |e: tonic::Status, field: &str, also: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(also),
            "{field}: {}",
            e.message()
        );
    };
    let zeros = |shape: &[usize]| wire(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap());
    type Edit = Box<dyn Fn(&mut v1::DenoiseRequest)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|r| r.scheduler = v1::Scheduler::Lcm as i32),
            "scheduler",
            "SCHEDULER_PLMS",
        ),
        (
            Box::new(|r| r.timesteps = vec![999]),
            "timesteps",
            "Kandinsky 2.0",
        ),
        (
            Box::new(move |r| r.latents = Some(zeros(&[1, 4, 8, 16]))),
            "latents",
            "Kandinsky 2.0",
        ),
        (
            Box::new(|r| r.masked_tokens = Some(Default::default())),
            "masked_tokens",
            "Kandinsky 2.0",
        ),
        (
            Box::new(move |r| {
                r.conditioning.as_mut().unwrap().image_embeds = Some(zeros(&[1, 32]))
            }),
            "conditioning.image_embeds",
            "Kandinsky 2.0",
        ),
        (
            Box::new(|r| r.negative_conditioning = None),
            "negative_conditioning",
            "classifier-free guidance",
        ),
        (
            Box::new(|r| r.conditioning.as_mut().unwrap().text_hidden_states_2 = None),
            "conditioning.text_hidden_states_2",
            "mT5",
        ),
        (
            Box::new(move |r| {
                r.conditioning.as_mut().unwrap().text_hidden_states = Some(zeros(&[1, 77, 16]))
            }),
            "conditioning.text_hidden_states",
            "(1, 77, 32)",
        ),
        (Box::new(|r| r.seeds = vec![1, 2]), "seeds", "one seed"),
        (Box::new(|r| r.height = 96), "height", "multiple of 64"),
        (
            Box::new(|r| r.guidance_scale = f32::NAN),
            "guidance_scale",
            "0..=100",
        ),
        (
            Box::new(|r| r.num_inference_steps = 1001),
            "num_inference_steps",
            "1..=1000",
        ),
        (Box::new(|r| r.strength = 0.5), "strength", "image_latents"),
        (
            Box::new(move |r| {
                r.image_latents = Some(zeros(&[1, 4, 8, 16]));
                r.strength = 1.0;
            }),
            "strength",
            "",
        ),
        (
            Box::new(move |r| r.image_latents = Some(zeros(&[1, 4, 16, 16]))),
            "image_latents",
            "(1 or 1, 4, 8, 16)",
        ),
    ];
    for (edit, field, also) in cases {
        let mut req = good.clone();
        edit(&mut req);
        expect(collect(&mut c, req).await.unwrap_err(), field, also);
    }
    // The good request still runs.
    collect(&mut c, good).await.unwrap();
}

#[tokio::test]
async fn a_caller_that_goes_away_stops_the_loop() {
    let server = start(&kd20()).await;
    let mut c = client(&server).await;
    let mut req = request(&["a cat"], vec![1], v1::Scheduler::Ddpm);
    req.num_inference_steps = 1000;
    req.height = 512;
    req.width = 512;
    let mut stream = c.denoise(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(v1::denoise_event::Event::Progress(_))
    ));
    drop(stream);
    let quick = request(&["a cat"], vec![2], v1::Scheduler::Ddim);
    tokio::time::timeout(Duration::from_secs(60), collect(&mut c, quick))
        .await
        .expect("the abandoned loop stopped")
        .unwrap();
}
