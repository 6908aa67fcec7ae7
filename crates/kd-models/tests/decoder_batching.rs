//! Step-level batching of decoder runs: several requests, each with its own scheduler, number of
//! steps, guidance (with and without CFG), seed and mode, stepped together through ONE UNet call
//! per step, joining and leaving at step boundaries, end where each ends alone.

use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::decoder::{
    prepare_inpaint_mask, run_decoder, step_runs, DecoderInputs, DecoderMode, DecoderRun,
    DecoderText,
};
use kd_models::noise::{NoiseSource, SeededNoise};
use kd_models::schedulers::{self, Scheduler};
use kd_models::unet::UNet2DConditionModel;
use kd_models::{interrupt, CheckpointDir, Variant};
use kd_testkit::parity::{fixtures_dir, get, load_reference, rel_l2};

fn unet_and_config() -> (UNet2DConditionModel, serde_json::Value) {
    unet_and_config_of("tiny/kandinsky-2-2-decoder")
}

fn unet_and_config_of(checkpoint: &str) -> (UNet2DConditionModel, serde_json::Value) {
    let dir = CheckpointDir::open(fixtures_dir().join(checkpoint)).unwrap();
    let unet = dir.component("unet").unwrap();
    let vb = unet
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(&unet.unet_config().unwrap(), vb).unwrap();
    let path = dir.root().join("scheduler/scheduler_config.json");
    let json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    (unet, json)
}

fn scheduler(json: &serde_json::Value, class: &str) -> Box<dyn Scheduler> {
    let mut json = json.clone();
    json["_class_name"] = class.into();
    let cfg: SchedulerConfig = serde_json::from_value(json).unwrap();
    schedulers::from_config(&cfg, 0.0).unwrap()
}

/// One request of the batch.
struct Request {
    inputs: DecoderInputs,
    class: &'static str,
    seed: u64,
}

fn requests() -> Vec<Request> {
    let g = |seed: u64, d: usize| {
        SeededNoise::new(&[seed])
            .randn(&[1, d], &Device::Cpu)
            .unwrap()
    };
    let inp = pipeline_inputs();
    let d = 32;
    let base = |seed: u64, steps: usize, guidance: f64, mode: DecoderMode| DecoderInputs {
        image_embeds: g(seed, d),
        negative_image_embeds: Some(g(seed + 100, d)),
        height: 64,
        width: 64,
        movq_scale_factor: 2,
        num_inference_steps: steps,
        timesteps: None,
        guidance_scale: guidance,
        num_images_per_prompt: 1,
        latents: None,
        mode,
        text: DecoderText::default(),
    };
    vec![
        Request {
            inputs: base(1, 5, 4.0, DecoderMode::Text2Img),
            class: "DDPMScheduler",
            seed: 11,
        },
        // No CFG: one row, not two.
        Request {
            inputs: base(2, 3, 1.0, DecoderMode::Text2Img),
            class: "DDIMScheduler",
            seed: 12,
        },
        Request {
            inputs: base(3, 6, 7.5, DecoderMode::Text2Img),
            class: "DPMSolverMultistepScheduler",
            seed: 13,
        },
        // img2img: its own (shorter) slice of its schedule.
        Request {
            inputs: base(
                4,
                8,
                4.0,
                DecoderMode::Img2Img {
                    image_latents: get(&inp, "img2img_image_latents").clone(),
                    strength: 0.5,
                    hint: None,
                },
            ),
            class: "DDPMScheduler",
            seed: 14,
        },
    ]
}

fn alone(unet: &UNet2DConditionModel, json: &serde_json::Value, r: &Request) -> Tensor {
    let mut s = scheduler(json, r.class);
    run_decoder(
        unet,
        s.as_mut(),
        &r.inputs,
        &mut SeededNoise::new(&[r.seed]),
        &mut |_| true,
    )
    .unwrap()
    .into_latents()
    .unwrap()
}

