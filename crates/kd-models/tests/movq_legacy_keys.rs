//! Old hub files name the MoVQ attention projections `query/key/value/proj_attn`; diffusers renames
//! them on load (`_convert_deprecated_attention_blocks`). The port must accept both spellings.

use candle_core::{DType, Device, Tensor};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::{CheckpointDir, Variant, Weights};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference};
use std::collections::HashMap;

#[test]
fn legacy_attention_key_names_load_and_match() {
    let root = fixtures_dir().join("tiny");
    let comp = CheckpointDir::open(root.join("kandinsky-2-2-decoder"))
        .unwrap()
        .component("movq")
        .unwrap();
    let cfg = comp.vq_config().unwrap();
    let weights = comp.weights(Variant::Default).unwrap();
    let mut renamed: HashMap<String, Tensor> = HashMap::new();
    let mut n_legacy = 0;
    for key in weights.keys() {
        let t = weights
            .load_unchecked(key, DType::F32, &Device::Cpu)
            .unwrap();
        let new = key
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        n_legacy += usize::from(new != key);
        renamed.insert(new, t);
    }
    assert!(
        n_legacy >= 16,
        "expected attention keys to rename, got {n_legacy}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let vb = Weights::open_files(vec![path])
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let movq = VqModel::new(&cfg, MovqOptions::default(), vb).unwrap();
    let r = load_reference(root.join("reference/decoder/movq.safetensors")).unwrap();
    let d = movq.decode(get(&r, "latents")).unwrap();
    assert_close("legacy-key decode", &d, get(&r, "decoded"), 1e-4);
    let e = movq.encode(get(&r, "image")).unwrap();
    assert_close("legacy-key encode", &e, get(&r, "latents"), 1e-4);
}
