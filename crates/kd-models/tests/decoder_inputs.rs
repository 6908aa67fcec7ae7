//! `DecoderInputs::validate`: every rule of a decoder run, checked against real tiny UNets and
//! schedulers, with an error naming the field and the allowed values.

use candle_core::{DType, Device, Tensor};
use kd_models::decoder::{DecoderInputs, DecoderMode, DecoderPlan, DecoderText};
use kd_models::schedulers::{self, Scheduler};
use kd_models::unet::UNet2DConditionModel;
use kd_models::{CheckpointDir, ModelError, Variant};
use kd_testkit::parity::fixtures_dir;

fn load(rel: &str) -> (UNet2DConditionModel, Box<dyn Scheduler>) {
    let dir = CheckpointDir::open(fixtures_dir().join(rel)).unwrap();
    let c = dir.component("unet").unwrap();
    let vb = c
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(&c.unet_config().unwrap(), vb).unwrap();
    let cfg = dir
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap();
    (unet, schedulers::from_config(&cfg, 0.0).unwrap())
}

fn full(shape: &[usize], v: f32) -> Tensor {
    Tensor::full(v, shape, &Device::Cpu).unwrap()
}

/// Text-to-image at 16×16 (latents 8×8 with scale factor 2), B = 1, CFG on.
fn base() -> DecoderInputs {
    DecoderInputs {
        image_embeds: full(&[1, 32], 0.0),
        negative_image_embeds: Some(full(&[1, 32], 0.0)),
        height: 16,
        width: 16,
        movq_scale_factor: 2,
        num_inference_steps: 4,
        timesteps: None,
        guidance_scale: 4.0,
        num_images_per_prompt: 1,
        latents: None,
        mode: DecoderMode::Text2Img,
        text: DecoderText::default(),
    }
}

fn text21() -> DecoderText {
    DecoderText::new(
        full(&[1, 32], 0.0),
        full(&[1, 77, 48], 0.0),
        full(&[1, 32], 0.0),
        full(&[1, 77, 48], 0.0),
    )
}

