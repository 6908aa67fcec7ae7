//! Kandinsky 2.0 end to end: `Kd20Pipeline` against the OFFICIAL `Kandinsky2` object's
//! `generate_text2img` (p, DDIM, PLMS) / `generate_img2img` on the tiny checkpoint folder
//! `tests/fixtures/kd20/` (`tools/reference/gen_kd20_pipeline.py`; img2img with
//! `prepare_image`'s resize patched to 64×64 there). Every torch draw is replayed in order.
//! (Inpainting and the denoiser API: `kd20_denoise.rs`.)

use candle_core::{DType, Device, Tensor};
use kd_models::kd20::pipeline::{process_images, Kd20Img2Img};
use kd_models::kd20::{Kd20Pipeline, Kd20Text2Img};
use kd_models::noise::{NoiseSource, ReplayNoise, SeededNoise};
use kd_models::schedulers::guided::SamplerKind;
use kd_models::ModelError;
use kd_testkit::parity::{fixtures_dir, get, load_reference, rel_l2};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::OnceLock;

const REL_TOL: f64 = 1e-3;

struct Fixture {
    pipe: Kd20Pipeline,
    refs: HashMap<String, Tensor>,
    meta: Value,
    i2i_refs: HashMap<String, Tensor>,
    i2i_meta: Value,
    plms_refs: HashMap<String, Tensor>,
    plms_meta: Value,
}

fn fx() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixtures_dir().join("kd20");
        let meta = std::fs::read_to_string(dir.join("reference/pipeline.json")).unwrap();
        let i2i_meta =
            std::fs::read_to_string(dir.join("reference/pipeline_img2img.json")).unwrap();
        let plms_meta = std::fs::read_to_string(dir.join("reference/pipeline_plms.json")).unwrap();
        Fixture {
            pipe: Kd20Pipeline::load(&dir, DType::F32, &Device::Cpu).unwrap(),
            refs: load_reference(dir.join("reference/pipeline.safetensors")).unwrap(),
            meta: serde_json::from_str(&meta).unwrap(),
            i2i_refs: load_reference(dir.join("reference/pipeline_img2img.safetensors")).unwrap(),
            i2i_meta: serde_json::from_str(&i2i_meta).unwrap(),
            plms_refs: load_reference(dir.join("reference/pipeline_plms.safetensors")).unwrap(),
            plms_meta: serde_json::from_str(&plms_meta).unwrap(),
        }
    })
}

fn args_of(case: &str) -> Kd20Text2Img {
    args_from(&fx().meta, case)
}

