//! Kandinsky 2.0 inpainting against the OFFICIAL `Kandinsky2(task_type="inpainting")
//! .generate_inpainting` on `tests/fixtures/kd20-inpaint/` (the tiny inpainting UNet; its VAE
//! and text encoders are the text-to-image folder's, by relative symlinks), and the
//! `Kd20Denoiser` API the denoiser service runs: step counts and progress, aborting from the
//! observer, which model serves which task, the `unet.json` sidecar check.
//! (`tools/reference/gen_kd20_pipeline.py`: 64×64 images, a 60×70 keep mask whose repaint
//! rectangle is off the 8×8 latent grid; every torch draw replayed in order.)

use candle_core::{DType, Device, Tensor};
use kd_models::interrupt;
use kd_models::kd20::denoise::{interpolate_nearest, prepare_keep_mask};
use kd_models::kd20::{
    Kd20Denoiser, Kd20Images, Kd20InpaintArgs, Kd20Pipeline, Kd20Sampling, Kd20Task, Kd20Text,
    Kd20Text2Img,
};
use kd_models::noise::{ReplayNoise, SeededNoise};
use kd_models::schedulers::guided::SamplerKind;
use kd_models::ModelError;
use kd_testkit::parity::{fixtures_dir, get, load_reference, rel_l2};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

const REL_TOL: f64 = 1e-3;

struct Fixture {
    pipe: Kd20Pipeline,
    refs: HashMap<String, Tensor>,
    meta: Value,
    init: Tensor,
}

fn fx() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let dir = fixtures_dir().join("kd20-inpaint");
        let meta = std::fs::read_to_string(dir.join("reference/inpaint.json")).unwrap();
        let i2i =
            load_reference(fixtures_dir().join("kd20/reference/pipeline_img2img.safetensors"))
                .unwrap();
        Fixture {
            pipe: Kd20Pipeline::load(&dir, DType::F32, &Device::Cpu).unwrap(),
            refs: load_reference(dir.join("reference/inpaint.safetensors")).unwrap(),
            meta: serde_json::from_str(&meta).unwrap(),
            init: get(&i2i, "init").clone(),
        }
    })
}

/// The official keep mask (1 = keep, 0 = repaint), (1, 1, 60, 70) f32.
fn keep_mask() -> Tensor {
    get(&fx().refs, "keep_mask").to_dtype(DType::F32).unwrap()
}

fn args_of(case: &str) -> Kd20InpaintArgs {
    let m = &fx().meta["cases"][case];
    Kd20InpaintArgs {
        num_steps: m["num_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        sampler: m["sampler"].as_str().unwrap().parse().unwrap(),
        ..Kd20InpaintArgs::new(m["prompt"].as_str().unwrap())
    }
}

fn replay(case: &str) -> ReplayNoise {
    let n = fx().meta["cases"][case]["draws"].as_u64().unwrap() as usize;
    ReplayNoise::new((0..n).map(move |i| {
        get(&fx().refs, &format!("{case}.noise.{i}"))
            .to_dtype(DType::F32)
            .unwrap()
    }))
}

fn compare(case: &str, out: &Kd20Images) {
    let want = get(&fx().refs, &format!("{case}.images"));
    let rel = rel_l2(&out.raw, want).unwrap();
    let want_u8 = get(&fx().refs, &format!("{case}.uint8"));
    assert_eq!(out.uint8.dims(), want_u8.dims());
    let want_u8: Vec<u8> = want_u8.flatten_all().unwrap().to_vec1().unwrap();
    let got_u8: Vec<u8> = out.uint8.flatten_all().unwrap().to_vec1().unwrap();
    let max_diff = got_u8
        .iter()
        .zip(&want_u8)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    println!("{case}: images rel L2 {rel:.3e}; uint8 max diff {max_diff}");
    assert!(rel <= REL_TOL, "{case}: rel L2 {rel:.3e} > {REL_TOL}");
    assert!(max_diff <= 1, "{case}: uint8 max diff {max_diff}");
}

fn check_inpaint(case: &str) {
    let args = args_of(case);
    let mut noise = replay(case);
    let out = fx()
        .pipe
        .inpaint(&args, &fx().init, &keep_mask(), &mut noise)
        .unwrap();
    assert_eq!(noise.remaining(), 0, "{case}: draws left over");
    compare(case, &out);
}

/// The p-sampler: the inpainting UNet inputs AND the mask-blending `denoised_fn` with the
/// dynamic threshold, then the 99.5 threshold of row 0.
#[test]
fn inpainting_p_sampler_matches_official() {
    check_inpaint("inp_p");
}

/// DDIM (a Cyrillic prompt): the UNet's inpainting inputs only.
#[test]
fn inpainting_ddim_matches_official() {
    check_inpaint("inp_ddim");
}

#[test]
fn keep_mask_is_resized_and_grown_as_upstream() {
    let resized = interpolate_nearest(&keep_mask(), 8, 8).unwrap();
    assert_eq!(
        rel_l2(&resized, get(&fx().refs, "mask_resized")).unwrap(),
        0.0
    );
    let prepared = prepare_keep_mask(&keep_mask(), 1, (8, 8)).unwrap();
    assert_eq!(
        rel_l2(&prepared, get(&fx().refs, "mask_prepared")).unwrap(),
        0.0
    );
    // One mask for three images: the same prepared mask on every row.
    let three = prepare_keep_mask(&keep_mask(), 3, (8, 8)).unwrap();
    assert_eq!(three.dims(), &[3, 1, 8, 8]);
    for i in 0..3 {
        let row = three.narrow(0, i, 1).unwrap();
        assert_eq!(rel_l2(&row, &prepared).unwrap(), 0.0);
    }
}

fn field(e: ModelError) -> &'static str {
    match e {
        ModelError::InvalidInput { field, .. } => field,
        other => panic!("expected an InvalidInput error, got {other}"),
    }
}