/// Steps `reqs` through shared UNet calls, request k joining before call `joins[k]` (at a step
/// boundary) and leaving when it finishes; the rows of every call and each request's latents.
fn step_together(
    unet: &UNet2DConditionModel,
    json: &serde_json::Value,
    reqs: &[Request],
    joins: &[usize],
) -> (Vec<usize>, Vec<Tensor>) {
    let mut scheds: Vec<Box<dyn Scheduler>> =
        reqs.iter().map(|r| scheduler(json, r.class)).collect();
    let mut noises: Vec<SeededNoise> = reqs.iter().map(|r| SeededNoise::new(&[r.seed])).collect();
    let mut runs: Vec<Option<DecoderRun>> = (0..reqs.len()).map(|_| None).collect();
    let mut calls = 0;
    let mut rows_per_call = Vec::new();
    loop {
        for (k, _) in joins.iter().enumerate().filter(|(_, &j)| j == calls) {
            runs[k] = Some(
                DecoderRun::start(unet, scheds[k].as_mut(), &reqs[k].inputs, &mut noises[k])
                    .unwrap(),
            );
        }
        let mut batch: Vec<(&mut DecoderRun, &mut dyn Scheduler, &mut dyn NoiseSource)> =
            Vec::new();
        for ((run, s), n) in runs
            .iter_mut()
            .zip(scheds.iter_mut())
            .zip(noises.iter_mut())
        {
            if let Some(run) = run.as_mut().filter(|r| !r.is_done()) {
                batch.push((run, s.as_mut(), n));
            }
        }
        if batch.is_empty() && joins.iter().all(|&j| j < calls) {
            break;
        }
        rows_per_call.push(batch.iter().map(|(r, _, _)| r.rows()).sum::<usize>());
        step_runs(unet, &mut batch, &interrupt::never).unwrap();
        calls += 1;
    }
    let latents = runs
        .into_iter()
        .map(|run| run.unwrap().finish().unwrap())
        .collect();
    (rows_per_call, latents)
}

