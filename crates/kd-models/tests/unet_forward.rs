//! UNet forward parity against the diffusers references (`tools/reference/DECODER.md`).

use candle_core::{DType, Device, Tensor};
use kd_models::unet::{UNet2DConditionModel, UNetConditioning};
use kd_models::{CheckpointDir, ModelError, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;

fn load_unet(size: &str, ckpt: &str, dtype: DType) -> UNet2DConditionModel {
    let dir = CheckpointDir::open(fixtures_dir().join(size).join(ckpt)).unwrap();
    let comp = dir.component("unet").unwrap();
    let cfg = comp.unet_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

fn refs(size: &str, name: &str) -> HashMap<String, Tensor> {
    load_reference(
        fixtures_dir()
            .join(size)
            .join("reference/decoder")
            .join(format!("{name}.safetensors")),
    )
    .unwrap()
}

fn timestep(r: &HashMap<String, Tensor>, key: &str) -> f64 {
    get(r, key).flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

/// Runs both timesteps, checks intermediates of the first (reporting them) and both outputs.
fn check(size: &str, ckpt: &str, name: &str, dtype: DType, tol: f64) {
    let unet = load_unet(size, ckpt, dtype);
    let r = refs(size, name);
    let sample = get(&r, "sample");
    let embeds = get(&r, "image_embeds");
    let hint = r.get("hint");
    let cond = UNetConditioning::image(embeds).with_hint(hint);
    let mut inter = Vec::new();
    let out_a = unet
        .forward_traced(sample, timestep(&r, "timestep_a"), &cond, &mut |n, t| {
            inter.push((n.to_string(), t.clone()))
        })
        .unwrap();
    for (n, t) in &inter {
        let key = match n.as_str() {
            "add_embedding" if hint.is_some() => "inter_a.add_embedding.aug_emb".to_string(),
            _ => format!("inter_a.{n}"),
        };
        if let Some(want) = r.get(&key) {
            let got = t.get(0).unwrap().unsqueeze(0).unwrap();
            let err = rel_l2(&got, want).unwrap();
            eprintln!("{size}/{name} {key}: rel L2 {err:e}");
            if dtype == DType::F32 {
                assert!(err <= tol, "{key}: {err:e}");
            }
        }
    }
    let out_b = unet
        .forward(sample, timestep(&r, "timestep_b"), &cond)
        .unwrap();
    eprintln!(
        "{size}/{name} {dtype:?}: out_a {:e}, out_b {:e}",
        rel_l2(&out_a, get(&r, "out_a")).unwrap(),
        rel_l2(&out_b, get(&r, "out_b")).unwrap()
    );
    assert_close("out_a", &out_a, get(&r, "out_a"), tol);
    assert_close("out_b", &out_b, get(&r, "out_b"), tol);
}

#[test]
fn tiny_decoder_f32() {
    check(
        "tiny",
        "kandinsky-2-2-decoder",
        "unet_forward",
        DType::F32,
        1e-4,
    );
}

#[test]
fn tiny_inpaint_f32() {
    check(
        "tiny",
        "kandinsky-2-2-decoder-inpaint",
        "unet_inpaint_forward",
        DType::F32,
        1e-4,
    );
}

#[test]
fn tiny_controlnet_f32() {
    check(
        "tiny",
        "kandinsky-2-2-controlnet-depth",
        "unet_controlnet_forward",
        DType::F32,
        1e-4,
    );
}

#[test]
fn deep_decoder_f32() {
    check(
        "deep",
        "kandinsky-2-2-decoder",
        "unet_forward",
        DType::F32,
        1e-4,
    );
}

#[test]
fn tiny_decoder_f16() {
    check(
        "tiny",
        "kandinsky-2-2-decoder",
        "unet_forward",
        DType::F16,
        1e-2,
    );
}

#[test]
fn deep_decoder_f16() {
    check(
        "deep",
        "kandinsky-2-2-decoder",
        "unet_forward",
        DType::F16,
        1e-2,
    );
}

#[test]
fn tiny_inpaint_f16() {
    check(
        "tiny",
        "kandinsky-2-2-decoder-inpaint",
        "unet_inpaint_forward",
        DType::F16,
        1e-2,
    );
}

#[test]
fn controlnet_f16() {
    check(
        "tiny",
        "kandinsky-2-2-controlnet-depth",
        "unet_controlnet_forward",
        DType::F16,
        1e-2,
    );
}

fn invalid_message(e: ModelError) -> String {
    match e {
        ModelError::InvalidInput { field, message } => format!("{field}: {message}"),
        other => panic!("expected InvalidInput, got {other}"),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let unet = load_unet("tiny", "kandinsky-2-2-decoder", DType::F32);
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let e = Tensor::zeros((1, 31), DType::F32, &dev).unwrap();
    let m = invalid_message(
        unet.forward(&x, 1.0, &UNetConditioning::image(&e))
            .unwrap_err(),
    );
    assert!(
        m.contains("image_embeds") && m.contains("expected (1, 32)"),
        "{m}"
    );
    let e = Tensor::zeros((1, 32), DType::F32, &dev).unwrap();
    let bad = Tensor::zeros((1, 4, 7, 8), DType::F32, &dev).unwrap();
    let m = invalid_message(
        unet.forward(&bad, 1.0, &UNetConditioning::image(&e))
            .unwrap_err(),
    );
    assert!(m.contains("sample") && m.contains("multiples of 2"), "{m}");
    let bad = Tensor::zeros((1, 9, 8, 8), DType::F32, &dev).unwrap();
    let m = invalid_message(
        unet.forward(&bad, 1.0, &UNetConditioning::image(&e))
            .unwrap_err(),
    );
    assert!(m.contains("expected (B, 4, H, W)"), "{m}");
    let m = invalid_message(
        unet.forward(&x, 1.0, &UNetConditioning::image(&e).with_hint(Some(&x)))
            .unwrap_err(),
    );
    assert!(m.contains("hint"), "{m}");
}

/// Rows at different timesteps in one call (what batching requests at different steps of their
/// schedules needs): each half of the batch equals diffusers' output at its own timestep, and the
/// same rows run alone, on every UNet kind.
#[test]
fn rows_at_different_timesteps_share_one_call() {
    for (size, ckpt, name) in [
        ("tiny", "kandinsky-2-2-decoder", "unet_forward"),
        ("deep", "kandinsky-2-2-decoder", "unet_forward"),
        (
            "tiny",
            "kandinsky-2-2-decoder-inpaint",
            "unet_inpaint_forward",
        ),
        (
            "tiny",
            "kandinsky-2-2-controlnet-depth",
            "unet_controlnet_forward",
        ),
    ] {
        let unet = load_unet(size, ckpt, DType::F32);
        let r = refs(size, name);
        let twice = |t: &Tensor| Tensor::cat(&[t, t], 0).unwrap();
        let sample = get(&r, "sample");
        let b = sample.dim(0).unwrap();
        let embeds = twice(get(&r, "image_embeds"));
        let hint = r.get("hint").map(twice);
        let cond = UNetConditioning::image(&embeds).with_hint(hint.as_ref());
        let (ta, tb) = (timestep(&r, "timestep_a"), timestep(&r, "timestep_b"));
        let ts: Vec<f64> = (0..2 * b).map(|i| if i < b { ta } else { tb }).collect();
        let out = unet
            .forward_rows(&twice(sample), &ts, &cond, &kd_models::interrupt::never)
            .unwrap();
        let (a, bb) = (out.narrow(0, 0, b).unwrap(), out.narrow(0, b, b).unwrap());
        assert_close(&format!("{name} rows at t_a"), &a, get(&r, "out_a"), 1e-4);
        assert_close(&format!("{name} rows at t_b"), &bb, get(&r, "out_b"), 1e-4);
        let single = UNetConditioning::image(get(&r, "image_embeds")).with_hint(r.get("hint"));
        let alone = unet.forward(sample, tb, &single).unwrap();
        let err = rel_l2(&bb, &alone).unwrap();
        eprintln!("{size}/{name}: batched vs alone rel L2 {err:e}");
        assert!(
            err <= 1e-5,
            "{name}: batched rows differ from the rows alone: {err:e}"
        );
    }
    // One timestep per row, no more, no less.
    let unet = load_unet("tiny", "kandinsky-2-2-decoder", DType::F32);
    let r = refs("tiny", "unet_forward");
    let cond = UNetConditioning::image(get(&r, "image_embeds"));
    let e = unet
        .forward_rows(
            get(&r, "sample"),
            &[1.0; 7],
            &cond,
            &kd_models::interrupt::never,
        )
        .unwrap_err();
    assert!(invalid_message(e).starts_with("timesteps:"));
}
