//! The whole decoder loop against every diffusers pipeline case (text2img, img2img, inpaint,
//! ControlNet; DDPM with replayed noise, DDIM, DPM++; the few-step students' LCM and TCD, 1 and
//! 4 steps, DMD2's explicit timesteps): final latents ≤ 1e-3 relative L2.

use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::decoder::{
    prepare_inpaint_mask, prepare_mask, run_decoder, DecoderInputs, DecoderMode, DecoderOutcome,
    DecoderText,
};
use kd_models::noise::ReplayNoise;
use kd_models::schedulers;
use kd_models::unet::UNet2DConditionModel;
use kd_models::{CheckpointDir, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::PathBuf;

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_checkpoint(rel: &str, dtype: DType) -> (UNet2DConditionModel, usize) {
    let dir = CheckpointDir::open(fixtures_dir().join("../..").join(rel)).unwrap();
    let unet = dir.component("unet").unwrap();
    let cfg = unet.unet_config().unwrap();
    let vb = unet
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    let sf = dir
        .component("movq")
        .unwrap()
        .vq_config()
        .unwrap()
        .scale_factor();
    (UNet2DConditionModel::new(&cfg, vb).unwrap(), sf)
}

/// The shared inputs of the cases in `dir` (the decoder cases' or the few-step cases').
fn inputs(dir: &str) -> HashMap<String, Tensor> {
    load_reference(fixtures_dir().join(dir).join("pipeline_inputs.safetensors")).unwrap()
}

fn inpaint_mask(inp: &HashMap<String, Tensor>) -> Tensor {
    let u8mask = get(inp, "inpaint_mask_u8").to_dtype(DType::F32).unwrap();
    prepare_inpaint_mask(&(u8mask / 255.0).unwrap(), 32, 32).unwrap()
}

fn run_case(size: &str, name: &str) {
    run_case_dtype(size, name, DType::F32, 1e-3);
}

fn run_case_dtype(size: &str, name: &str, dtype: DType, tol: f64) {
    let dir = format!("{size}/reference/decoder");
    run_case_in(&dir, "tiny/reference/decoder", name, dtype, tol);
}

/// Runs case `name` of the reference folder `dir` with the shared inputs of `inputs_dir` (both
/// relative to the fixtures).
fn run_case_in(dir: &str, inputs_dir: &str, name: &str, dtype: DType, tol: f64) {
    let inp = inputs(inputs_dir);
    let dir = fixtures_dir().join(dir);
    let meta = json(dir.join(format!("{name}.json")));
    let r = load_reference(dir.join(format!("{name}.safetensors"))).unwrap();
    let (unet, sf) = load_checkpoint(meta["checkpoint"].as_str().unwrap(), dtype);
    let cfg: SchedulerConfig = serde_json::from_value(meta["scheduler_config"].clone()).unwrap();
    // The pipelines call TCD's step with its default gamma 0.3.
    let eta = if meta["scheduler_class"] == "TCDScheduler" {
        0.3
    } else {
        0.0
    };
    let mut scheduler = schedulers::from_config(&cfg, eta).unwrap();
    let timesteps: Option<Vec<usize>> = meta
        .get("timesteps")
        .map(|t| serde_json::from_value(t.clone()).unwrap());
    let mut noise = match r.get("noise") {
        Some(n) => ReplayNoise::from_stacked(n).unwrap(),
        None => ReplayNoise::default(),
    };
    let mode = if name.contains("img2img") {
        // A ControlNet img2img case stores the latents of its own (ControlNet checkpoint) MoVQ.
        let image_latents = r
            .get("image_latents")
            .unwrap_or_else(|| get(&inp, "img2img_image_latents"));
        DecoderMode::Img2Img {
            image_latents: image_latents.clone(),
            strength: meta["strength"].as_f64().unwrap(),
            hint: name
                .contains("controlnet")
                .then(|| get(&inp, "controlnet_hint").clone()),
        }
    } else if name.contains("inpaint") {
        DecoderMode::Inpaint {
            image_latents: get(&inp, "inpaint_image_latents").clone(),
            mask: inpaint_mask(&inp),
        }
    } else if name.contains("controlnet") {
        DecoderMode::Controlnet {
            hint: get(&inp, "controlnet_hint").clone(),
        }
    } else {
        DecoderMode::Text2Img
    };
    let params = DecoderInputs {
        image_embeds: get(&r, "image_embeds").clone(),
        negative_image_embeds: Some(get(&r, "negative_image_embeds").clone()),
        height: meta["height"].as_u64().unwrap() as usize,
        width: meta["width"].as_u64().unwrap() as usize,
        movq_scale_factor: sf,
        num_inference_steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
        timesteps,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        num_images_per_prompt: meta["num_images_per_prompt"].as_u64().unwrap() as usize,
        latents: r.get("latents").cloned(),
        mode,
        text: DecoderText::default(),
    };
    let mut seen = Vec::new();
    let out = run_decoder(&unet, scheduler.as_mut(), &params, &mut noise, &mut |p| {
        assert_eq!(p.step, seen.len());
        seen.push(p.timestep as i64);
        true
    })
    .unwrap();
    let DecoderOutcome::Finished(latents) = out else {
        panic!("{name}: not finished")
    };
    assert_eq!(
        seen,
        get(&r, "timesteps").to_vec1::<i64>().unwrap(),
        "{name}: timesteps"
    );
    assert_eq!(noise.remaining(), 0, "{name}: unused recorded noise draws");
    let err = rel_l2(&latents, get(&r, "final_latents")).unwrap();
    eprintln!(
        "{}/{name} {dtype:?}: final latents rel L2 {err:e}",
        dir.display()
    );
    assert_close(name, &latents, get(&r, "final_latents"), tol);
}

macro_rules! cases {
    ($($fn:ident: $size:literal $name:literal,)*) => {$(
        #[test]
        fn $fn() {
            run_case($size, $name);
        }
    )*};
}

cases! {
    text2img_ddpm_2: "tiny" "pipeline_text2img_ddpm_2",
    text2img_ddim_2: "tiny" "pipeline_text2img_ddim_2",
    text2img_ddpm_5_32x48: "tiny" "pipeline_text2img_ddpm_5_32x48",
    text2img_dpmpp_5_32: "tiny" "pipeline_text2img_dpmpp_5_32",
    text2img_ddpm_2_nocfg_32: "tiny" "pipeline_text2img_ddpm_2_nocfg_32",
    text2img_ddpm_2_n2_32: "tiny" "pipeline_text2img_ddpm_2_n2_32",
    img2img_ddim_s02: "tiny" "pipeline_img2img_ddim_s02",
    img2img_ddim_s05: "tiny" "pipeline_img2img_ddim_s05",
    img2img_ddpm_s02: "tiny" "pipeline_img2img_ddpm_s02",
    img2img_ddpm_s05: "tiny" "pipeline_img2img_ddpm_s05",
    inpaint_ddpm_2: "tiny" "pipeline_inpaint_ddpm_2",
    inpaint_ddpm_5: "tiny" "pipeline_inpaint_ddpm_5",
    controlnet_ddpm_2: "tiny" "pipeline_controlnet_ddpm_2",
    controlnet_img2img_ddpm_4_s05: "tiny" "pipeline_controlnet_img2img_ddpm_4_s05",
    deep_text2img_ddpm_3: "deep" "pipeline_text2img_ddpm_3",
}

macro_rules! fewstep_cases {
    ($($fn:ident: $name:literal,)*) => {$(
        #[test]
        fn $fn() {
            let dir = "tiny/reference/fewstep";
            run_case_in(dir, dir, $name, DType::F32, 1e-3);
        }
    )*};
}

fewstep_cases! {
    fewstep_text2img_lcm_1: "pipeline_text2img_lcm_1",
    fewstep_text2img_lcm_4: "pipeline_text2img_lcm_4",
    fewstep_text2img_lcm_4_cfg: "pipeline_text2img_lcm_4_cfg",
    fewstep_text2img_tcd_4: "pipeline_text2img_tcd_4",
    fewstep_text2img_lcm_dmd2: "pipeline_text2img_lcm_dmd2",
    fewstep_img2img_lcm_4_s05: "pipeline_img2img_lcm_4_s05",
}

#[test]
fn inpaint_mask_preparation_is_exact() {
    let inp = inputs("tiny/reference/decoder");
    let prepared = inpaint_mask(&inp);
    let want = get(&inp, "inpaint_mask_latent_prepared");
    assert_eq!(
        prepared.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let r = load_reference(fixtures_dir().join("tiny/reference/decoder/prepare_mask.safetensors"))
        .unwrap();
    for (input, output) in [("mask", "prepared"), ("mask_3ch", "prepared_3ch")] {
        let got = prepare_mask(get(&r, input)).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            get(&r, output)
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{input}"
        );
    }
}

/// The whole loop with f16 UNet weights, against the f32 reference.
#[test]
fn f16_text2img_and_deep() {
    run_case_dtype("tiny", "pipeline_text2img_ddpm_2", DType::F16, 1e-2);
    run_case_dtype("deep", "pipeline_text2img_ddpm_3", DType::F16, 1e-2);
}
