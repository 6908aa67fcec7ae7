//! PyTorch pickle checkpoints (`.bin`, `.pt`, `.ckpt`) read without executing anything: the
//! fixtures of `tools/reference/gen_pickles.py` under `tests/fixtures/pickle/`.

use candle_core::{DType, Device, Tensor};
use kd_models::checkpoint::{PickleWeights, ALLOWED_GLOBALS};
use kd_models::{ModelError, Variant, Weights};
use kd_testkit::parity::fixtures_dir;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What the malicious fixtures' payloads would create if anything ran them.
const PWNED: &str = "/tmp/kd-pickle-fixture-pwned";

fn fx(rel: &str) -> PathBuf {
    fixtures_dir().join("pickle").join(rel)
}

fn cpu() -> Device {
    Device::Cpu
}

/// The tiny module's tensors as safetensors (what every `.bin` copy must reproduce exactly).
fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx("reference.safetensors"), &cpu()).unwrap()
}

/// A tensor's elements as little-endian bytes, in row-major order.
fn raw(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    fn le<T: Copy, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    match t.dtype() {
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        DType::I16 => le(t.to_vec1::<i16>().unwrap(), i16::to_le_bytes),
        DType::I32 => le(t.to_vec1::<i32>().unwrap(), i32::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>().unwrap(), i64::to_le_bytes),
        DType::F16 => le(t.to_vec1::<half::f16>().unwrap(), half::f16::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<half::bf16>().unwrap(), half::bf16::to_le_bytes),
        DType::F32 => le(t.to_vec1::<f32>().unwrap(), f32::to_le_bytes),
        DType::F64 => le(t.to_vec1::<f64>().unwrap(), f64::to_le_bytes),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Every key of `w` loads, with its stored dtype and shape, bit-equal to `expected`.
fn assert_bit_equal(
    w: &Weights,
    expected: &HashMap<String, Tensor>,
    rename: impl Fn(&str) -> String,
) {
    let mut want: Vec<String> = expected.keys().map(|k| rename(k)).collect();
    want.sort();
    assert_eq!(w.keys(), want, "{:?}", w.paths());
    for (k, t) in expected {
        let name = rename(k);
        let got = w.load(&name, t.dims(), t.dtype(), &cpu()).unwrap();
        assert_eq!(got.dtype(), t.dtype(), "{name}");
        assert_eq!(got.dims(), t.dims(), "{name}");
        assert_eq!(raw(&got), raw(t), "{name}");
    }
}

fn copy_into(dir: &Path, from: &str, to: &str) {
    std::fs::copy(fx(from), dir.join(to)).unwrap();
}

fn err_of(r: Result<impl std::fmt::Debug, ModelError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bin_folder_loads_bit_equal_to_safetensors() {
    let dir = fx("bin");
    let w = Weights::open_dir(&dir, Variant::Default).unwrap();
    assert_eq!(
        w.paths(),
        [dir.join("diffusion_pytorch_model.bin").as_path()]
    );
    assert_bit_equal(&w, &reference(), str::to_string);
    assert_eq!(
        w.info("conv_in.weight").unwrap(),
        (vec![3, 2, 3, 3], safetensors::Dtype::F32)
    );
    assert_eq!(
        w.info("bn.num_batches_tracked").unwrap(),
        (vec![], safetensors::Dtype::I64)
    );
    // fp16 on request, as for safetensors.
    let h = w.load("proj.weight", &[4, 3], DType::F16, &cpu()).unwrap();
    assert_eq!(h.dtype(), DType::F16);
}

#[test]
fn bin_lookups_keep_the_shape_checks_and_messages() {
    let dir = fx("bin");
    let w = Weights::open_dir(&dir, Variant::Default).unwrap();
    let e = err_of(w.load("proj.weight", &[3, 4], DType::F32, &cpu()));
    assert!(
        e.contains("diffusion_pytorch_model.bin")
            && e.contains("`proj.weight` has shape [4, 3], expected [3, 4]"),
        "{e}"
    );
    let e = err_of(w.load("nope.weight", &[1], DType::F32, &cpu()));
    assert!(
        e.contains("diffusion_pytorch_model.bin") && e.contains("`nope.weight` is missing"),
        "{e}"
    );

    // Through a VarBuilder, as model constructors use it.
    let vb = Weights::open_dir(&dir, Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &cpu());
    let t = vb.get((3, 2, 3, 3), "conv_in.weight").unwrap();
    assert_eq!(raw(&t), raw(&reference()["conv_in.weight"]));
    assert!(vb.contains_tensor("blocks.0.weight"));
    let e = ModelError::from(vb.get((2, 2), "norm.weight").unwrap_err());
    assert!(
        matches!(&e, ModelError::ShapeMismatch { file, .. } if file.ends_with("diffusion_pytorch_model.bin")),
        "{e}"
    );
}

#[test]
fn safetensors_wins_over_bin() {
    for st_name in ["diffusion_pytorch_model.safetensors", "model.safetensors"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_into(
            tmp.path(),
            "bin/diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.bin",
        );
        copy_into(tmp.path(), "reference.safetensors", st_name);
        for variant in [Variant::Default, Variant::Fp16] {
            let w = Weights::open_dir(tmp.path(), variant).unwrap();
            assert_eq!(w.paths(), [tmp.path().join(st_name).as_path()]);
            assert_bit_equal(&w, &reference(), str::to_string);
        }
    }
}

#[test]
fn fp16_bin_variant_is_preferred_only_when_asked() {
    let dir = fx("variant");
    let w = Weights::open_dir(&dir, Variant::Default).unwrap();
    assert_eq!(w.paths(), [dir.join("pytorch_model.bin").as_path()]);
    assert_bit_equal(&w, &reference(), str::to_string);

    let w = Weights::open_dir(&dir, Variant::Fp16).unwrap();
    assert_eq!(w.paths(), [dir.join("pytorch_model.fp16.bin").as_path()]);
    assert_eq!(w.info("proj.weight").unwrap().1, safetensors::Dtype::F16);
    let half: HashMap<String, Tensor> = reference()
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v.to_dtype(DType::F16).unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    assert_bit_equal(&w, &half, str::to_string);

    // Only the fp16 file: the default variant falls back to it.
    let tmp = tempfile::tempdir().unwrap();
    copy_into(
        tmp.path(),
        "variant/pytorch_model.fp16.bin",
        "pytorch_model.fp16.bin",
    );
    let w = Weights::open_dir(tmp.path(), Variant::Default).unwrap();
    assert_eq!(w.info("proj.weight").unwrap().1, safetensors::Dtype::F16);
}

#[test]
fn sharded_bin_index_loads_every_shard() {
    let dir = fx("sharded");
    let w = Weights::open_dir(&dir, Variant::Default).unwrap();
    assert_eq!(w.paths().len(), 2);
    assert_bit_equal(&w, &reference(), str::to_string);
}

/// `protocol4.pt` (FRAME, MEMOIZE, STACK_GLOBAL, ...) and `zip64.pt` (ZIP64 records, as torch
/// writes checkpoints over 4 GiB) hold three of the reference tensors.
#[test]
fn protocol_4_pickles_and_zip64_archives_load() {
    let r = reference();
    let expected: HashMap<String, Tensor> =
        ["conv_in.weight", "proj.bias", "bn.num_batches_tracked"]
            .into_iter()
            .map(|k| (k.to_string(), r[k].clone()))
            .collect();
    for file in ["protocol4.pt", "zip64.pt"] {
        let w = Weights::open_pickle(&fx(file), None).unwrap();
        assert_bit_equal(&w, &expected, str::to_string);
    }
}

#[test]
fn lightning_ckpt_sub_dict_and_flattened_names() {
    let path = fx("lightning.ckpt");
    let w = Weights::open_pickle(&path, Some("state_dict")).unwrap();
    assert_bit_equal(&w, &reference(), |k| format!("model.{k}"));

    // No key: nested dicts flatten to dotted names; numbers, strings and the optimizer state
    // (tensors inside a list) are ignored.
    let all = PickleWeights::open(&path, None).unwrap();
    let keys = all.keys();
    assert_eq!(keys.len(), reference().len() + 1, "{keys:?}");
    assert!(
        keys.contains(&"state_dict.model.conv_in.weight"),
        "{keys:?}"
    );
    assert!(keys
        .iter()
        .all(|k| k.starts_with("state_dict.model.") || *k == "ema.shadow.proj.weight"));
    let shadow = all.load("ema.shadow.proj.weight", &cpu()).unwrap();
    let twice = (&reference()["proj.weight"] * 2.0).unwrap();
    assert_eq!(raw(&shadow), raw(&twice));

    assert!(PickleWeights::open(&path, Some("hparams"))
        .unwrap()
        .is_empty());
    let e = err_of(PickleWeights::open(&path, Some("global_step")));
    assert!(
        e.contains("lightning.ckpt") && e.contains("`global_step` is an int, not a dict"),
        "{e}"
    );
    let e = err_of(PickleWeights::open(&path, Some("model")));
    assert!(
        e.contains("no top-level key `model`")
            && e.contains("`state_dict`")
            && e.contains("`epoch`"),
        "{e}"
    );
}

#[test]
fn dtypes_and_views_match_the_contiguous_sidecar() {
    let w = PickleWeights::open(fx("dtypes.pt"), None).unwrap();
    let sidecar = std::fs::read(fx("dtypes_expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&sidecar).unwrap();
    let mut names: Vec<String> = expected.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert_eq!(w.keys(), names);
    for name in &names {
        let view = expected.tensor(name).unwrap();
        let info = w.info(name).unwrap();
        assert_eq!(info.shape, view.shape(), "{name}");
        assert_eq!(info.stored, view.dtype(), "{name}");
        let t = w.load(name, &cpu()).unwrap();
        assert_eq!(t.dims(), view.shape(), "{name}");
        assert_eq!(t.dtype(), info.dtype, "{name}");
        match view.dtype() {
            // candle has no i8: widened to i16.
            safetensors::Dtype::I8 => {
                assert_eq!(t.dtype(), DType::I16);
                let want: Vec<i16> = view.data().iter().map(|&b| i16::from(b as i8)).collect();
                assert_eq!(
                    t.flatten_all().unwrap().to_vec1::<i16>().unwrap(),
                    want,
                    "{name}"
                );
            }
            // candle has no bool: u8 0/1, the same bytes.
            safetensors::Dtype::BOOL => {
                assert_eq!(t.dtype(), DType::U8);
                assert_eq!(raw(&t), view.data(), "{name}");
            }
            _ => assert_eq!(raw(&t), view.data(), "{name}"),
        }
    }
    for (name, contiguous) in [
        ("f32", true),
        ("row_slice", true),
        ("shared_b", true),
        ("transposed", false),
        ("col_stride", false),
        ("expanded", false),
    ] {
        assert_eq!(w.info(name).unwrap().contiguous, contiguous, "{name}");
    }
    assert_eq!(w.info("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(w.info("empty").unwrap().shape, [0, 3]);
    // Loading converts like any other weight.
    let x = w
        .load("bf16", &cpu())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(x.dims(), [3]);
}

#[test]
fn a_huge_expanded_view_is_refused_at_load() {
    let path = fx("expanded_huge.pt");
    let w = PickleWeights::open(&path, None).unwrap();
    assert_eq!(w.info("huge").unwrap().shape, [1usize << 40]);
    let e = err_of(w.load("huge", &cpu()));
    assert!(
        e.contains("expanded_huge.pt") && e.contains("expanded view"),
        "{e}"
    );
}

#[test]
fn malicious_pickles_are_refused_naming_the_global() {
    let pwned = Path::new(PWNED);
    assert!(
        !pwned.exists(),
        "{PWNED} exists before the test: something ran a malicious fixture's payload; remove it"
    );
    let cases = [
        ("evil/os_system.pt", "the pickle names `os.system`"),
        ("evil/builtins_eval.pt", "the pickle names `builtins.eval`"),
        (
            "evil/load_from_bytes.pt",
            "the pickle names `torch.storage._load_from_bytes` (a nested pickle)",
        ),
        ("evil/inst_popen.pt", "the pickle names `subprocess.Popen`"),
        (
            "evil/call_storage.pt",
            "the pickle calls `torch.FloatStorage`",
        ),
        (
            "evil/build_global.pt",
            "the pickle sets the state of `collections.OrderedDict`",
        ),
        (
            "whole_module.pt",
            "the pickle names `torch.nn.modules.linear.Linear`",
        ),
    ];
    for (file, want) in cases {
        let path = fx(file);
        let e = err_of(PickleWeights::open(&path, None));
        assert!(
            e.starts_with(&path.display().to_string())
                && e.contains(&format!("refuses to load: {want}"))
                && e.contains("only tensors and plain containers (dicts, lists, tuples, numbers, strings) are allowed"),
            "{file}: {e}"
        );
        // The same through the folder fallback and the single-file constructor.
        let tmp = tempfile::tempdir().unwrap();
        copy_into(tmp.path(), file, "pytorch_model.bin");
        let e = err_of(Weights::open_dir(tmp.path(), Variant::Default));
        assert!(
            e.contains("pytorch_model.bin") && e.contains(want),
            "{file}: {e}"
        );
        let e = err_of(Weights::open_pickle(&path, Some("state_dict")));
        assert!(e.contains(want), "{file}: {e}");
    }
    assert!(!pwned.exists(), "a payload ran: {PWNED} exists");
    assert!(ALLOWED_GLOBALS.contains(&"torch._utils._rebuild_tensor_v2"));
    assert!(!ALLOWED_GLOBALS
        .iter()
        .any(|g| g.contains("_load_from_bytes")));
}

#[test]
fn broken_archives_are_clear_errors() {
    let cases = [
        ("legacy.pt", "legacy (pre-1.6, non-zip) torch.save format"),
        ("big_endian.pt", "big-endian"),
        ("no_data_pkl.pt", "holds no `<name>/data.pkl`"),
        ("truncated.bin", "truncated or corrupt"),
        ("reference.safetensors", "is not a PyTorch checkpoint"),
    ];
    for (file, want) in cases {
        let path = fx(file);
        let e = err_of(PickleWeights::open(&path, None));
        assert!(
            e.starts_with(&path.display().to_string()) && e.contains(want),
            "{file}: {e}"
        );
    }
    let e = err_of(PickleWeights::open(fx("does-not-exist.pt"), None));
    assert!(e.contains("does-not-exist.pt"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("empty.bin"), b"").unwrap();
    let e = err_of(PickleWeights::open(tmp.path().join("empty.bin"), None));
    assert!(e.contains("empty.bin"), "{e}");
}

/// Opens `bytes` as a checkpoint and loads every tensor: errors are fine, panics are not.
fn open_and_load_all(path: &Path, bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).unwrap();
    match PickleWeights::open(path, None) {
        Ok(w) => {
            for k in w.keys() {
                let _ = w.load(k, &cpu());
            }
            true
        }
        Err(e) => {
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            false
        }
    }
}

#[test]
fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mutated.pt");
    for file in [
        "dtypes.pt",
        "lightning.ckpt",
        "protocol4.pt",
        "zip64.pt",
        "sharded/pytorch_model-00002-of-00002.bin",
    ] {
        let good = std::fs::read(fx(file)).unwrap();
        assert!(open_and_load_all(&path, &good), "{file}");
        for n in 0..good.len() {
            assert!(
                !open_and_load_all(&path, &good[..n]),
                "{file} cut at {n} opened"
            );
        }
        for i in 0..good.len() {
            for flip in [0xff, 0x01] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                open_and_load_all(&path, &bad);
            }
        }
    }
}