fn text2img_pipe() -> &'static Kd20Pipeline {
    static P: OnceLock<Kd20Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        Kd20Pipeline::load(fixtures_dir().join("kd20"), DType::F32, &Device::Cpu).unwrap()
    })
}

#[test]
fn each_model_serves_its_tasks_and_refuses_the_others_by_name() {
    let inpaint = fx().pipe.denoiser();
    let t2i = text2img_pipe().denoiser();
    assert!(inpaint.is_inpaint());
    assert!(!t2i.is_inpaint());
    let sampling = Kd20Sampling::new(SamplerKind::Ddim, 4, 5.0);
    let latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t2i_task = Kd20Task::TextToImage {
        latent_height: 8,
        latent_width: 8,
    };
    let i2i_task = Kd20Task::ImageToImage {
        latents: latents.clone(),
        strength: 0.5,
    };
    let inp_task = Kd20Task::Inpaint {
        latents: latents.clone(),
        keep_mask: keep_mask(),
    };
    for task in [&t2i_task, &i2i_task] {
        assert!(t2i.total_steps(&sampling, task).is_ok());
        assert_eq!(
            field(inpaint.total_steps(&sampling, task).unwrap_err()),
            "task"
        );
    }
    assert!(inpaint.total_steps(&sampling, &inp_task).is_ok());
    assert_eq!(
        field(t2i.total_steps(&sampling, &inp_task).unwrap_err()),
        "task"
    );
    // The pipeline refuses text-to-image on the inpainting folder before drawing anything.
    let mut noise = SeededNoise::new(&[1]);
    let args = Kd20Text2Img {
        num_steps: 2,
        height: 64,
        width: 64,
        ..Kd20Text2Img::new("x")
    };
    assert_eq!(
        field(fx().pipe.text2img(&args, &mut noise).unwrap_err()),
        "task"
    );
}

#[test]
fn bad_task_shapes_and_params_are_refused_by_name() {
    let d = fx().pipe.denoiser();
    let ok = Kd20Sampling::new(SamplerKind::P, 3, 5.0);
    let latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let inp = |latents: Tensor, keep_mask: Tensor| Kd20Task::Inpaint { latents, keep_mask };
    let cases: Vec<(&str, Kd20Sampling, Kd20Task)> = vec![
        (
            "latents",
            ok.clone(),
            inp(
                Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
                keep_mask(),
            ),
        ),
        (
            "keep_mask",
            ok.clone(),
            inp(
                latents.clone(),
                Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap(),
            ),
        ),
        (
            "keep_mask",
            ok.clone(),
            inp(
                latents.clone(),
                Tensor::zeros((1, 1, 0, 8), DType::F32, &Device::Cpu).unwrap(),
            ),
        ),
        (
            "guidance_scale",
            Kd20Sampling {
                guidance_scale: f64::NAN,
                ..ok.clone()
            },
            inp(latents.clone(), keep_mask()),
        ),
        (
            "dynamic_threshold_v",
            Kd20Sampling {
                dynamic_threshold_v: 100.5,
                ..ok.clone()
            },
            inp(latents.clone(), keep_mask()),
        ),
        (
            "num_steps",
            Kd20Sampling {
                num_steps: 0,
                ..ok.clone()
            },
            inp(latents.clone(), keep_mask()),
        ),
    ];
    for (want, sampling, task) in cases {
        assert_eq!(field(d.total_steps(&sampling, &task).unwrap_err()), want);
    }
    let t2i = text2img_pipe().denoiser();
    let odd = Kd20Task::TextToImage {
        latent_height: 8,
        latent_width: 0,
    };
    assert_eq!(
        field(t2i.total_steps(&ok, &odd).unwrap_err()),
        "latent_width"
    );
    let i2i = Kd20Task::ImageToImage {
        latents,
        strength: 1.0,
    };
    assert_eq!(field(t2i.total_steps(&ok, &i2i).unwrap_err()), "strength");
}

