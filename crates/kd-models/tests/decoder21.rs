//! The Kandinsky 2.1 decoder loop (`KandinskyPipeline`, `…Img2ImgPipeline`, `…InpaintPipeline`)
//! against every `pipeline_*` reference in `tests/fixtures/kd21/reference/`
//! (`tools/reference/KD21.md`): the stored text conditioning and embeddings in, explicit latents
//! and replayed noise; final latents ≤ 1e-3 relative L2, and their MoVQ decode against `image`.

use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::decoder::{
    prepare_inpaint_mask, run_decoder, DecoderInputs, DecoderMode, DecoderOutcome, DecoderText,
};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::noise::ReplayNoise;
use kd_models::schedulers;
use kd_models::unet::UNet2DConditionModel;
use kd_models::{CheckpointDir, ModelError, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    fixtures_dir().join("kd21")
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load(ckpt: &str, dtype: DType) -> (UNet2DConditionModel, VqModel) {
    let dir = CheckpointDir::open(root().join(ckpt)).unwrap();
    assert_eq!(dir.family(), kd_models::ModelFamily::Kandinsky21);
    let unet = dir.component("unet").unwrap();
    let vb = unet
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    let unet = UNet2DConditionModel::new(&unet.unet_config().unwrap(), vb).unwrap();
    let movq = VqModel::load(
        &dir.component("movq").unwrap(),
        MovqOptions::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    (unet, movq)
}

/// Every `pipeline_*` reference name.
fn pipeline_cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("reference"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".safetensors")?;
            stem.starts_with("pipeline_").then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// Rows `start, start + step, …` (`count` of them).
fn rows(x: &Tensor, start: usize, step: usize, count: usize) -> Tensor {
    let idx: Vec<u32> = (0..count).map(|i| (start + i * step) as u32).collect();
    x.index_select(&Tensor::new(idx.as_slice(), x.device()).unwrap(), 0)
        .unwrap()
}

/// Undoes diffusers' arrangement of the text conditioning (`[negative…, positive…]` under CFG,
/// each repeat-interleaved per image) back to per-prompt rows: (positive, negative) B rows.
fn split_text(x: &Tensor, b: usize, n: usize, cfg: bool) -> (Tensor, Tensor) {
    let total = x.dim(0).unwrap();
    let halves = if cfg { 2 } else { 1 };
    let per = total / halves;
    assert!(
        per == b * n || per == b,
        "text rows {total} for B {b}, n {n}"
    );
    let step = per / b;
    let pos = rows(x, (halves - 1) * per, step, b);
    let neg = rows(x, 0, step, b);
    (pos, neg)
}

fn meta_usize(m: &serde_json::Value, keys: &[&str], default: Option<usize>) -> usize {
    keys.iter()
        .find_map(|k| m.get(*k).and_then(|v| v.as_u64()))
        .map(|v| v as usize)
        .or(default)
        .unwrap_or_else(|| panic!("meta has none of {keys:?}"))
}

fn meta_f64(m: &serde_json::Value, keys: &[&str]) -> f64 {
    keys.iter()
        .find_map(|k| m.get(*k).and_then(|v| v.as_f64()))
        .unwrap_or_else(|| panic!("meta has none of {keys:?}"))
}

struct Case {
    r: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn case(name: &str) -> Case {
    let dir = root().join("reference");
    Case {
        meta: json(dir.join(format!("{name}.json"))),
        r: load_reference(dir.join(format!("{name}.safetensors"))).unwrap(),
    }
}

/// Runs one reference case; returns the final-latents and image relative L2.
fn run_case(name: &str, dtype: DType, tol: f64) -> (f64, f64) {
    let Case { r, meta } = case(name);
    let inpaint = name.contains("inpaint");
    let (unet, movq) = load(
        if inpaint {
            "kandinsky-2-1-inpaint"
        } else {
            "kandinsky-2-1"
        },
        dtype,
    );
    let cfg_json = meta
        .get("scheduler_config")
        .or_else(|| meta.get("scheduler"))
        .unwrap()
        .clone();
    let sched_cfg: SchedulerConfig = serde_json::from_value(cfg_json).unwrap();
    let mut scheduler = schedulers::from_config(&sched_cfg, 0.0).unwrap();
    let mut noise = match r.get("noise") {
        Some(n) => ReplayNoise::from_stacked(n).unwrap(),
        None => ReplayNoise::default(),
    };
    let image_embeds = get(&r, "image_embeds");
    let final_want = get(&r, "final_latents");
    let b = image_embeds.dim(0).unwrap();
    let n = final_want.dim(0).unwrap() / b;
    let guidance = meta_f64(&meta, &["guidance_scale", "guidance"]);
    let cfg = guidance > 1.0;
    let (te, neg_te) = split_text(get(&r, "text_embeds"), b, n, cfg);
    let (hs, neg_hs) = split_text(get(&r, "text_hidden_states"), b, n, cfg);
    let (lh, lw) = (final_want.dim(2).unwrap(), final_want.dim(3).unwrap());
    let height = meta_usize(&meta, &["height"], None);
    let width = meta_usize(&meta, &["width"], None);
    let image_latents;
    let mask;
    let mode = if name.contains("img2img") {
        image_latents = match r.get("image_latents") {
            Some(l) => l.clone(),
            None => movq.encode(get(&r, "init_image")).unwrap(),
        };
        DecoderMode::Img2Img {
            image_latents: image_latents.clone(),
            strength: meta_f64(&meta, &["strength"]),
            hint: None,
        }
    } else if inpaint {
        image_latents = match r.get("image_latents") {
            Some(l) => l.clone(),
            None => movq.encode(get(&r, "init_image")).unwrap(),
        };
        mask = match r.get("mask_prepared") {
            Some(m) => m.clone(),
            None => prepare_inpaint_mask(get(&r, "mask"), lh, lw).unwrap(),
        };
        DecoderMode::Inpaint {
            image_latents: image_latents.clone(),
            mask: mask.clone(),
        }
    } else {
        DecoderMode::Text2Img
    };
    let params = DecoderInputs {
        image_embeds: image_embeds.clone(),
        negative_image_embeds: Some(get(&r, "negative_image_embeds").clone()),
        height,
        width,
        movq_scale_factor: movq.scale_factor(),
        num_inference_steps: meta_usize(&meta, &["num_inference_steps", "steps"], None),
        timesteps: None,
        guidance_scale: guidance,
        num_images_per_prompt: n,
        latents: if name.contains("img2img") {
            None
        } else {
            r.get("latents").cloned()
        },
        mode,
        text: DecoderText::new(te, hs, neg_te, neg_hs),
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
    if let Some(ts) = r.get("timesteps") {
        let want: Vec<i64> = ts
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|&t| t as i64)
            .collect();
        assert_eq!(seen, want, "{name}: timesteps");
    }
    assert_eq!(noise.remaining(), 0, "{name}: unused recorded noise draws");
    let err = rel_l2(&latents, final_want).unwrap();
    eprintln!("kd21/{name} {dtype:?}: final latents rel L2 {err:e}");
    assert_close(name, &latents, final_want, tol);

    // The MoVQ decode of our final latents against the pipeline's image (f32 runs).
    if dtype != DType::F32 {
        return (err, f64::NAN);
    }
    let img = movq.decode(&latents).unwrap();
    let want = get(&r, "image");
    let img = if want.dims().last() == Some(&3) {
        ((img * 0.5).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
    } else {
        img
    };
    let img_err = rel_l2(&img, want).unwrap();
    eprintln!("kd21/{name} {dtype:?}: image rel L2 {img_err:e}");
    assert_close(&format!("{name} image"), &img, want, tol);
    (err, img_err)
}

macro_rules! cases {
    ($($fn:ident: $name:literal,)*) => {
        $(
            #[test]
            fn $fn() {
                run_case($name, DType::F32, 1e-3);
            }
        )*

        /// Every `pipeline_*` reference has a test above, and every kind is covered.
        #[test]
        fn kd21_every_pipeline_reference_is_tested() {
            let tested = [$($name),*];
            assert_eq!(pipeline_cases(), tested);
            for kind in ["text2img", "img2img", "inpaint"] {
                assert!(tested.iter().any(|n| n.contains(kind)), "no {kind} case");
            }
        }
    };
}

cases! {
    img2img_ddim_s03: "pipeline_img2img_ddim_s03",
    img2img_ddim_s05: "pipeline_img2img_ddim_s05",
    inpaint_ddim_2: "pipeline_inpaint_ddim_2",
    inpaint_ddim_4: "pipeline_inpaint_ddim_4",
    text2img_ddim_2: "pipeline_text2img_ddim_2",
    text2img_ddim_3_batch2_n2: "pipeline_text2img_ddim_3_batch2_n2",
    text2img_ddim_3_nocfg: "pipeline_text2img_ddim_3_nocfg",
    text2img_ddim_5_32x48: "pipeline_text2img_ddim_5_32x48",
}

/// The whole 2.1 loop with f16 UNet weights, against the f32 reference.
#[test]
fn kd21_f16_text2img() {
    run_case("pipeline_text2img_ddim_2", DType::F16, 1e-2);
    run_case("pipeline_text2img_ddim_3_batch2_n2", DType::F16, 1e-2);
}

fn invalid_message(e: ModelError) -> String {
    match e {
        ModelError::InvalidInput { field, message } => format!("{field}: {message}"),
        other => panic!("expected InvalidInput, got {other}"),
    }
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn kd21_family_and_text_errors() {
    let (unet, _) = load("kandinsky-2-1", DType::F32);
    let emb = zeros(&[1, 32]);
    let te = zeros(&[1, 32]);
    let hs = zeros(&[1, 77, 48]);
    let text = DecoderText::new(te.clone(), hs.clone(), te.clone(), hs.clone());
    let base = DecoderInputs {
        image_embeds: emb.clone(),
        negative_image_embeds: Some(emb.clone()),
        height: 16,
        width: 16,
        movq_scale_factor: 2,
        num_inference_steps: 2,
        timesteps: None,
        guidance_scale: 4.0,
        num_images_per_prompt: 1,
        latents: None,
        mode: DecoderMode::Text2Img,
        text: text.clone(),
    };
    let cfg = CheckpointDir::open(root().join("kandinsky-2-1"))
        .unwrap()
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap();
    let run = |unet: &UNet2DConditionModel, p: &DecoderInputs| {
        let mut s = schedulers::from_config(&cfg, 0.0).unwrap();
        run_decoder(
            unet,
            s.as_mut(),
            p,
            &mut kd_models::noise::SeededNoise::new(&[0]),
            &mut |_| true,
        )
    };
    // The happy path runs.
    assert!(matches!(
        run(&unet, &base).unwrap(),
        DecoderOutcome::Finished(_)
    ));
    let m = invalid_message(
        run(
            &unet,
            &DecoderInputs {
                text: DecoderText::default(),
                ..base.clone()
            },
        )
        .unwrap_err(),
    );
    assert!(
        m.starts_with("text_embeds") && m.contains("required") && m.contains("Kandinsky 2.1 UNet"),
        "{m}"
    );
    let bad = zeros(&[1, 77, 32]);
    let m = invalid_message(
        run(
            &unet,
            &DecoderInputs {
                text: DecoderText {
                    text_hidden_states: Some(bad),
                    ..text.clone()
                },
                ..base.clone()
            },
        )
        .unwrap_err(),
    );
    assert!(
        m.starts_with("text_hidden_states") && m.contains("expected (1, L, 48)"),
        "{m}"
    );
    let bad = zeros(&[2, 32]);
    let m = invalid_message(
        run(
            &unet,
            &DecoderInputs {
                text: DecoderText {
                    text_embeds: Some(bad),
                    ..text.clone()
                },
                ..base.clone()
            },
        )
        .unwrap_err(),
    );
    assert!(
        m.starts_with("text_embeds") && m.contains("expected (1, 32)"),
        "{m}"
    );
    let bad = zeros(&[1, 76, 48]);
    let m = invalid_message(
        run(
            &unet,
            &DecoderInputs {
                text: DecoderText {
                    negative_text_hidden_states: Some(bad),
                    ..text.clone()
                },
                ..base.clone()
            },
        )
        .unwrap_err(),
    );
    assert!(
        m.starts_with("negative_text_hidden_states") && m.contains("77, 48"),
        "{m}"
    );
    // A 2.2 UNet with 2.1 text.
    let dir = CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-decoder")).unwrap();
    let c = dir.component("unet").unwrap();
    let vb = c
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let unet22 = UNet2DConditionModel::new(&c.unet_config().unwrap(), vb).unwrap();
    let m = invalid_message(run(&unet22, &base).unwrap_err());
    assert!(
        m.starts_with("text_embeds") && m.contains("Kandinsky 2.1 only") && m.contains("2.2 UNet"),
        "{m}"
    );
}
