//! Kandinsky 2.0's `Text2ImUNet` / `InpaintText2ImUNet` against the official code
//! (`tests/fixtures/kd20-unet/`, made by `tools/reference/gen_kd20_unet.py`), loaded from the
//! official-format `torch.save(state_dict)` through the safe pickle reader; intermediates; input
//! validation; a missing key named with the file.

use candle_core::{DType, Device, Tensor};
use kd_models::kd20::unet::{Kd20Inpaint, Kd20UnetConfig, Kd20UnetText, Text2ImUNet};
use kd_models::ModelError;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f64 = 1e-4;

fn dir(sub: &str) -> PathBuf {
    fixtures_dir().join("kd20-unet").join(sub)
}

fn load(sub: &str, dtype: DType) -> (Text2ImUNet, HashMap<String, Tensor>) {
    let cfg = Kd20UnetConfig::from_file(&dir(sub).join("config.json")).unwrap();
    let m = Text2ImUNet::load(&dir(sub).join("model.pt"), &cfg, dtype, &Device::Cpu).unwrap();
    let refs = load_reference(dir(sub).join("reference.safetensors")).unwrap();
    (m, refs)
}

fn check(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let actual = actual.to_dtype(DType::F32).unwrap();
    let err = rel_l2(&actual, expected).unwrap();
    eprintln!("{what}: rel L2 {err:.3e}");
    assert_close(what, &actual, expected, tol);
}

fn never() -> bool {
    false
}

fn text(r: &HashMap<String, Tensor>) -> Kd20UnetText<'_> {
    Kd20UnetText {
        full1: get(r, "full_emb1"),
        pooled1: get(r, "pooled_emb1"),
        full2: get(r, "full_emb2"),
        pooled2: None,
    }
}

#[test]
fn fixture_config_parses_as_the_official_dict() {
    let c = Kd20UnetConfig::from_file(&dir("").join("config.json")).unwrap();
    assert_eq!(
        (
            c.num_channels,
            c.model_dim,
            c.norm_num_groups,
            c.text_encoder2_dim
        ),
        (8, 24, 4, 16)
    );
    let d = Kd20UnetConfig::default();
    let p = std::path::Path::new("x");
    assert_eq!(d.channel_mult(p).unwrap(), [1, 2, 3, 4]);
    assert_eq!(d.attention_ds(p).unwrap(), [2, 4, 8]);
    assert_eq!(
        (
            d.norm_num_groups,
            d.text_encoder2_dim,
            d.model_in_channels()
        ),
        (32, 512, 4)
    );
}

#[test]
fn forward_matches_the_official_text2im_unet() {
    let (m, r) = load("", DType::F32);
    let emb = m.text_embedding(&text(&r)).unwrap();
    check("xf_proj", &emb.xf_proj, get(&r, "xf_proj"), TOL);
    check("xf_out", &emb.xf_out, get(&r, "xf_out"), TOL);
    let t = get(&r, "timesteps");
    let (out, tr) = m
        .forward_traced(get(&r, "x"), t, &text(&r), None, &never)
        .unwrap();
    check("time_emb", &tr.time_emb, get(&r, "time_emb"), TOL);
    check("emb", &tr.emb, get(&r, "emb"), TOL);
    check(
        "input_block_1",
        &tr.input_blocks[1],
        get(&r, "input_block_1"),
        TOL,
    );
    check(
        "input_block_2",
        &tr.input_blocks[2],
        get(&r, "input_block_2"),
        TOL,
    );
    check("middle", &tr.middle, get(&r, "middle"), TOL);
    check("out", &out, get(&r, "out"), TOL);
    // The cached-embedding path gives the same output.
    let out2 = m
        .forward_with_text_emb(get(&r, "x"), t, &emb, None, &never)
        .unwrap();
    check("out (cached text emb) vs out", &out2, &out, 1e-6);
    assert_eq!(out.dtype(), DType::F32);
}

#[test]
fn forward_in_f16_is_close() {
    let (m, r) = load("", DType::F16);
    let out = m
        .forward(get(&r, "x"), get(&r, "timesteps"), &text(&r), &never)
        .unwrap();
    assert_eq!(out.dtype(), DType::F32);
    check("out f16", &out, get(&r, "out"), 2e-2);
}