/// The text rows `[prompt, ""]` through the pipeline's encoders in one batch, as the
/// pipeline encodes them: the conditional row, then the unconditional one.
fn text_of(pipe: &Kd20Pipeline, prompt: &str) -> Kd20Text {
    let c = pipe.text_encoders().encode(&[prompt, ""]).unwrap();
    Kd20Text {
        full1: c.full1,
        pooled1: c.pooled1,
        full2: c.full2,
    }
}

/// Every sampler reports `total_steps` steps in order, with the conditional rows' x₀ (DDIM
/// with S = 6 runs `range(0, 1000, 166)`: 7 steps; PLMS with S = 5: 5, its two-call first step
/// counted once).
#[test]
fn observer_sees_every_step_of_every_sampler() {
    let pipe = text2img_pipe();
    let d = pipe.denoiser();
    let text = text_of(pipe, "a lighthouse");
    let task = Kd20Task::TextToImage {
        latent_height: 8,
        latent_width: 8,
    };
    for (sampler, steps, want_total) in [
        (SamplerKind::P, 3, 3),
        (SamplerKind::Ddim, 6, 7),
        (SamplerKind::Plms, 5, 5),
    ] {
        let sampling = Kd20Sampling::new(sampler, steps, 5.0);
        let total = d.total_steps(&sampling, &task).unwrap();
        assert_eq!(total, want_total, "{sampler:?}");
        let mut seen = Vec::new();
        let mut noise = SeededNoise::new(&[7]);
        let out = d
            .sample(
                &text,
                &task,
                &sampling,
                &mut noise,
                &mut |s| {
                    assert_eq!(s.total, total);
                    assert_eq!(s.pred_x0.dims(), &[1, 4, 8, 8]);
                    seen.push(s.done);
                    Ok(())
                },
                &interrupt::never,
            )
            .unwrap();
        assert_eq!(out.dims(), &[1, 4, 8, 8]);
        assert_eq!(seen, (1..=total).collect::<Vec<_>>(), "{sampler:?}");
    }
}

/// An error from the observer stops sampling at once and is what `sample` returns.
#[test]
fn observer_error_aborts_sampling() {
    let pipe = text2img_pipe();
    let text = text_of(pipe, "x");
    let task = Kd20Task::TextToImage {
        latent_height: 8,
        latent_width: 8,
    };
    let sampling = Kd20Sampling::new(SamplerKind::Ddim, 10, 5.0);
    let mut calls = 0;
    let err = pipe
        .denoiser()
        .sample(
            &text,
            &task,
            &sampling,
            &mut SeededNoise::new(&[3]),
            &mut |s| {
                calls += 1;
                if s.done == 2 {
                    Err(ModelError::Interrupted { piece: "observer" })
                } else {
                    Ok(())
                }
            },
            &interrupt::never,
        )
        .unwrap_err();
    assert!(
        matches!(err, ModelError::Interrupted { piece: "observer" }),
        "{err}"
    );
    assert_eq!(calls, 2);
}

/// The denoiser alone (text from the encoders, latents out) is the pipeline's sampling: the
/// same draws give the same latents the pipeline decodes.
#[test]
fn denoiser_latents_decode_to_the_pipeline_image() {
    let pipe = text2img_pipe();
    let args = Kd20Text2Img {
        num_steps: 4,
        height: 64,
        width: 64,
        sampler: SamplerKind::Plms,
        ..Kd20Text2Img::new("a boat at dawn")
    };
    let want = pipe.text2img(&args, &mut SeededNoise::new(&[11])).unwrap();
    let text = text_of(pipe, &args.prompt);
    let latents = pipe
        .denoiser()
        .sample(
            &text,
            &Kd20Task::TextToImage {
                latent_height: 8,
                latent_width: 8,
            },
            &Kd20Sampling::new(args.sampler, args.num_steps, args.guidance_scale),
            &mut SeededNoise::new(&[11]),
            &mut |_| Ok(()),
            &interrupt::never,
        )
        .unwrap();
    let got = pipe.vae().decode(&latents).unwrap();
    assert_eq!(rel_l2(&got, &want.raw).unwrap(), 0.0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_sidecar_that_disagrees_with_the_unet_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures_dir().join("kd20-inpaint"), tmp.path());
    let sidecar = tmp.path().join("unet.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    cfg["inpainting"] = Value::Bool(false);
    std::fs::write(&sidecar, cfg.to_string()).unwrap();
    let err = Kd20Denoiser::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a disagreeing sidecar must be refused");
    let msg = err.to_string();
    assert!(msg.contains("inpainting"), "{msg}");
    std::fs::remove_file(tmp.path().join("Kandinsky-2-0-inpainting.pt")).unwrap();
    let msg = Kd20Denoiser::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a folder without a UNet must be refused")
        .to_string();
    assert!(msg.contains("Kandinsky-2-0.pt"), "{msg}");
}
