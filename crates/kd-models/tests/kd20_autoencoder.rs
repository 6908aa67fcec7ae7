//! Kandinsky 2.0's `AutoencoderKL` against the official code (`tests/fixtures/kd20-vae/`, made by
//! `tools/reference/gen_kd20_vae.py`): decode and encode as the 2.0 pipeline does them, loaded
//! from the original-format `vae.ckpt` through the safe pickle reader; input validation; errors
//! naming the missing key and the file.

use candle_core::{DType, Device, Tensor};
use kd_models::kl::{AutoencoderKl, KlConfig};
use kd_models::noise::ReplayNoise;
use kd_models::ModelError;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    fixtures_dir().join("kd20-vae")
}

fn config() -> KlConfig {
    KlConfig::from_file(&dir().join("config.json")).unwrap()
}

fn load(dtype: DType) -> (AutoencoderKl, HashMap<String, Tensor>) {
    let vae = AutoencoderKl::load(&dir().join("vae.ckpt"), &config(), dtype, &Device::Cpu).unwrap();
    let refs = load_reference(dir().join("reference.safetensors")).unwrap();
    (vae, refs)
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

#[test]
fn fixture_config_parses_as_the_official_dict() {
    let c = config();
    assert_eq!(c.name, "AutoencoderKL");
    assert_eq!(c.scale, 0.0512);
    assert_eq!(c.params.embed_dim, 4);
    assert_eq!(c.params.ddconfig.ch_mult, [1, 2, 2]);
    assert_eq!(c.params.ddconfig.norm_num_groups, 2);
    assert_eq!(c.scale_factor(), 4);
    // The official checkpoint has no config: the default is CONFIG_2_0.
    let d = KlConfig::default();
    assert_eq!(
        (d.scale, d.params.ddconfig.ch, d.scale_factor()),
        (0.0512, 128, 8)
    );
    assert_eq!(d.params.ddconfig.norm_num_groups, 32);
}

#[test]
fn decode_matches_the_official_pipeline() {
    let (vae, r) = load(DType::F32);
    let latents = get(&r, "decode_latents");
    // Layer by layer: conv_in + mid block of the decoder, on latents / scale.
    let z = (latents / vae.scale()).unwrap();
    let pq = vae.post_quant_conv(&z).unwrap();
    let mid = vae.decoder().forward_partial(&pq, None, 0).unwrap();
    check("decoder mid", &mid, get(&r, "decoder_mid"), TOL);
    let image = vae.decode(latents).unwrap();
    assert_eq!(image.dims(), [2, 3, 32, 32]);
    check("decode(latents / scale)", &image, get(&r, "decoded"), TOL);
}

#[test]
fn encode_matches_the_official_pipeline() {
    let (vae, r) = load(DType::F32);
    let image = get(&r, "image");
    let down = vae.encoder().forward_down(image, 3).unwrap();
    check("encoder down path", &down, get(&r, "encoder_down"), TOL);
    let moments = vae.moments(image, &never).unwrap();
    check(
        "quant_conv(encoder(image))",
        &moments,
        get(&r, "moments"),
        TOL,
    );
    let posterior = vae.posterior(image, &never).unwrap();
    check(
        "posterior mean",
        posterior.mode(),
        get(&r, "posterior_mean"),
        TOL,
    );
    check(
        "posterior std",
        &posterior.std().unwrap(),
        get(&r, "posterior_std"),
        TOL,
    );
    let mut noise = ReplayNoise::from_stacked(get(&r, "noise")).unwrap();
    let latents = vae.encode(image, &mut noise).unwrap();
    assert_eq!(noise.remaining(), 0, "encode draws exactly one tensor");
    assert_eq!(latents.dtype(), DType::F32);
    check(
        "encode(image).sample() * scale",
        &latents,
        get(&r, "latents"),
        TOL,
    );
}

#[test]
fn fp16_weights_load_in_fp16() {
    let (vae, r) = load(DType::F16);
    assert_eq!(vae.dtype(), DType::F16);
    let image = vae.decode(get(&r, "decode_latents")).unwrap();
    assert_eq!(image.dtype(), DType::F16);
    check("fp16 decode", &image, get(&r, "decoded"), 1e-2);
    let mut noise = ReplayNoise::from_stacked(get(&r, "noise")).unwrap();
    let latents = vae.encode(get(&r, "image"), &mut noise).unwrap();
    check("fp16 encode", &latents, get(&r, "latents"), 1e-2);
}

fn field_of<T: std::fmt::Debug>(r: Result<T, ModelError>) -> (&'static str, String) {
    match r {
        Err(ModelError::InvalidInput { field, message }) => (field, message),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (vae, r) = load(DType::F32);
    let dev = Device::Cpu;
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();

    let (f, m) = field_of(vae.decode(&zeros(&[1, 3, 8, 8])));
    assert_eq!(f, "latents");
    assert!(m.contains("expected 4 channels"), "{m}");
    let (f, m) = field_of(vae.decode(&zeros(&[4, 8, 8])));
    assert_eq!(f, "latents");
    assert!(m.contains("4-D"), "{m}");

    let mut noise = ReplayNoise::from_stacked(get(&r, "noise")).unwrap();
    let (f, m) = field_of(vae.encode(&zeros(&[1, 4, 32, 32]), &mut noise));
    assert_eq!(f, "image");
    assert!(m.contains("expected 3 channels"), "{m}");
    for (h, w) in [(30, 32), (32, 33), (0, 32)] {
        let (f, m) = field_of(vae.encode(&zeros(&[1, 3, h, w]), &mut noise));
        assert_eq!(f, "image");
        assert!(m.contains("multiples of 4"), "{h}×{w}: {m}");
    }
    assert_eq!(noise.remaining(), 1, "nothing is drawn for a refused image");
}

#[test]
fn decode_and_encode_stop_when_asked() {
    let (vae, r) = load(DType::F32);
    for after in [0, 3] {
        let asked = Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() > after
        };
        match vae.decode_interruptible(get(&r, "decode_latents"), &stop) {
            Err(ModelError::Interrupted { piece }) => assert!(!piece.is_empty()),
            other => panic!("expected Interrupted, got {other:?}"),
        }
        asked.set(0);
        let mut noise = ReplayNoise::from_stacked(get(&r, "noise")).unwrap();
        match vae.encode_interruptible(get(&r, "image"), &mut noise, &stop) {
            Err(ModelError::Interrupted { piece }) => assert!(!piece.is_empty()),
            other => panic!("expected Interrupted, got {other:?}"),
        }
    }
}

#[test]
fn a_checkpoint_missing_a_tensor_names_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vae.ckpt");
    let mut bytes = std::fs::read(dir().join("vae.ckpt")).unwrap();
    // Rename the key in the (uncompressed) pickle to a same-length name the model never asks for.
    let key = b"encoder.down.1.block.0.nin_shortcut.weight";
    let hits: Vec<usize> = bytes
        .windows(key.len())
        .enumerate()
        .filter(|(_, w)| w == key)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "the key is stored once");
    bytes[hits[0] + key.len() - "weight".len() - 1] = b'X';
    std::fs::write(&path, bytes).unwrap();

    let err = AutoencoderKl::load(&path, &config(), DType::F32, &Device::Cpu).unwrap_err();
    match &err {
        ModelError::MissingTensor {
            files,
            key,
            expected,
        } => {
            assert_eq!(key, "encoder.down.1.block.0.nin_shortcut.weight");
            assert!(files.contains(&path.display().to_string()), "{files}");
            assert_eq!(expected, &[8, 4, 1, 1]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("vae.ckpt") && msg.contains("nin_shortcut"),
        "{msg}"
    );
}

#[test]
fn the_official_config_on_the_tiny_checkpoint_is_a_shape_error() {
    let err = AutoencoderKl::load(
        &dir().join("vae.ckpt"),
        &KlConfig::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    match err {
        ModelError::ShapeMismatch {
            file,
            key,
            expected,
            actual,
        } => {
            assert!(file.ends_with("vae.ckpt"));
            assert_eq!(key, "encoder.conv_in.weight");
            assert_eq!((expected, actual), (vec![128, 3, 3, 3], vec![4, 3, 3, 3]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn unsupported_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(dir().join("config.json")).unwrap();
    for (from, to, field) in [
        ("\"AutoencoderKL\"", "\"VQModelInterface\"", "name"),
        (
            "\"double_z\": true",
            "\"double_z\": false",
            "ddconfig.double_z",
        ),
        (
            "\"norm_num_groups\": 2",
            "\"norm_num_groups\": 3",
            "not divisible",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let msg = KlConfig::from_file(&path).unwrap_err().to_string();
        assert!(msg.contains(field), "{field}: {msg}");
    }
}
