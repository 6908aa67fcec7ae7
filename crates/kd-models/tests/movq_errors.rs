//! MoVQ input validation: bad shapes give `InvalidInput` with the allowed values.

use candle_core::{DType, Device, Tensor};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::{CheckpointDir, ModelError};
use kd_testkit::parity::fixtures_dir;

fn movq() -> VqModel {
    let ckpt = CheckpointDir::open(fixtures_dir().join("deep/kandinsky-2-2-decoder")).unwrap();
    VqModel::load(
        &ckpt.component("movq").unwrap(),
        MovqOptions::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn msg(r: kd_models::Result<Tensor>, field: &str) -> String {
    match r {
        Err(ModelError::InvalidInput { field: f, message }) => {
            assert_eq!(f, field, "{message}");
            message
        }
        other => panic!("expected InvalidInput for `{field}`, got {other:?}"),
    }
}

#[test]
fn decode_rejects_bad_latents() {
    let m = movq();
    let z = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.decode(&z), "latents");
    assert!(s.contains("expected 4 channels"), "{s}");
    let z = Tensor::zeros((1, 4, 0, 8), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.decode(&z), "latents");
    assert!(s.contains("at least 1"), "{s}");
    let z = Tensor::zeros((4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.decode(&z), "latents");
    assert!(s.contains("4-D"), "{s}");
    // A 1×1 latent is the smallest valid input: 8×8 pixels.
    let z = Tensor::zeros((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.decode(&z).unwrap().dims(), &[1, 3, 8, 8]);
}

#[test]
fn encode_rejects_bad_images() {
    let m = movq();
    let x = Tensor::zeros((1, 4, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.encode(&x), "image");
    assert!(s.contains("expected 3 channels"), "{s}");
    let x = Tensor::zeros((1, 3, 60, 64), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.encode(&x), "image");
    assert!(s.contains("multiples of 8") && s.contains("60×64"), "{s}");
    let x = Tensor::zeros((1, 3, 0, 0), DType::F32, &Device::Cpu).unwrap();
    let s = msg(m.encode(&x), "image");
    assert!(s.contains("positive multiples of 8"), "{s}");
}