fn args_from(meta: &Value, case: &str) -> Kd20Text2Img {
    let m = &meta["cases"][case];
    Kd20Text2Img {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        batch_size: m["batch_size"].as_u64().unwrap() as usize,
        num_steps: m["num_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        height: m["h"].as_u64().unwrap() as usize,
        width: m["w"].as_u64().unwrap() as usize,
        sampler: m["sampler"].as_str().unwrap().parse().unwrap(),
    }
}

fn replay_from(refs: &'static HashMap<String, Tensor>, meta: &Value, case: &str) -> ReplayNoise {
    let n = meta["cases"][case]["draws"].as_u64().unwrap() as usize;
    ReplayNoise::new((0..n).map(move |i| {
        get(refs, &format!("{case}.noise.{i}"))
            .to_dtype(DType::F32)
            .unwrap()
    }))
}

fn replay(case: &str) -> ReplayNoise {
    replay_from(&fx().refs, &fx().meta, case)
}

fn check_case(case: &str) {
    let args = args_of(case);
    let mut noise = replay(case);
    let out = fx().pipe.text2img(&args, &mut noise).unwrap();
    assert_eq!(noise.remaining(), 0, "{case}: draws left over");
    compare(&fx().refs, case, &out);
}

fn compare(refs: &HashMap<String, Tensor>, case: &str, out: &kd_models::kd20::Kd20Images) {
    let want = get(refs, &format!("{case}.images"));
    let rel = rel_l2(&out.raw, want).unwrap();
    let want_u8: Vec<u8> = get(refs, &format!("{case}.uint8"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(out.uint8.dims(), get(refs, &format!("{case}.uint8")).dims());
    let got_u8: Vec<u8> = out.uint8.flatten_all().unwrap().to_vec1().unwrap();
    let max_diff = got_u8
        .iter()
        .zip(&want_u8)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let n_diff = got_u8.iter().zip(&want_u8).filter(|(a, b)| a != b).count();
    println!(
        "{case}: images rel L2 {rel:.3e}; uint8 max diff {max_diff}, {n_diff}/{} differ",
        got_u8.len()
    );
    assert!(rel <= REL_TOL, "{case}: rel L2 {rel:.3e} > {REL_TOL}");
    assert!(max_diff <= 1, "{case}: uint8 max diff {max_diff}");
}

#[test]
fn text2img_p_sampler_matches_official() {
    check_case("p_latin");
}

#[test]
fn text2img_ddim_cropped_matches_official() {
    check_case("ddim_cyrillic");
}

/// PLMS at 5 steps: the improved-Euler first step (two UNet calls, two draws) and the
/// Adams–Bashforth orders 2, 3 and 4.
#[test]
fn text2img_plms_matches_official() {
    let case = "plms_latin";
    let f = fx();
    let args = args_from(&f.plms_meta, case);
    assert_eq!(args.sampler, SamplerKind::Plms);
    let mut noise = replay_from(&f.plms_refs, &f.plms_meta, case);
    let out = f.pipe.text2img(&args, &mut noise).unwrap();
    assert_eq!(noise.remaining(), 0, "{case}: draws left over");
    compare(&f.plms_refs, case, &out);
}

fn i2i_args(case: &str) -> Kd20Img2Img {
    let m = &fx().i2i_meta["cases"][case];
    Kd20Img2Img {
        prompt: m["prompt"].as_str().unwrap().to_string(),
        batch_size: 1,
        strength: m["strength"].as_f64().unwrap(),
        num_steps: m["num_steps"].as_u64().unwrap() as usize,
        guidance_scale: m["guidance_scale"].as_f64().unwrap(),
        sampler: m["sampler"].as_str().unwrap().parse().unwrap(),
    }
}

fn check_i2i(case: &str) {
    let args = i2i_args(case);
    let mut noise = replay_from(&fx().i2i_refs, &fx().i2i_meta, case);
    let init = get(&fx().i2i_refs, "init");
    let out = fx().pipe.img2img(&args, init, &mut noise).unwrap();
    assert_eq!(noise.remaining(), 0, "{case}: draws left over");
    compare(&fx().i2i_refs, case, &out);
}

#[test]
fn img2img_p_sampler_matches_official() {
    check_i2i("i2i_p");
}

#[test]
fn img2img_ddim_matches_official() {
    check_i2i("i2i_ddim");
}

#[test]
fn img2img_refuses_bad_strength_and_rows() {
    let init = get(&fx().i2i_refs, "init");
    let base = Kd20Img2Img {
        num_steps: 2,
        ..Kd20Img2Img::new("x")
    };
    let mut noise = SeededNoise::new(&[0]);
    let args = Kd20Img2Img {
        strength: 1.0,
        ..base.clone()
    };
    assert_eq!(
        field(fx().pipe.img2img(&args, init, &mut noise).unwrap_err()),
        "strength"
    );
    let two = Tensor::cat(&[init, init, init], 0).unwrap();
    let args = Kd20Img2Img {
        batch_size: 2,
        ..base.clone()
    };
    assert_eq!(
        field(fx().pipe.img2img(&args, &two, &mut noise).unwrap_err()),
        "image"
    );
    // One init row for two images: both rows sampled, H × W kept. (Not `SeededNoise`: its
    // draws must all have one batch size, and img2img draws B rows, then 2B.)
    struct AnyNoise;
    impl NoiseSource for AnyNoise {
        fn randn(&mut self, shape: &[usize], device: &Device) -> kd_models::Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, device)?)
        }
        fn rand(&mut self, shape: &[usize], device: &Device) -> kd_models::Result<Tensor> {
            Ok(Tensor::rand(0f32, 1.0, shape, device)?)
        }
    }
    let out = fx().pipe.img2img(&args, init, &mut AnyNoise).unwrap();
    assert_eq!(out.raw.dims(), &[2, 3, 64, 64]);
}

