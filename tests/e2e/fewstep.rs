//! A few-step distilled student (the decoder folder's scheduler is `LCMScheduler`) through the
//! five services: listed as such, served in its own default schedule without CFG, DRAFT in one
//! step, DMD2's explicit timesteps, every image byte-equal to the in-process pipeline; the
//! guidance rule and bad schedules refused with the field named.

use kd_e2e::{list_models, pixels, prior_dir, Model, Stack, STEPS};
use kd_models::pipeline::{Text2Image, Text2ImageRequest};
use kd_models::prior::SampleParams;
use kd_models::CheckpointDir;
use kd_proto::v1::{self, generate_event::Event};
use tonic::Code;

const PROMPT: &str = "a lighthouse at dusk";

/// A request that leaves the decoder's sampling to the model (and the preset).
fn request(seed: u64, decoder: v1::DecoderParams, quality: v1::Quality) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: PROMPT.into(),
        width: Some(64),
        height: Some(64),
        num_images: Some(1),
        seeds: vec![seed],
        prior: Some(v1::PriorParams {
            num_inference_steps: Some(STEPS),
            guidance_scale: Some(4.0),
        }),
        decoder: Some(decoder),
        quality: quality as i32,
        ..Default::default()
    }
}

/// The same generation in one process, on the student folder.
async fn in_process(seed: u64, steps: usize, timesteps: Option<Vec<usize>>) -> image::RgbImage {
    tokio::task::spawn_blocking(move || {
        let p = Text2Image::load(
            &CheckpointDir::open(prior_dir()).unwrap(),
            &CheckpointDir::open(Model::Kandinsky22Student.decoder_dir()).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let out = p
            .generate(&Text2ImageRequest {
                prompt: PROMPT.into(),
                negative_prompt: None,
                height: 64,
                width: 64,
                seeds: vec![seed],
                prior: SampleParams {
                    num_inference_steps: STEPS as usize,
                    guidance_scale: 4.0,
                },
                decoder_steps: steps,
                decoder_guidance: 1.0,
                decoder_timesteps: timesteps,
                task: Default::default(),
            })
            .unwrap();
        out.images.into_iter().next().unwrap()
    })
    .await
    .unwrap()
}

/// Streams `req`; returns the denoiser's (step, total) events and the image.
async fn stream(stack: &Stack, req: v1::GenerateRequest) -> (Vec<(u32, u32)>, v1::GeneratedImage) {
    let mut c = stack.client().await;
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    let (mut steps, mut image) = (vec![], None);
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            Event::Progress(p) if p.stage == v1::Stage::Denoiser as i32 && p.step > 0 => {
                steps.push((p.step, p.total_steps))
            }
            Event::Image(i) => image = Some(i),
            _ => {}
        }
    }
    (steps, image.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_student_is_served_in_its_own_few_steps_as_the_in_process_pipeline() {
    let stack = Stack::start_model(Model::Kandinsky22Student, &[], &[]).await;
    let mut c = stack.client().await;

    let models = list_models(&stack.gateway).await;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m.name, "kandinsky-2-2-distilled");
    assert_eq!(m.family, v1::ModelFamily::Kandinsky22 as i32);
    assert!(m.distilled && m.is_default);
    assert_eq!((m.default_steps, m.default_timesteps.len()), (4, 0));

    // Nothing set: the student's 4 LCM steps, no CFG.
    let (steps, img) = stream(
        &stack,
        request(7, Default::default(), v1::Quality::Unspecified),
    )
    .await;
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert!(
        pixels(&img).as_raw() == in_process(7, 4, None).await.as_raw(),
        "4-step image: services and in-process pipeline differ"
    );

    // DRAFT: one step.
    let (steps, img) = stream(&stack, request(7, Default::default(), v1::Quality::Draft)).await;
    assert_eq!(steps, [(1, 1)]);
    assert!(
        pixels(&img).as_raw() == in_process(7, 1, None).await.as_raw(),
        "1-step image: services and in-process pipeline differ"
    );

    // DMD2's schedule, named explicitly, by name.
    let dmd2 = v1::DecoderParams {
        timesteps: vec![999, 749, 499, 249],
        ..Default::default()
    };
    let mut req = request(9, dmd2, v1::Quality::Unspecified);
    req.model = "kandinsky-2-2-distilled".into();
    let resp = c.generate(req).await.unwrap().into_inner();
    assert_eq!(resp.model, "kandinsky-2-2-distilled");
    let want = in_process(9, 4, Some(vec![999, 749, 499, 249])).await;
    assert!(
        pixels(&resp.images[0]).as_raw() == want.as_raw(),
        "DMD2 image: services and in-process pipeline differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guidance_rule_and_bad_schedules_are_refused_naming_the_field() {
    let stack = Stack::start_model(Model::Kandinsky22Student, &[], &[]).await;
    let mut c = stack.client().await;
    let cases: Vec<(&str, v1::DecoderParams)> = vec![
        (
            "decoder.guidance_scale",
            v1::DecoderParams {
                guidance_scale: Some(4.0),
                ..Default::default()
            },
        ),
        (
            "decoder.timesteps",
            v1::DecoderParams {
                timesteps: vec![249, 499],
                ..Default::default()
            },
        ),
        (
            "decoder.timesteps",
            v1::DecoderParams {
                timesteps: vec![1000, 500],
                ..Default::default()
            },
        ),
        (
            "decoder.timesteps",
            v1::DecoderParams {
                timesteps: vec![999],
                num_inference_steps: Some(4),
                ..Default::default()
            },
        ),
        // Beyond the student's 50 distillation steps: the denoiser's scheduler refuses it.
        (
            "num_inference_steps",
            v1::DecoderParams {
                num_inference_steps: Some(51),
                ..Default::default()
            },
        ),
        // A teacher's scheduler takes no explicit list.
        (
            "timesteps",
            v1::DecoderParams {
                timesteps: vec![999, 499],
                scheduler: v1::Scheduler::Ddpm as i32,
                ..Default::default()
            },
        ),
    ];
    for (field, decoder) in cases {
        let e = c
            .generate(request(1, decoder.clone(), v1::Quality::Unspecified))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{decoder:?}: {e:?}");
        assert!(
            e.message().contains(field) && e.message().contains("llowed"),
            "{decoder:?}: {:?} should name {field} and the allowed values",
            e.message()
        );
    }
    // Guidance ≤ 1 is the student's rule, not an error.
    let ok = v1::DecoderParams {
        guidance_scale: Some(1.0),
        num_inference_steps: Some(2),
        ..Default::default()
    };
    c.generate(request(1, ok, v1::Quality::Unspecified))
        .await
        .unwrap();
}