/// Asserts `inputs` is rejected naming `field`, with `hint` in the message.
fn rejects(
    unet: &(UNet2DConditionModel, Box<dyn Scheduler>),
    inputs: DecoderInputs,
    field: &str,
    hint: &str,
) {
    match inputs.validate(&unet.0, unet.1.as_ref()) {
        Err(ModelError::InvalidInput { field: f, message }) => {
            assert_eq!(f, field, "{message}");
            assert!(message.contains(hint), "{field}: {message}");
        }
        other => panic!("{field}: expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn valid_inputs_give_the_run_sizes() {
    let m = load("tiny/kandinsky-2-2-decoder");
    let plan = base().validate(&m.0, m.1.as_ref()).unwrap();
    assert_eq!(
        plan,
        DecoderPlan {
            batch: 1,
            latent_shape: [1, 4, 8, 8],
            cfg: true,
            steps: 4
        }
    );
    // Without CFG the negative is optional; img2img runs ⌊N·strength⌋ steps; 1-row inputs
    // broadcast over B; n images per embedding multiply the latent batch.
    let two = DecoderInputs {
        image_embeds: full(&[2, 32], 0.0),
        negative_image_embeds: None,
        guidance_scale: 1.0,
        num_images_per_prompt: 3,
        mode: DecoderMode::Img2Img {
            image_latents: full(&[1, 4, 8, 8], 0.0),
            strength: 0.5,
            hint: None,
        },
        ..base()
    };
    let plan = two.validate(&m.0, m.1.as_ref()).unwrap();
    assert_eq!(
        (plan.batch, plan.latent_shape, plan.cfg, plan.steps),
        (2, [6, 4, 8, 8], false, 2)
    );
}

#[test]
fn embeddings_and_scalars() {
    let m = load("tiny/kandinsky-2-2-decoder");
    let with = |f: fn(&mut DecoderInputs)| {
        let mut i = base();
        f(&mut i);
        i
    };
    rejects(
        &m,
        with(|i| i.image_embeds = full(&[1, 31], 0.0)),
        "image_embeds",
        "expected (B, 32)",
    );
    rejects(
        &m,
        with(|i| i.image_embeds = full(&[0, 32], 0.0)),
        "image_embeds",
        "B ≥ 1",
    );
    rejects(
        &m,
        with(|i| i.image_embeds = full(&[1, 32], f32::NAN)),
        "image_embeds",
        "non-finite",
    );
    rejects(
        &m,
        with(|i| {
            i.image_embeds = full(&[2, 32], 0.0);
            i.negative_image_embeds = Some(full(&[3, 32], 0.0));
        }),
        "negative_image_embeds",
        "expected (1 or 2, 32)",
    );
    rejects(
        &m,
        with(|i| i.negative_image_embeds = Some(full(&[1, 32], f32::INFINITY))),
        "negative_image_embeds",
        "non-finite",
    );
    rejects(
        &m,
        with(|i| i.negative_image_embeds = None),
        "negative_image_embeds",
        "required when guidance_scale > 1",
    );
    rejects(
        &m,
        with(|i| i.guidance_scale = f64::NAN),
        "guidance_scale",
        "finite number ≥ 0",
    );
    rejects(
        &m,
        with(|i| i.guidance_scale = -1.0),
        "guidance_scale",
        "finite number ≥ 0",
    );
    rejects(
        &m,
        with(|i| i.num_inference_steps = 0),
        "num_inference_steps",
        "allowed: 1..=1000",
    );
    rejects(
        &m,
        with(|i| i.num_inference_steps = 1001),
        "num_inference_steps",
        "allowed: 1..=1000",
    );
    rejects(
        &m,
        with(|i| i.num_images_per_prompt = 0),
        "num_images_per_prompt",
        "≥ 1",
    );
    rejects(&m, with(|i| i.height = 0), "height/width", "≥ 1 pixel");
    rejects(
        &m,
        with(|i| {
            i.movq_scale_factor = 1;
            i.width = 15;
        }),
        "height/width",
        "multiples of",
    );
    rejects(
        &m,
        with(|i| i.latents = Some(full(&[1, 4, 8, 4], 0.0))),
        "latents",
        "expected (1, 4, 8, 8)",
    );
    rejects(
        &m,
        with(|i| i.latents = Some(full(&[1, 4, 8, 8], f32::NAN))),
        "latents",
        "non-finite",
    );
}

#[test]
fn img2img_rules() {
    let m = load("tiny/kandinsky-2-2-decoder");
    let img2img = |strength: f64, image_latents: Tensor| DecoderInputs {
        mode: DecoderMode::Img2Img {
            image_latents,
            strength,
            hint: None,
        },
        ..base()
    };
    let img = full(&[1, 4, 8, 8], 0.0);
    for s in [0.0, -0.5, 1.5, f64::NAN] {
        rejects(&m, img2img(s, img.clone()), "strength", "allowed: (0, 1]");
    }
    rejects(&m, img2img(0.1, img.clone()), "strength", "runs no step");
    rejects(
        &m,
        img2img(1.0, full(&[1, 4, 4, 4], 0.0)),
        "image_latents",
        "expected (1, 4, 8, 8)",
    );
    rejects(
        &m,
        img2img(1.0, full(&[1, 4, 8, 8], f32::NAN)),
        "image_latents",
        "non-finite",
    );
    rejects(
        &m,
        DecoderInputs {
            latents: Some(img.clone()),
            ..img2img(1.0, img.clone())
        },
        "latents",
        "not allowed with img2img",
    );
}

#[test]
fn mode_must_match_the_unet() {
    let m22 = load("tiny/kandinsky-2-2-decoder");
    let inpaint = |mask: Tensor| DecoderInputs {
        mode: DecoderMode::Inpaint {
            image_latents: full(&[1, 4, 8, 8], 0.0),
            mask,
        },
        ..base()
    };
    let hint = |hint: Tensor| DecoderInputs {
        mode: DecoderMode::Controlnet { hint },
        ..base()
    };
    rejects(
        &m22,
        inpaint(full(&[1, 1, 8, 8], 1.0)),
        "mask",
        "in_channels 4",
    );
    rejects(
        &m22,
        hint(full(&[1, 3, 64, 64], 0.5)),
        "hint",
        "not a ControlNet UNet",
    );

    let inp = load("tiny/kandinsky-2-2-decoder-inpaint");
    rejects(&inp, base(), "mask", "in_channels 9");
    rejects(
        &inp,
        inpaint(full(&[1, 1, 8, 6], 1.0)),
        "mask",
        "expected (1, 1, 8, 8)",
    );
    rejects(
        &inp,
        inpaint(full(&[1, 1, 8, 8], 2.0)),
        "mask",
        "allowed: [0, 1]",
    );
    inpaint(full(&[1, 1, 8, 8], 1.0))
        .validate(&inp.0, inp.1.as_ref())
        .unwrap();

    let cn = load("tiny/kandinsky-2-2-controlnet-depth");
    rejects(&cn, base(), "hint", "required: this is a ControlNet UNet");
    rejects(
        &cn,
        hint(full(&[1, 3, 32, 32], 0.5)),
        "hint",
        "expected (1, 3, 64, 64)",
    );
    rejects(
        &cn,
        hint(full(&[1, 3, 64, 64], 1.5)),
        "hint",
        "allowed: [0, 1]",
    );
    hint(full(&[1, 3, 64, 64], 0.5))
        .validate(&cn.0, cn.1.as_ref())
        .unwrap();
}

#[test]
fn text_conditioning_rules() {
    let m22 = load("tiny/kandinsky-2-2-decoder");
    let only = |te: Option<Tensor>| DecoderInputs {
        text: DecoderText {
            text_embeds: te,
            ..DecoderText::default()
        },
        ..base()
    };
    rejects(
        &m22,
        only(Some(full(&[1, 32], 0.0))),
        "text_embeds",
        "Kandinsky 2.1 only",
    );
    let m21 = load("kd21/kandinsky-2-1");
    let with = |t: DecoderText| DecoderInputs { text: t, ..base() };
    with(text21()).validate(&m21.0, m21.1.as_ref()).unwrap();
    rejects(
        &m21,
        base(),
        "text_embeds",
        "required: this is a Kandinsky 2.1 UNet",
    );
    rejects(
        &m21,
        with(DecoderText {
            text_hidden_states: None,
            ..text21()
        }),
        "text_hidden_states",
        "required with text_embeds",
    );
    rejects(
        &m21,
        with(DecoderText {
            text_embeds: Some(full(&[1, 31], 0.0)),
            ..text21()
        }),
        "text_embeds",
        "expected (1, 32)",
    );
    rejects(
        &m21,
        with(DecoderText {
            text_embeds: Some(full(&[1, 32], f32::NAN)),
            ..text21()
        }),
        "text_embeds",
        "non-finite",
    );
    rejects(
        &m21,
        with(DecoderText {
            text_hidden_states: Some(full(&[1, 77, 32], 0.0)),
            ..text21()
        }),
        "text_hidden_states",
        "expected (1, L, 48) with L in 1..=512",
    );
    rejects(
        &m21,
        with(DecoderText {
            text_hidden_states: Some(full(&[1, 513, 48], 0.0)),
            ..text21()
        }),
        "text_hidden_states",
        "1..=512",
    );
    rejects(
        &m21,
        with(DecoderText {
            negative_text_embeds: None,
            negative_text_hidden_states: None,
            ..text21()
        }),
        "negative_text_embeds",
        "required when guidance_scale > 1",
    );
    rejects(
        &m21,
        with(DecoderText {
            negative_text_embeds: None,
            ..text21()
        }),
        "negative_text_embeds",
        "required with text_hidden_states",
    );
    rejects(
        &m21,
        with(DecoderText {
            negative_text_hidden_states: Some(full(&[1, 76, 48], 0.0)),
            ..text21()
        }),
        "negative_text_hidden_states",
        "expected (1, 77, 48)",
    );
    // Without CFG the negative text is optional.
    DecoderInputs {
        guidance_scale: 1.0,
        negative_image_embeds: None,
        text: DecoderText {
            negative_text_embeds: None,
            negative_text_hidden_states: None,
            ..text21()
        },
        ..base()
    }
    .validate(&m21.0, m21.1.as_ref())
    .unwrap();
    // 2.1 img2img noises at int(T·strength) − 2 of a 1000-entry table.
    let img = DecoderInputs {
        mode: DecoderMode::Img2Img {
            image_latents: full(&[1, 4, 8, 8], 0.0),
            strength: 1.0,
            hint: None,
        },
        ..with(text21())
    };
    img.validate(&m21.0, m21.1.as_ref()).unwrap();
}

#[test]
fn explicit_timesteps_are_checked_against_the_scheduler() {
    let ddpm = load("tiny/kandinsky-2-2-decoder");
    let lcm = {
        let (unet, _) = load("tiny/kandinsky-2-2-decoder");
        let json = std::fs::read_to_string(
            fixtures_dir().join("tiny/reference/fewstep/scheduler_lcm_k22.json"),
        )
        .unwrap();
        let meta: serde_json::Value = serde_json::from_str(&json).unwrap();
        let cfg = serde_json::from_value(meta["config"].clone()).unwrap();
        (unet, schedulers::from_config(&cfg, 0.0).unwrap())
    };
    let list = |ts: &[usize]| DecoderInputs {
        num_inference_steps: ts.len(),
        timesteps: Some(ts.to_vec()),
        ..base()
    };
    let plan = list(&[999, 749, 499, 249])
        .validate(&lcm.0, lcm.1.as_ref())
        .unwrap();
    assert_eq!(plan.steps, 4);
    rejects(&ddpm, list(&[999, 499]), "timesteps", "LCM and TCD");
    rejects(&lcm, list(&[499, 999]), "timesteps", "descending");
    rejects(&lcm, list(&[1000]), "timesteps", "0 ..= 999");
    rejects(
        &lcm,
        DecoderInputs {
            num_inference_steps: 3,
            ..list(&[999, 499])
        },
        "num_inference_steps",
        "the list's length",
    );
    // N spaced steps stop at the distillation schedule's length.
    rejects(
        &lcm,
        DecoderInputs {
            num_inference_steps: 51,
            ..base()
        },
        "num_inference_steps",
        "1..=50 (the scheduler's original_inference_steps)",
    );
}