#[test]
fn latent_size_is_get_new_h_w() {
    assert_eq!(Kd20Pipeline::latent_size(512, 512), (64, 64));
    assert_eq!(Kd20Pipeline::latent_size(40, 64), (8, 8));
    assert_eq!(Kd20Pipeline::latent_size(65, 128), (16, 16));
}

#[test]
fn process_images_rounds_and_clamps() {
    // (x + 1) * 127.5 = 127.5 (a tie: 128), 0, -127.5, 255, 318.75 -> 128, 0, 0, 255, 255
    let xs = [0.0f32, -1.0, -2.0, 1.0, 1.5];
    let t = Tensor::from_slice(&xs, (1, 1, 1, 5), &Device::Cpu).unwrap();
    let t = t.broadcast_as((1, 3, 1, 5)).unwrap().contiguous().unwrap();
    let u = process_images(&t).unwrap();
    assert_eq!(u.dims(), &[1, 1, 5, 3]);
    let u: Vec<u8> = u.flatten_all().unwrap().to_vec1().unwrap();
    let expect: Vec<u8> = [128u8, 0, 0, 255, 255]
        .iter()
        .flat_map(|&v| [v; 3])
        .collect();
    assert_eq!(u, expect);
}

fn field(e: ModelError) -> &'static str {
    match e {
        ModelError::InvalidInput { field, .. } => field,
        other => panic!("expected an InvalidInput error, got {other}"),
    }
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let base = Kd20Text2Img {
        num_steps: 2,
        height: 64,
        width: 64,
        ..Kd20Text2Img::new("x")
    };
    let cases: Vec<(&str, Kd20Text2Img)> = vec![
        (
            "batch_size",
            Kd20Text2Img {
                batch_size: 0,
                ..base.clone()
            },
        ),
        (
            "num_steps",
            Kd20Text2Img {
                num_steps: 0,
                ..base.clone()
            },
        ),
        (
            "guidance_scale",
            Kd20Text2Img {
                guidance_scale: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "height",
            Kd20Text2Img {
                height: 0,
                ..base.clone()
            },
        ),
        (
            "width",
            Kd20Text2Img {
                width: 0,
                ..base.clone()
            },
        ),
    ];
    for (name, args) in cases {
        let mut noise = SeededNoise::new(&[0]);
        let e = fx().pipe.text2img(&args, &mut noise).unwrap_err();
        assert_eq!(field(e), name);
    }
    // p_sampler with 1 step: the respacing "1" is refused, reported as num_steps.
    let mut noise = SeededNoise::new(&[0]);
    let args = Kd20Text2Img {
        num_steps: 1,
        sampler: SamplerKind::P,
        ..base.clone()
    };
    let e = fx().pipe.text2img(&args, &mut noise).unwrap_err();
    assert_eq!(field(e), "num_steps");
    assert_eq!(
        field("euler".parse::<SamplerKind>().unwrap_err()),
        "sampler"
    );
    // A missing folder is a checkpoint error.
    assert!(matches!(
        Kd20Pipeline::load(
            fixtures_dir().join("no-such-kd20"),
            DType::F32,
            &Device::Cpu
        ),
        Err(ModelError::Checkpoint { .. })
    ));
}

#[test]
fn seeded_run_gives_the_requested_shapes() {
    let args = Kd20Text2Img {
        num_steps: 2,
        height: 40,
        width: 24,
        batch_size: 2,
        sampler: SamplerKind::Plms,
        ..Kd20Text2Img::new("test")
    };
    let mut noise = SeededNoise::new(&[7, 8, 9, 10]);
    let out = fx().pipe.text2img(&args, &mut noise).unwrap();
    assert_eq!(out.raw.dims(), &[2, 3, 40, 24]);
    assert_eq!(out.uint8.dims(), &[2, 40, 24, 3]);
    assert_eq!(out.uint8.dtype(), DType::U8);
}