/// The largest relative L2 gap between each request's batched latents and its latents alone.
fn worst_gap(got: &[Tensor], want: &[Tensor], reqs: &[Request]) -> f64 {
    let mut worst: f64 = 0.0;
    for (k, (got, want)) in got.iter().zip(want).enumerate() {
        let err = rel_l2(got, want).unwrap();
        eprintln!(
            "request {k} ({}): batched vs alone rel L2 {err:e}",
            reqs[k].class
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn requests_stepped_together_end_where_each_ends_alone() {
    let (unet, json) = unet_and_config();
    let reqs = requests();
    let want: Vec<Tensor> = reqs.iter().map(|r| alone(&unet, &json, r)).collect();
    // Requests 0 and 1 start together; 2 and 3 join after two steps (mid-loop, at a step
    // boundary); 1 leaves first (3 steps), the others as they finish.
    let (rows_per_call, got) = step_together(&unet, &json, &reqs, &[0, 0, 2, 2]);
    // 2 rows (CFG) + 1 (no CFG), then all four (2 + 1 + 2 + 2), then the leavers gone.
    assert_eq!(&rows_per_call[..3], &[3, 3, 7]);
    assert!(rows_per_call.windows(2).skip(2).all(|w| w[1] <= w[0]));
    let worst = worst_gap(&got, &want, &reqs);
    eprintln!(
        "worst batched vs alone: {worst:e} over {} UNet calls",
        rows_per_call.len()
    );
    assert!(
        worst <= 1e-4,
        "a batched request differs from itself alone: {worst:e}"
    );
}

/// Three requests on `checkpoint`'s UNet and MoVQ grid, one per mode, each with its
/// (steps, guidance, scheduler) and seed `seed0 + k`; the first two start together (rows 3: one
/// with CFG, one without), the third joins after one step (rows 5); each must end within 1e-4
/// relative L2 of itself alone.
fn assert_mid_loop_batch_ends_as_alone(
    checkpoint: &str,
    modes: [DecoderMode; 3],
    plan: [(usize, f64, &'static str); 3],
    seed0: u64,
) {
    let (unet, json) = unet_and_config_of(checkpoint);
    let sf = CheckpointDir::open(fixtures_dir().join(checkpoint))
        .unwrap()
        .component("movq")
        .unwrap()
        .vq_config()
        .unwrap()
        .scale_factor();
    let reqs: Vec<Request> = modes
        .into_iter()
        .zip(plan)
        .enumerate()
        .map(|(k, (mode, (steps, guidance, class)))| {
            let mut inputs = requests().swap_remove(0).inputs;
            inputs.movq_scale_factor = sf;
            inputs.num_inference_steps = steps;
            inputs.guidance_scale = guidance;
            inputs.mode = mode;
            Request {
                inputs,
                class,
                seed: seed0 + k as u64,
            }
        })
        .collect();
    let want: Vec<Tensor> = reqs.iter().map(|r| alone(&unet, &json, r)).collect();
    let (rows_per_call, got) = step_together(&unet, &json, &reqs, &[0, 0, 1]);
    assert_eq!(&rows_per_call[..2], &[3, 5]);
    let worst = worst_gap(&got, &want, &reqs);
    eprintln!("worst batched vs alone on {checkpoint}: {worst:e}");
    assert!(
        worst <= 1e-4,
        "a batched request on {checkpoint} differs from itself alone: {worst:e}"
    );
}

fn pipeline_inputs() -> std::collections::HashMap<String, Tensor> {
    load_reference(fixtures_dir().join("tiny/reference/decoder/pipeline_inputs.safetensors"))
        .unwrap()
}

/// Inpaint rows share calls on the inpainting UNet the same way: each with its own init
/// latents' mask (the fixture's, its complement, keep-nothing), scheduler, steps and guidance
/// (one without CFG), one joining mid-loop.
#[test]
fn inpaint_requests_stepped_together_end_where_each_ends_alone() {
    let inp = pipeline_inputs();
    let mask = {
        let u8mask = get(&inp, "inpaint_mask_u8").to_dtype(DType::F32).unwrap();
        prepare_inpaint_mask(&(u8mask / 255.0).unwrap(), 32, 32).unwrap()
    };
    let image_latents = get(&inp, "inpaint_image_latents");
    let inpaint = |mask: Tensor| DecoderMode::Inpaint {
        image_latents: image_latents.clone(),
        mask,
    };
    assert_mid_loop_batch_ends_as_alone(
        "tiny/kandinsky-2-2-decoder-inpaint",
        [
            inpaint(mask.clone()),
            inpaint((1.0 - &mask).unwrap()),
            inpaint(mask.zeros_like().unwrap()),
        ],
        [
            (5, 4.0, "DDPMScheduler"),
            (3, 1.0, "DDIMScheduler"),
            (4, 7.5, "DPMSolverMultistepScheduler"),
        ],
        21,
    );
}

/// ControlNet rows share calls on the ControlNet UNet: text2img with the depth hint and with a
/// fainter one (without CFG), and hinted img2img joining mid-loop, each with its own scheduler.
#[test]
fn controlnet_requests_stepped_together_end_where_each_ends_alone() {
    let inp = pipeline_inputs();
    let case = load_reference(
        fixtures_dir()
            .join("tiny/reference/decoder/pipeline_controlnet_img2img_ddpm_4_s05.safetensors"),
    )
    .unwrap();
    let hint = get(&inp, "controlnet_hint");
    assert_mid_loop_batch_ends_as_alone(
        "tiny/kandinsky-2-2-controlnet-depth",
        [
            DecoderMode::Controlnet { hint: hint.clone() },
            DecoderMode::Controlnet {
                hint: (hint * 0.5).unwrap(),
            },
            DecoderMode::Img2Img {
                image_latents: get(&case, "image_latents").clone(),
                strength: 0.5,
                hint: Some(hint.clone()),
            },
        ],
        [
            (4, 4.0, "DDPMScheduler"),
            (3, 1.0, "DDIMScheduler"),
            (6, 4.0, "DPMSolverMultistepScheduler"),
        ],
        31,
    );
}

#[test]
fn a_finished_run_takes_no_row() {
    let (unet, json) = unet_and_config();
    let reqs = requests();
    let mut s = scheduler(&json, "DDPMScheduler");
    let mut n = SeededNoise::new(&[1]);
    let mut run = DecoderRun::start(&unet, s.as_mut(), &reqs[0].inputs, &mut n).unwrap();
    // A run that is done takes no row; an empty batch is a no-op.
    while !run.is_done() {
        step_runs(
            &unet,
            &mut [(&mut run, s.as_mut(), &mut n)],
            &interrupt::never,
        )
        .unwrap();
    }
    step_runs(
        &unet,
        &mut [(&mut run, s.as_mut(), &mut n)],
        &interrupt::never,
    )
    .unwrap();
    assert_eq!(run.steps_done(), 5);
}
