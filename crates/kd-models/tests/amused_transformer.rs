//! Parity of aMUSEd's `UVit2DModel` against the diffusers reference
//! (`tests/fixtures/{tiny,deep}/reference/amused/transformer.safetensors`, and
//! `tests/fixtures/tiny/reference/amused-flat/` for a transformer without down/upsampling), and
//! its input checks.

use candle_core::{DType, Device, Tensor};
use kd_models::config::{read_json, UVit2DConfig};
use kd_models::interrupt;
use kd_models::uvit::UVit2DModel;
use kd_models::{ModelError, Variant, Weights};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/<size>/<ckpt>/transformer`.
fn component_dir(size: &str, ckpt: &str) -> PathBuf {
    fixtures_dir().join(size).join(ckpt).join("transformer")
}

/// Loads the transformer straight from its folder (config + weights), without the pipeline's
/// `model_index.json`.
fn load_dir(dir: &Path, dtype: DType) -> UVit2DModel {
    let cfg: UVit2DConfig = read_json(&dir.join("config.json")).unwrap();
    let vb = Weights::open_dir(dir, Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    UVit2DModel::new(&cfg, vb).unwrap()
}

fn refs(size: &str) -> HashMap<String, Tensor> {
    load_reference(
        fixtures_dir()
            .join(size)
            .join("reference/amused/transformer.safetensors"),
    )
    .unwrap()
}

/// Runs the reference inputs, reports (and checks, in f32) the intermediates, checks the logits;
/// returns the logits' relative L2 error.
fn check(model: &UVit2DModel, r: &HashMap<String, Tensor>, what: &str, tol: f64) -> f64 {
    let mut inter: Vec<(String, Tensor)> = Vec::new();
    let logits = model
        .forward_traced(
            get(r, "input_ids"),
            get(r, "encoder_hidden_states"),
            get(r, "pooled_text_emb"),
            get(r, "micro_conds"),
            &interrupt::never,
            &mut |n, t| inter.push((n.to_string(), t.clone())),
        )
        .unwrap();
    for (n, t) in &inter {
        if let Some(want) = r.get(n) {
            let err = rel_l2(t, want).unwrap();
            eprintln!("{what} {n}: rel L2 {err:e}");
            if model.dtype() == DType::F32 {
                assert!(
                    err <= tol,
                    "{what} {n}: relative L2 error {err:e} > {tol:e}"
                );
            }
        }
    }
    let want = get(r, "logits");
    let err = rel_l2(&logits, want).unwrap();
    eprintln!("{what} logits: rel L2 {err:e}");
    assert_close(&format!("{what} logits"), &logits, want, tol);
    err
}

#[test]
fn tiny_logits_match_diffusers() {
    let model = load_dir(&component_dir("tiny", "amused-256"), DType::F32);
    check(&model, &refs("tiny"), "tiny", 1e-4);
}

#[test]
fn deep_logits_match_diffusers() {
    let model = load_dir(&component_dir("deep", "amused-512"), DType::F32);
    check(&model, &refs("deep"), "deep", 1e-4);
}

/// Without down/upsampling (as the real amused-256), with biases and non-affine norms.
#[test]
fn flat_logits_match_diffusers() {
    let dir = fixtures_dir().join("tiny/amused-transformer-flat");
    let model = load_dir(&dir, DType::F32);
    assert!(!model.config().downsample && model.config().use_bias);
    let r =
        load_reference(fixtures_dir().join("tiny/reference/amused-flat/transformer.safetensors"))
            .unwrap();
    check(&model, &r, "flat", 1e-4);
}

#[test]
fn u32_ids_give_the_same_logits() {
    let model = load_dir(&component_dir("tiny", "amused-256"), DType::F32);
    let r = refs("tiny");
    let ids = get(&r, "input_ids").to_dtype(DType::U32).unwrap();
    let logits = model
        .forward(
            &ids,
            get(&r, "encoder_hidden_states"),
            get(&r, "pooled_text_emb"),
            get(&r, "micro_conds"),
            &interrupt::never,
        )
        .unwrap();
    assert_close("u32 ids", &logits, get(&r, "logits"), 1e-4);
}

#[test]
fn deep_f16_and_bf16_stay_close() {
    let r = refs("deep");
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 6e-2)] {
        let model = load_dir(&component_dir("deep", "amused-512"), dtype);
        check(&model, &r, &format!("deep {dtype:?}"), tol);
    }
}

#[test]
fn loads_through_the_component_dir() {
    let ckpt = kd_models::CheckpointDir::open(fixtures_dir().join("tiny/amused-256")).unwrap();
    let comp = ckpt.component("transformer").unwrap();
    let model = UVit2DModel::load(&comp, DType::F32, &Device::Cpu).unwrap();
    let r = refs("tiny");
    let logits = model
        .forward(
            get(&r, "input_ids"),
            get(&r, "encoder_hidden_states"),
            get(&r, "pooled_text_emb"),
            get(&r, "micro_conds"),
            &interrupt::never,
        )
        .unwrap();
    assert_close("load()", &logits, get(&r, "logits"), 1e-4);
    assert_eq!(
        model.config().codebook_size,
        get(&r, "logits").dim(1).unwrap()
    );
}

/// The tiny model and valid inputs to perturb one at a time.
struct Inputs {
    model: UVit2DModel,
    ids: Tensor,
    ehs: Tensor,
    pooled: Tensor,
    micro: Tensor,
}

impl Inputs {
    fn new() -> Self {
        let model = load_dir(&component_dir("tiny", "amused-256"), DType::F32);
        let r = refs("tiny");
        Self {
            model,
            ids: get(&r, "input_ids").clone(),
            ehs: get(&r, "encoder_hidden_states").clone(),
            pooled: get(&r, "pooled_text_emb").clone(),
            micro: get(&r, "micro_conds").clone(),
        }
    }

    fn run(&self) -> Result<Tensor, ModelError> {
        self.model.forward(
            &self.ids,
            &self.ehs,
            &self.pooled,
            &self.micro,
            &interrupt::never,
        )
    }

    /// Asserts that the current inputs are refused as invalid `field`.
    fn refused(&self, field: &str) {
        match self.run() {
            Err(ModelError::InvalidInput { field: f, message }) => {
                assert_eq!(f, field, "wrong field; message: {message}");
                let shown = ModelError::InvalidInput { field: f, message }.to_string();
                assert!(shown.contains(field), "{shown}");
            }
            other => panic!("expected invalid `{field}`, got {other:?}"),
        }
    }
}

#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let mut x = Inputs::new();
    let vocab = x.model.config().vocab_size as i64;
    let (b, h, w) = x.ids.dims3().unwrap();
    let mut data = x.ids.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    data[3] = vocab;
    x.ids = Tensor::from_vec(data.clone(), (b, h, w), &Device::Cpu).unwrap();
    x.refused("input_ids");
    data[3] = -1;
    x.ids = Tensor::from_vec(data, (b, h, w), &Device::Cpu).unwrap();
    x.refused("input_ids");
    x.ids = Tensor::full(vocab as u32, (b, h, w), &Device::Cpu).unwrap();
    x.refused("input_ids");
    x.ids = Tensor::zeros((b, h, w), DType::F32, &Device::Cpu).unwrap();
    x.refused("input_ids");
}

#[test]
fn bad_id_shapes_are_refused() {
    let mut x = Inputs::new();
    assert!(x.model.config().downsample);
    let (b, h, w) = x.ids.dims3().unwrap();
    x.ids = Tensor::zeros((b, h + 1, w), DType::I64, &Device::Cpu).unwrap();
    x.refused("input_ids");
    x.ids = Tensor::zeros((b, h, w + 1), DType::I64, &Device::Cpu).unwrap();
    x.refused("input_ids");
    x.ids = Tensor::zeros((b, h * w), DType::I64, &Device::Cpu).unwrap();
    x.refused("input_ids");
    x.ids = Tensor::zeros((b, 0, w), DType::I64, &Device::Cpu).unwrap();
    x.refused("input_ids");
}

#[test]
fn bad_conditioning_is_refused() {
    let mut y = Inputs::new();
    let (ids, ehs, pooled, micro) = (
        y.ids.clone(),
        y.ehs.clone(),
        y.pooled.clone(),
        y.micro.clone(),
    );
    let b = ids.dim(0).unwrap();
    let cfg = y.model.config().clone();
    let dev = Device::Cpu;
    let f32s = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();

    y.micro = f32s(&[b, 4]);
    y.refused("micro_conds");
    y.micro = f32s(&[b * 5]);
    y.refused("micro_conds");
    y.micro = f32s(&[b + 1, 5]);
    y.refused("micro_conds");
    y.micro = Tensor::full(f32::NAN, (b, 5), &dev).unwrap();
    y.refused("micro_conds");
    y.micro = micro;

    y.pooled = f32s(&[b + 1, cfg.cond_embed_dim]);
    y.refused("pooled_text_emb");
    y.pooled = f32s(&[b, cfg.cond_embed_dim + 1]);
    y.refused("pooled_text_emb");
    y.pooled = pooled;

    y.ehs = f32s(&[b + 1, 3, cfg.encoder_hidden_size]);
    y.refused("encoder_hidden_states");
    y.ehs = f32s(&[b, 3, cfg.encoder_hidden_size + 1]);
    y.refused("encoder_hidden_states");
    y.ehs = f32s(&[b, cfg.encoder_hidden_size]);
    y.refused("encoder_hidden_states");
    y.ehs = f32s(&[b, 0, cfg.encoder_hidden_size]);
    y.refused("encoder_hidden_states");
    y.ehs = Tensor::zeros((b, 3, cfg.encoder_hidden_size), DType::I64, &dev).unwrap();
    y.refused("encoder_hidden_states");
    y.ehs = ehs;

    // A batch mismatch between the ids and everything else.
    y.ids = Tensor::cat(&[&ids, &ids], 0).unwrap();
    y.refused("encoder_hidden_states");
    y.ids = ids;
    y.run().unwrap();
}

#[test]
fn stop_interrupts_between_layers() {
    let x = Inputs::new();
    let calls = std::cell::Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        calls.get() > 1
    };
    let err = x
        .model
        .forward(&x.ids, &x.ehs, &x.pooled, &x.micro, &stop)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::Interrupted { .. }),
        "expected Interrupted, got {err:?}"
    );
    assert_eq!(calls.get(), 2);
}

#[test]
fn mismatched_down_and_upsampling_is_refused() {
    let dir = component_dir("tiny", "amused-256");
    let mut cfg: UVit2DConfig = read_json(&dir.join("config.json")).unwrap();
    cfg.upsample = !cfg.downsample;
    let vb = Weights::open_dir(&dir, Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = UVit2DModel::new(&cfg, vb).unwrap_err();
    assert!(err.to_string().contains("upsample"), "{err}");
}
