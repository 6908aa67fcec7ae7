//! Bad decoder input gives a clear `InvalidInput`; the step callback can cancel; seeded noise
//! is reproducible.

use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::decoder::{
    latent_side, prepare_inpaint_mask, run_decoder, DecoderInputs, DecoderMode, DecoderOutcome,
    DecoderText,
};
use kd_models::noise::SeededNoise;
use kd_models::schedulers::{self, Scheduler};
use kd_models::unet::UNet2DConditionModel;
use kd_models::{CheckpointDir, ModelError, Result, Variant};
use kd_testkit::parity::fixtures_dir;

fn load(ckpt: &str) -> (UNet2DConditionModel, SchedulerConfig) {
    let dir = CheckpointDir::open(fixtures_dir().join("tiny").join(ckpt)).unwrap();
    let unet = dir.component("unet").unwrap();
    let vb = unet
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let model = UNet2DConditionModel::new(&unet.unet_config().unwrap(), vb).unwrap();
    let sched = dir
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap();
    (model, sched)
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn params(pos: &Tensor, neg: &Tensor) -> DecoderInputs {
    DecoderInputs {
        image_embeds: pos.clone(),
        negative_image_embeds: Some(neg.clone()),
        height: 16,
        width: 16,
        movq_scale_factor: 2,
        num_inference_steps: 2,
        timesteps: None,
        guidance_scale: 4.0,
        num_images_per_prompt: 1,
        latents: None,
        mode: DecoderMode::Text2Img,
        text: DecoderText::default(),
    }
}

fn run(
    unet: &UNet2DConditionModel,
    sched: &SchedulerConfig,
    p: &DecoderInputs,
) -> Result<DecoderOutcome> {
    let mut s: Box<dyn Scheduler> = schedulers::from_config(sched, 0.0).unwrap();
    run_decoder(
        unet,
        s.as_mut(),
        p,
        &mut SeededNoise::new(&[1]),
        &mut |_| true,
    )
}

fn message(r: Result<DecoderOutcome>) -> String {
    match r {
        Err(ModelError::InvalidInput { field, message }) => format!("{field}: {message}"),
        Err(other) => panic!("expected InvalidInput, got {other}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_inputs_name_the_field_and_the_allowed_values() {
    let (unet, sched) = load("kandinsky-2-2-decoder");
    let (pos, neg) = (zeros(&[1, 32]), zeros(&[1, 32]));

    let bad = zeros(&[1, 31]);
    let m = message(run(&unet, &sched, &params(&bad, &bad)));
    assert!(
        m.starts_with("image_embeds") && m.contains("expected (B, 32)"),
        "{m}"
    );
    let m = message(run(&unet, &sched, &params(&pos, &bad)));
    assert!(
        m.starts_with("negative_image_embeds") && m.contains("expected (1, 32)"),
        "{m}"
    );

    let lat = zeros(&[1, 4, 8, 4]);
    let m = message(run(
        &unet,
        &sched,
        &DecoderInputs {
            latents: Some(lat.clone()),
            ..params(&pos, &neg)
        },
    ));
    assert!(
        m.starts_with("latents") && m.contains("expected (1, 4, 8, 8)"),
        "{m}"
    );

    for steps in [0, 1001] {
        let m = message(run(
            &unet,
            &sched,
            &DecoderInputs {
                num_inference_steps: steps,
                timesteps: None,
                ..params(&pos, &neg)
            },
        ));
        assert!(
            m.starts_with("num_inference_steps") && m.contains("allowed: 1..=1000"),
            "{m}"
        );
    }

    let img = zeros(&[1, 4, 8, 8]);
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let m = message(run(
            &unet,
            &sched,
            &DecoderInputs {
                mode: DecoderMode::Img2Img {
                    image_latents: img.clone(),
                    strength,
                    hint: None,
                },
                ..params(&pos, &neg)
            },
        ));
        assert!(
            m.starts_with("strength") && m.contains("allowed: (0, 1]"),
            "{m}"
        );
    }
    let m = message(run(
        &unet,
        &sched,
        &DecoderInputs {
            mode: DecoderMode::Img2Img {
                image_latents: img.clone(),
                strength: 0.1,
                hint: None,
            },
            ..params(&pos, &neg)
        },
    ));
    assert!(
        m.starts_with("strength") && m.contains("runs no step"),
        "{m}"
    );
    let small = zeros(&[1, 4, 4, 4]);
    let m = message(run(
        &unet,
        &sched,
        &DecoderInputs {
            mode: DecoderMode::Img2Img {
                image_latents: small.clone(),
                strength: 1.0,
                hint: None,
            },
            ..params(&pos, &neg)
        },
    ));
    assert!(
        m.starts_with("image_latents") && m.contains("expected (1, 4, 8, 8)"),
        "{m}"
    );

    // A 4-channel UNet cannot inpaint.
    let mask = zeros(&[1, 1, 8, 8]);
    let m = message(run(
        &unet,
        &sched,
        &DecoderInputs {
            mode: DecoderMode::Inpaint {
                image_latents: img.clone(),
                mask: mask.clone(),
            },
            ..params(&pos, &neg)
        },
    ));
    assert!(m.starts_with("mask") && m.contains("9-channel"), "{m}");
}

#[test]
fn inpaint_mask_of_the_wrong_size_is_rejected() {
    let (unet, sched) = load("kandinsky-2-2-decoder-inpaint");
    let (pos, neg) = (zeros(&[1, 32]), zeros(&[1, 32]));
    let img = zeros(&[1, 4, 8, 8]);
    let mask = zeros(&[1, 1, 8, 6]);
    let m = message(run(
        &unet,
        &sched,
        &DecoderInputs {
            mode: DecoderMode::Inpaint {
                image_latents: img.clone(),
                mask: mask.clone(),
            },
            ..params(&pos, &neg)
        },
    ));
    assert!(
        m.starts_with("mask") && m.contains("expected (1, 1, 8, 8)"),
        "{m}"
    );
    let e = prepare_inpaint_mask(&zeros(&[1, 3, 8, 8]), 4, 4).unwrap_err();
    assert!(
        e.to_string().contains("expected (B, H, W) or (B, 1, H, W)"),
        "{e}"
    );
}

#[test]
fn callback_cancels_within_one_step_and_sees_progress() {
    let (unet, sched) = load("kandinsky-2-2-decoder");
    let (pos, neg) = (zeros(&[1, 32]), zeros(&[1, 32]));
    let mut s = schedulers::from_config(&sched, 0.0).unwrap();
    let mut calls = Vec::new();
    let p = DecoderInputs {
        num_inference_steps: 5,
        timesteps: None,
        ..params(&pos, &neg)
    };
    let out = run_decoder(
        &unet,
        s.as_mut(),
        &p,
        &mut SeededNoise::new(&[3]),
        &mut |pr| {
            assert_eq!(pr.latents.dims(), &[1, 4, 8, 8]);
            assert!(pr.pred_original_sample.is_some());
            calls.push((pr.step, pr.total, pr.timestep));
            pr.step < 1
        },
    )
    .unwrap();
    assert!(
        matches!(out, DecoderOutcome::Cancelled { steps_done: 2 }),
        "{out:?}"
    );
    assert_eq!(calls, vec![(0, 5, 801), (1, 5, 601)]);
}

#[test]
fn seeded_runs_are_reproducible_and_seed_dependent() {
    let (unet, sched) = load("kandinsky-2-2-decoder");
    let pos = Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap();
    let neg = zeros(&[1, 32]);
    let go = |seed: u64| -> Vec<f32> {
        let mut s = schedulers::from_config(&sched, 0.0).unwrap();
        run_decoder(
            &unet,
            s.as_mut(),
            &params(&pos, &neg),
            &mut SeededNoise::new(&[seed]),
            &mut |_| true,
        )
        .unwrap()
        .into_latents()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
    };
    let a = go(5);
    assert_eq!(a, go(5));
    assert_ne!(a, go(6));
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn latent_size_rounds_up_to_the_movq_grid() {
    assert_eq!(latent_side(512, 8), 64);
    assert_eq!(latent_side(500, 8), 64);
    assert_eq!(latent_side(520, 8), 72);
    assert_eq!(latent_side(768, 8), 96);
    assert_eq!(latent_side(48, 2), 24);
}
