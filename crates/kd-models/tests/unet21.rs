//! Kandinsky 2.1 UNet forward parity (`text_image` time embedding, `text_image_proj` context)
//! against the diffusers references in `tests/fixtures/kd21/reference/` (`tools/reference/KD21.md`),
//! and the conditioning checks of the 2.1/2.2 UNets.

use candle_core::{DType, Device, Tensor};
use kd_models::unet::{UNet2DConditionModel, UNetConditioning};
use kd_models::{CheckpointDir, ModelError, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;

fn load_unet(root: &str, ckpt: &str, dtype: DType) -> UNet2DConditionModel {
    let dir = CheckpointDir::open(fixtures_dir().join(root).join(ckpt)).unwrap();
    let comp = dir.component("unet").unwrap();
    let cfg = comp.unet_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    load_reference(
        fixtures_dir()
            .join("kd21/reference")
            .join(format!("{name}.safetensors")),
    )
    .unwrap()
}

/// One forward at the stored timestep; every stored intermediate (on the batch rows it has)
/// and the output within `tol` (intermediates are asserted for f32 only).
fn check(ckpt: &str, name: &str, dtype: DType, tol: f64) {
    let unet = load_unet("kd21", ckpt, dtype);
    assert!(unet.takes_text() && !unet.takes_hint());
    assert_eq!(unet.text_hidden_dim(), Some(48));
    assert_eq!(unet.text_embed_dim(), Some(32));
    let r = refs(name);
    let t = get(&r, "timestep")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let cond = UNetConditioning::image(get(&r, "image_embeds"))
        .with_text(get(&r, "text_embeds"), get(&r, "encoder_hidden_states"));
    let mut inter = Vec::new();
    let out = unet
        .forward_traced(get(&r, "sample"), t, &cond, &mut |n, x| {
            inter.push((n.to_string(), x.clone()))
        })
        .unwrap();
    let mut checked = 0;
    for (n, x) in &inter {
        let key = format!("inter.{n}");
        let Some(want) = r.get(&key) else { continue };
        let got = x.narrow(0, 0, want.dim(0).unwrap()).unwrap();
        let err = rel_l2(&got, want).unwrap();
        eprintln!("kd21/{name} {dtype:?} {key}: rel L2 {err:e}");
        if dtype == DType::F32 {
            assert!(err <= tol, "{key}: {err:e}");
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} intermediates compared");
    let err = rel_l2(&out, get(&r, "out")).unwrap();
    eprintln!("kd21/{name} {dtype:?}: out rel L2 {err:e}");
    assert_close("out", &out, get(&r, "out"), tol);
}

#[test]
fn kd21_unet_f32() {
    check("kandinsky-2-1", "unet_forward", DType::F32, 1e-4);
}

#[test]
fn kd21_inpaint_unet_f32() {
    check(
        "kandinsky-2-1-inpaint",
        "unet_inpaint_forward",
        DType::F32,
        1e-4,
    );
}

#[test]
fn kd21_unet_f16() {
    check("kandinsky-2-1", "unet_forward", DType::F16, 1e-2);
}

#[test]
fn kd21_inpaint_unet_f16() {
    check(
        "kandinsky-2-1-inpaint",
        "unet_inpaint_forward",
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

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn kd21_bad_inputs_are_clear_errors() {
    let unet = load_unet("kd21", "kandinsky-2-1", DType::F32);
    let x = zeros(&[2, 4, 8, 8]);
    let e = zeros(&[2, 32]);
    let te = zeros(&[2, 32]);
    let hs = zeros(&[2, 77, 48]);
    let fwd = |c: UNetConditioning| invalid_message(unet.forward(&x, 1.0, &c).unwrap_err());

    let m = fwd(UNetConditioning::image(&e));
    assert!(
        m.starts_with("text:")
            && m.contains("2.1")
            && m.contains("text_embeds (2, 32)")
            && m.contains("hidden_states (2, L, 48)"),
        "{m}"
    );
    let bad = zeros(&[2, 48]);
    let m = fwd(UNetConditioning::image(&e).with_text(&bad, &hs));
    assert!(
        m.starts_with("text_embeds") && m.contains("expected (2, 32)"),
        "{m}"
    );
    let bad = zeros(&[2, 77, 32]);
    let m = fwd(UNetConditioning::image(&e).with_text(&te, &bad));
    assert!(
        m.starts_with("text_hidden_states") && m.contains("expected (2, L, 48)"),
        "{m}"
    );
    let bad = zeros(&[1, 77, 48]);
    let m = fwd(UNetConditioning::image(&e).with_text(&te, &bad));
    assert!(m.starts_with("text_hidden_states"), "{m}");
    let bad = zeros(&[2, 48]);
    let m = fwd(UNetConditioning::image(&bad).with_text(&te, &hs));
    assert!(
        m.starts_with("image_embeds") && m.contains("expected (2, 32)"),
        "{m}"
    );
    let m = fwd(UNetConditioning::image(&e)
        .with_text(&te, &hs)
        .with_hint(Some(&x)));
    assert!(m.starts_with("hint") && m.contains("takes no hint"), "{m}");
    // Any text length works (the projection is per token).
    let short = zeros(&[2, 5, 48]);
    let out = unet
        .forward(&x, 1.0, &UNetConditioning::image(&e).with_text(&te, &short))
        .unwrap();
    assert_eq!(out.dims(), [2, 8, 8, 8]);

    let inpaint = load_unet("kd21", "kandinsky-2-1-inpaint", DType::F32);
    let m = invalid_message(
        inpaint
            .forward(&x, 1.0, &UNetConditioning::image(&e).with_text(&te, &hs))
            .unwrap_err(),
    );
    assert!(m.contains("expected (B, 9, H, W)"), "{m}");
}

#[test]
fn kd22_unet_rejects_text() {
    let unet = load_unet("tiny", "kandinsky-2-2-decoder", DType::F32);
    assert!(!unet.takes_text());
    assert_eq!(unet.text_hidden_dim(), None);
    assert_eq!(unet.text_embed_dim(), None);
    let x = zeros(&[1, 4, 8, 8]);
    let e = zeros(&[1, 32]);
    let hs = zeros(&[1, 77, 48]);
    let m = invalid_message(
        unet.forward(&x, 1.0, &UNetConditioning::image(&e).with_text(&e, &hs))
            .unwrap_err(),
    );
    assert!(
        m.starts_with("text:") && m.contains("2.2") && m.contains("expected no text"),
        "{m}"
    );
}