#[test]
fn inpaint_forward_matches_the_official_model() {
    let (m, r) = load("inpaint", DType::F32);
    let emb = m.text_embedding(&text(&r)).unwrap();
    check("inpaint xf_proj", &emb.xf_proj, get(&r, "xf_proj"), TOL);
    check("inpaint xf_out", &emb.xf_out, get(&r, "xf_out"), TOL);
    let inp = Kd20Inpaint {
        image: get(&r, "inpaint_image"),
        mask: get(&r, "inpaint_mask"),
    };
    let out = m
        .forward_inpaint(get(&r, "x"), get(&r, "timesteps"), &text(&r), inp, &never)
        .unwrap();
    check("inpaint out", &out, get(&r, "out"), TOL);
}

fn field(e: ModelError) -> &'static str {
    match e {
        ModelError::InvalidInput { field, .. } => field,
        other => panic!("expected InvalidInput, got {other}"),
    }
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (m, r) = load("", DType::F32);
    let x = get(&r, "x");
    let t = get(&r, "timesteps");
    let dev = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    let call = |x: &Tensor, t: &Tensor, tx: Kd20UnetText| m.forward(x, t, &tx, &never).unwrap_err();
    assert_eq!(field(call(&z(&[2, 3, 16, 16]), t, text(&r))), "x");
    assert_eq!(field(call(&z(&[2, 4, 15, 16]), t, text(&r))), "x");
    assert_eq!(field(call(x, &z(&[3]), text(&r))), "timesteps");
    let bad = z(&[2, 5, 7]);
    assert_eq!(
        field(call(
            x,
            t,
            Kd20UnetText {
                full1: &bad,
                ..text(&r)
            }
        )),
        "full_emb1"
    );
    let bad = z(&[1, 12]);
    assert_eq!(
        field(call(
            x,
            t,
            Kd20UnetText {
                pooled1: &bad,
                ..text(&r)
            }
        )),
        "pooled_emb1"
    );
    let bad = z(&[2, 7, 512]);
    assert_eq!(
        field(call(
            x,
            t,
            Kd20UnetText {
                full2: &bad,
                ..text(&r)
            }
        )),
        "full_emb2"
    );
    let img = z(&[2, 4, 16, 16]);
    let mask = z(&[2, 1, 16, 16]);
    let inp = Kd20Inpaint {
        image: &img,
        mask: &mask,
    };
    let e = m.forward_inpaint(x, t, &text(&r), inp, &never).unwrap_err();
    assert_eq!(field(e), "inpaint");

    let (mi, ri) = load("inpaint", DType::F32);
    let bad_mask = z(&[2, 4, 16, 16]);
    let inp = Kd20Inpaint {
        image: &img,
        mask: &bad_mask,
    };
    let e = mi
        .forward_inpaint(get(&ri, "x"), t, &text(&ri), inp, &never)
        .unwrap_err();
    assert_eq!(field(e), "inpaint_mask");
}

#[test]
fn stop_interrupts_between_blocks() {
    let (m, r) = load("", DType::F32);
    let e = m
        .forward(get(&r, "x"), get(&r, "timesteps"), &text(&r), &|| true)
        .unwrap_err();
    assert!(matches!(e, ModelError::Interrupted { .. }), "{e}");
}

#[test]
fn a_checkpoint_missing_a_tensor_names_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.pt");
    let mut bytes = std::fs::read(dir("").join("model.pt")).unwrap();
    let key = b"middle_block.1.encoder_kv.weight";
    let hits: Vec<usize> = bytes
        .windows(key.len())
        .enumerate()
        .filter(|(_, w)| w == key)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "the key is stored once");
    bytes[hits[0] + key.len() - "weight".len() - 1] = b'X';
    std::fs::write(&path, bytes).unwrap();
    let cfg = Kd20UnetConfig::from_file(&dir("").join("config.json")).unwrap();
    let err = Text2ImUNet::load(&path, &cfg, DType::F32, &Device::Cpu).unwrap_err();
    match &err {
        ModelError::MissingTensor {
            files,
            key,
            expected,
        } => {
            assert_eq!(key, "middle_block.1.encoder_kv.weight");
            assert!(files.contains(&path.display().to_string()), "{files}");
            assert_eq!(expected, &[32, 24, 1]);
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
}

#[test]
fn unsupported_config_values_are_refused() {
    let cfg = Kd20UnetConfig {
        pooling_type: "attention_pooling".into(),
        ..Kd20UnetConfig::default()
    };
    let e = cfg.validate(std::path::Path::new("c.json")).unwrap_err();
    assert!(e.to_string().contains("pooling_type"), "{e}");
}
