//! MoVQ encode/decode parity against diffusers (`tests/fixtures/{tiny,deep}/reference/decoder/movq`).

use candle_core::{DType, Device, Tensor};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::CheckpointDir;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn load(size: &str, dtype: DType, opts: MovqOptions) -> (VqModel, HashMap<String, Tensor>) {
    let root = fixtures_dir().join(size);
    let ckpt = CheckpointDir::open(root.join("kandinsky-2-2-decoder")).unwrap();
    let movq = VqModel::load(&ckpt.component("movq").unwrap(), opts, dtype, &Device::Cpu).unwrap();
    let refs = load_reference(root.join("reference/decoder/movq.safetensors")).unwrap();
    (movq, refs)
}

fn check(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let actual = actual.to_dtype(DType::F32).unwrap();
    let err = rel_l2(&actual, expected).unwrap();
    eprintln!("{what}: rel L2 {err:.3e}");
    assert_close(what, &actual, expected, tol);
}

fn decode_parity(size: &str) {
    let (movq, r) = load(size, DType::F32, MovqOptions::default());
    let z = get(&r, "ns_latents");
    let pq = movq.post_quant_conv(z).unwrap();
    check(
        &format!("{size} post_quant_conv"),
        &pq,
        get(&r, "inter_ns_decode.post_quant_conv"),
        TOL,
    );
    let mid = movq.decoder().forward_partial(&pq, Some(z), 0).unwrap();
    check(
        &format!("{size} decoder.mid_block"),
        &mid,
        get(&r, "inter_ns_decode.decoder.mid_block"),
        TOL,
    );
    if let Some(up0) = r.get("inter_ns_decode.decoder.up_blocks.0") {
        let a = movq.decoder().forward_partial(&pq, Some(z), 1).unwrap();
        check(&format!("{size} decoder.up_blocks.0"), &a, up0, TOL);
    }
    let ns = movq.decode(z).unwrap();
    check(
        &format!("{size} ns_decoded"),
        &ns,
        get(&r, "ns_decoded"),
        TOL,
    );
    let sq = movq.decode(get(&r, "latents")).unwrap();
    check(&format!("{size} decoded"), &sq, get(&r, "decoded"), TOL);
}

fn encode_parity(size: &str) {
    let (movq, r) = load(size, DType::F32, MovqOptions::default());
    let image = get(&r, "image");
    if let Some(d3) = r.get("inter_encode.encoder.down_blocks.3") {
        let a = movq.encoder().forward_down(image, 4).unwrap();
        check(&format!("{size} encoder.down_blocks.3"), &a, d3, TOL);
    }
    let lat = movq.encode(image).unwrap();
    check(&format!("{size} latents"), &lat, get(&r, "latents"), TOL);
}

#[test]
fn tiny_decode_matches_diffusers() {
    decode_parity("tiny");
}

#[test]
fn deep_decode_matches_diffusers() {
    decode_parity("deep");
}

#[test]
fn tiny_encode_matches_diffusers() {
    encode_parity("tiny");
}

#[test]
fn deep_encode_matches_diffusers() {
    encode_parity("deep");
}

#[test]
fn chunked_attention_matches_unchunked() {
    for size in ["tiny", "deep"] {
        let opts = MovqOptions {
            attention_chunk: 0,
            ..Default::default()
        };
        let (mut movq, r) = load(size, DType::F32, opts);
        let z = get(&r, "latents");
        let full = movq.decode(z).unwrap();
        let full_enc = movq.encode(get(&r, "image")).unwrap();
        // 7 does not divide the token count, so the last chunk is ragged.
        for chunk in [1, 7, 64] {
            movq.set_attention_chunk(chunk);
            let d = movq.decode(z).unwrap();
            let err = rel_l2(&d, &full).unwrap();
            eprintln!("{size} chunk {chunk}: decode rel L2 {err:.3e}");
            assert_close(&format!("{size} decode chunk {chunk}"), &d, &full, 1e-5);
            let e = movq.encode(get(&r, "image")).unwrap();
            assert_close(&format!("{size} encode chunk {chunk}"), &e, &full_enc, 1e-5);
        }
    }
}

#[test]
fn f16_decode_close_to_f32_reference() {
    for size in ["tiny", "deep"] {
        let (movq, r) = load(size, DType::F16, MovqOptions::default());
        let d = movq.decode(get(&r, "latents")).unwrap();
        assert_eq!(d.dtype(), DType::F16);
        check(&format!("{size} f16 decoded"), &d, get(&r, "decoded"), 1e-2);
        let ns = movq.decode(get(&r, "ns_latents")).unwrap();
        check(
            &format!("{size} f16 ns_decoded"),
            &ns,
            get(&r, "ns_decoded"),
            1e-2,
        );
    }
}

#[test]
fn banded_conv_matches_unbanded() {
    for size in ["tiny", "deep"] {
        let whole = MovqOptions {
            conv_band_pixels: 0,
            ..Default::default()
        };
        let (movq, r) = load(size, DType::F32, whole);
        let z = get(&r, "ns_latents");
        let full = movq.decode(z).unwrap();
        let full_enc = movq.encode(get(&r, "image")).unwrap();
        // 1 row per band on the widest maps, ragged bands elsewhere.
        for band in [1, 200] {
            let opts = MovqOptions {
                conv_band_pixels: band,
                ..Default::default()
            };
            let (banded, _) = load(size, DType::F32, opts);
            let d = banded.decode(z).unwrap();
            let err = rel_l2(&d, &full).unwrap();
            eprintln!("{size} conv band {band}: decode rel L2 {err:.3e}");
            assert_close(&format!("{size} decode band {band}"), &d, &full, 1e-5);
            let e = banded.encode(get(&r, "image")).unwrap();
            assert_close(&format!("{size} encode band {band}"), &e, &full_enc, 1e-5);
        }
    }
}
