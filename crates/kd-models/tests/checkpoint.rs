//! Checkpoint loading over every committed fixture folder, and failures on broken copies.

use candle_core::{DType, Device};
use kd_models::config::SchedulerConfig;
use kd_models::{CheckpointDir, ModelError, ModelFamily, Variant, Weights};
use kd_testkit::parity::fixtures_dir;
use std::path::{Path, PathBuf};

const DECODERS: &[&str] = &[
    "tiny/kandinsky-2-2-decoder",
    "tiny/kandinsky-2-2-decoder-inpaint",
    "tiny/kandinsky-2-2-controlnet-depth",
    "deep/kandinsky-2-2-decoder",
];
const PRIOR: &str = "tiny/kandinsky-2-2-prior";

fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// Copies a fixture folder into a temp dir so a test can break it.
fn broken_copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &dst);
            } else {
                std::fs::copy(e.path(), dst).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("ckpt");
    copy(&fixture(rel), &dst);
    (tmp, dst)
}

#[test]
fn every_decoder_fixture_parses_and_its_weights_match_the_config() {
    for rel in DECODERS {
        let ckpt = CheckpointDir::open(fixture(rel)).unwrap();
        assert_eq!(ckpt.family(), ModelFamily::Kandinsky22, "{rel}");
        let names: Vec<_> = ckpt.component_names().collect();
        assert_eq!(names, ["movq", "scheduler", "unet"], "{rel}");

        let unet = ckpt.component("unet").unwrap();
        let cfg = unet.unet_config().unwrap();
        let w = unet.weights(Variant::Default).unwrap();
        let (shape, _) = w.info("conv_in.weight").expect("conv_in.weight");
        // ControlNet UNets take 4 latent channels + 4 hint channels concatenated inside the UNet.
        assert_eq!(
            shape,
            [cfg.block_out_channels[0], cfg.in_channels, 3, 3],
            "{rel}"
        );
        let (shape, _) = w.info("conv_out.weight").unwrap();
        assert_eq!(
            shape,
            [cfg.out_channels, cfg.block_out_channels[0], 3, 3],
            "{rel}"
        );
        let embed_dim = cfg.encoder_hid_dim.unwrap();
        let (shape, _) = w.info("add_embedding.image_proj.weight").unwrap();
        assert_eq!(shape, [cfg.time_embed_dim(), embed_dim], "{rel}");
        assert_eq!(
            w.keys()
                .iter()
                .any(|k| k.starts_with("add_embedding.input_hint_block.")),
            cfg.addition_embed_type.as_deref() == Some("image_hint"),
            "{rel}"
        );

        let movq = ckpt.component("movq").unwrap();
        let vq = movq.vq_config().unwrap();
        let mw = movq.weights(Variant::Default).unwrap();
        let (shape, _) = mw.info("decoder.conv_out.weight").unwrap();
        assert_eq!(
            shape,
            [vq.out_channels, vq.block_out_channels[0], 3, 3],
            "{rel}"
        );
        let (shape, _) = mw.info("quant_conv.weight").unwrap();
        assert_eq!(shape, [vq.embed_dim(), vq.latent_channels, 1, 1], "{rel}");

        match ckpt
            .component("scheduler")
            .unwrap()
            .scheduler_config()
            .unwrap()
        {
            SchedulerConfig::Ddpm(c) => {
                assert_eq!(c.num_train_timesteps, 1000);
                assert_eq!(c.beta_schedule, "linear");
                assert_eq!(c.steps_offset, 1);
            }
            other => panic!("{rel}: expected the DDPM scheduler, got {other:?}"),
        }
    }
}

#[test]
fn prior_fixture_parses_every_component() {
    let ckpt = CheckpointDir::open(fixture(PRIOR)).unwrap();
    assert_eq!(ckpt.pipeline_class(), "KandinskyV22PriorPipeline");
    let prior = ckpt.component("prior").unwrap();
    let pc = prior.prior_config().unwrap();
    let w = prior.weights(Variant::Default).unwrap();
    assert_eq!(
        w.info("positional_embedding").unwrap().0,
        [1, pc.seq_len(), pc.inner_dim()]
    );
    assert_eq!(w.info("clip_mean").unwrap().0, [1, pc.embedding_dim]);

    let text = ckpt.component("text_encoder").unwrap();
    let tc = text.clip_text_config().unwrap();
    assert_eq!(tc.hidden_act, "gelu");
    let tw = text.weights(Variant::Default).unwrap();
    let (shape, dtype) = tw
        .info("text_model.embeddings.token_embedding.weight")
        .unwrap();
    assert_eq!(shape, [tc.vocab_size, tc.hidden_size]);
    assert_eq!(
        dtype,
        safetensors::Dtype::F16,
        "the fixture stores the text encoder in fp16"
    );
    assert_eq!(
        tw.info("text_projection.weight").unwrap().0,
        [tc.projection_dim, tc.hidden_size]
    );

    let vision = ckpt.component("image_encoder").unwrap();
    let vc = vision.clip_vision_config().unwrap();
    let vw = vision.weights(Variant::Default).unwrap();
    let patches = (vc.image_size / vc.patch_size).pow(2);
    assert_eq!(
        vw.info("vision_model.embeddings.position_embedding.weight")
            .unwrap()
            .0,
        [patches + 1, vc.hidden_size]
    );

    match ckpt
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap()
    {
        SchedulerConfig::UnClip(c) => {
            assert_eq!(c.variance_type, "fixed_small_log");
            assert_eq!(c.prediction_type, "sample");
            assert_eq!(c.clip_sample_range, 10.0);
        }
        other => panic!("expected UnCLIP, got {other:?}"),
    }
    let ip = ckpt
        .component("image_processor")
        .unwrap()
        .image_processor_config()
        .unwrap();
    assert_eq!(ip.resample, 3);
    assert_eq!(
        ckpt.component("tokenizer")
            .unwrap()
            .tokenizer_config()
            .unwrap()
            .model_max_length,
        77
    );
}

#[test]
fn fp16_weights_load_as_f32_and_f16() {
    let ckpt = CheckpointDir::open(fixture(PRIOR)).unwrap();
    let w = ckpt
        .component("text_encoder")
        .unwrap()
        .weights(Variant::Default)
        .unwrap();
    let key = "text_model.final_layer_norm.weight";
    let (shape, _) = w.info(key).unwrap();
    let as_f32 = w.load(key, &shape, DType::F32, &Device::Cpu).unwrap();
    let as_f16 = w.load(key, &shape, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(as_f32.dtype(), DType::F32);
    assert_eq!(as_f16.dtype(), DType::F16);
    // fp16 → f32 is exact, so converting back reproduces the stored values bit for bit.
    let back = as_f32
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (back - &as_f32).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // fp32 → f16 through the VarBuilder.
    let unet = CheckpointDir::open(fixture(DECODERS[0]))
        .unwrap()
        .component("unet")
        .unwrap();
    let vb = unet
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F16, &Device::Cpu);
    let t = vb.get((32, 4, 3, 3), "conv_in.weight").unwrap();
    assert_eq!(t.dtype(), DType::F16);
}

#[test]
fn sharded_index_loads_and_reports_the_shard() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let unet_dir = dir.join("unet");
    let single = unet_dir.join("diffusion_pytorch_model.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let mut keys: Vec<_> = all.keys().cloned().collect();
    keys.sort();
    let (a, b) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", a),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", b),
    ] {
        let tensors: std::collections::HashMap<_, _> =
            part.iter().map(|k| (k.clone(), all[k].clone())).collect();
        candle_core::safetensors::save(&tensors, unet_dir.join(shard)).unwrap();
        for k in part {
            weight_map.insert(k.clone(), shard.into());
        }
    }
    std::fs::remove_file(&single).unwrap();
    std::fs::write(
        unet_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let w = CheckpointDir::open(&dir)
        .unwrap()
        .component("unet")
        .unwrap()
        .weights(Variant::Default)
        .unwrap();
    assert_eq!(w.paths().len(), 2);
    assert_eq!(w.keys().len(), keys.len());
    let last = keys.last().unwrap();
    let (shape, _) = w.info(last).unwrap();
    let loaded = w.load(last, &shape, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        all[last].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // A wrong shape names the shard that holds the key.
    let err = w
        .load(last, &[1, 2, 3], DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("00002-of-00002")
            && err.contains(last.as_str())
            && err.contains("expected [1, 2, 3]"),
        "{err}"
    );
}

#[test]
fn missing_config_names_the_file() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    std::fs::remove_file(dir.join("unet/config.json")).unwrap();
    let err = CheckpointDir::open(&dir)
        .unwrap()
        .component("unet")
        .unwrap()
        .unet_config()
        .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("unet/config.json"), "{err}");

    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    let err = CheckpointDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains("model_index.json"), "{err}");
}

#[test]
fn missing_component_folder_is_reported_at_open() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    std::fs::remove_dir_all(dir.join("movq")).unwrap();
    let err = CheckpointDir::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("movq") && err.contains("folder is missing"),
        "{err}"
    );
}

#[test]
fn unknown_block_type_is_rejected_naming_field_and_supported_values() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let p = dir.join("unet/config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"ResnetDownsampleBlock2D\"", "\"CrossAttnDownBlock2D\"");
    std::fs::write(&p, text).unwrap();
    let err = CheckpointDir::open(&dir)
        .unwrap()
        .component("unet")
        .unwrap()
        .unet_config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("unet/config.json"), "{err}");
    assert!(
        err.contains("down_block_types[0]") && err.contains("CrossAttnDownBlock2D"),
        "{err}"
    );
    assert!(
        err.contains("supported: ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D"),
        "{err}"
    );

    let p = dir.join("movq/config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"spatial\"", "\"layer\"");
    std::fs::write(&p, text).unwrap();
    let err = CheckpointDir::open(&dir)
        .unwrap()
        .component("movq")
        .unwrap()
        .vq_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("norm_type") && err.contains("supported: spatial, group"),
        "{err}"
    );
}

#[test]
fn unknown_pipeline_class_and_scheduler_are_rejected() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let p = dir.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("DDPMScheduler", "EulerDiscreteScheduler");
    std::fs::write(&p, text).unwrap();
    let err = CheckpointDir::open(&dir)
        .unwrap()
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scheduler_config.json") && err.contains("EulerDiscreteScheduler"),
        "{err}"
    );

    let p = dir.join("model_index.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("KandinskyV22Pipeline", "StableDiffusionPipeline");
    std::fs::write(&p, text).unwrap();
    let err = CheckpointDir::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("_class_name")
            && err.contains("StableDiffusionPipeline")
            && err.contains("KandinskyV22Pipeline"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_names_file_key_and_expectation() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut all = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    all.insert(
        "conv_in.weight".into(),
        candle_core::Tensor::zeros((32, 5, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&all, &file).unwrap();

    let vb = CheckpointDir::open(&dir)
        .unwrap()
        .component("unet")
        .unwrap()
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err: ModelError = vb.get((32, 4, 3, 3), "conv_in.weight").unwrap_err().into();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("`conv_in.weight`"),
        "{msg}"
    );
    assert!(
        msg.contains("[32, 5, 3, 3]") && msg.contains("expected [32, 4, 3, 3]"),
        "{msg}"
    );

    let err: ModelError = vb
        .pp("down_blocks.0")
        .get((3,), "no_such.weight")
        .unwrap_err()
        .into();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("`down_blocks.0.no_such.weight` is missing (expected shape [3])"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_file_is_rejected_naming_it() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let file = dir.join("movq/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = CheckpointDir::open(&dir)
        .unwrap()
        .component("movq")
        .unwrap()
        .weights(Variant::Default)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("movq/diffusion_pytorch_model.safetensors")
            && err.contains("cannot read safetensors"),
        "{err}"
    );
}

#[test]
fn no_weights_is_an_error_listing_what_was_looked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Weights::open_dir(tmp.path(), Variant::Default)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no weights found") && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn fp16_variant_is_preferred_only_when_asked() {
    let (_tmp, dir) = broken_copy(DECODERS[0]);
    let movq = dir.join("movq");
    let all = candle_core::safetensors::load(
        movq.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let half: std::collections::HashMap<_, _> = all
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, movq.join("diffusion_pytorch_model.fp16.safetensors"))
        .unwrap();
    let ckpt = CheckpointDir::open(&dir).unwrap();
    let c = ckpt.component("movq").unwrap();
    let key = "quant_conv.weight";
    assert_eq!(
        c.weights(Variant::Default).unwrap().info(key).unwrap().1,
        safetensors::Dtype::F32
    );
    assert_eq!(
        c.weights(Variant::Fp16).unwrap().info(key).unwrap().1,
        safetensors::Dtype::F16
    );
}

/// Safetensors files are read a tensor at a time (positioned reads, no map): every stored dtype
/// and shape loads bit-equal to candle's whole-file reader, and converts like it.
#[test]
fn safetensors_tensors_read_one_at_a_time_equal_the_whole_file_reader() {
    use candle_core::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    let dev = Device::Cpu;
    let base = |n: usize| {
        Tensor::arange(0u32, n as u32, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.37, -3.1)
            .unwrap()
            .sin()
            .unwrap()
    };
    let mut all = std::collections::HashMap::new();
    all.insert(
        "a.f32".to_string(),
        base(7 * 5 * 3).reshape((7, 5, 3)).unwrap(),
    );
    all.insert("b.f16".to_string(), base(13).to_dtype(DType::F16).unwrap());
    all.insert(
        "c.bf16".to_string(),
        base(4 * 9)
            .reshape((4, 9))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    );
    all.insert("d.scalar".to_string(), Tensor::new(2.5f32, &dev).unwrap());
    candle_core::safetensors::save(&all, &file).unwrap();

    let whole = candle_core::safetensors::load(&file, &dev).unwrap();
    let w = Weights::open_files(vec![file.clone()]).unwrap();
    assert_eq!(w.keys(), vec!["a.f32", "b.f16", "c.bf16", "d.scalar"]);
    for (key, expected) in &whole {
        let (shape, _) = w.info(key).unwrap();
        assert_eq!(shape, expected.dims(), "{key}");
        for dtype in [expected.dtype(), DType::F32, DType::F16] {
            let got = w.load(key, &shape, dtype, &dev).unwrap();
            let want = expected.to_dtype(dtype).unwrap();
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let want = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            assert_eq!(
                got.to_vec1::<f64>().unwrap(),
                want.to_vec1::<f64>().unwrap(),
                "{key} as {dtype:?}"
            );
        }
    }
}

/// A matrix read through its transposed key (`<key>@T`, as dense layers load their weights) is
/// the stored matrix transposed, bit for bit, from fp16, bf16 and f32 files and as f32 or f16;
/// a stored shape that does not fit, or a tensor that is not a matrix, is refused naming the key.
#[test]
fn transposed_keys_read_the_transpose_of_the_stored_matrix() {
    use candle_core::Tensor;
    use candle_nn::var_builder::SimpleBackend;
    use kd_models::checkpoint::TRANSPOSED;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    let dev = Device::Cpu;
    // 70 columns: two whole 32-column blocks of the transposing conversion and a partial one.
    let m = Tensor::arange(0u32, 37 * 70, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(0.011, -7.0)
        .unwrap()
        .reshape((37, 70))
        .unwrap();
    let mut all = std::collections::HashMap::new();
    all.insert("m.f16".to_string(), m.to_dtype(DType::F16).unwrap());
    all.insert("m.bf16".to_string(), m.to_dtype(DType::BF16).unwrap());
    all.insert("m.f32".to_string(), m.clone());
    all.insert("v".to_string(), m.flatten_all().unwrap());
    candle_core::safetensors::save(&all, &file).unwrap();
    let w = Weights::open_files(vec![file]).unwrap();
    for key in ["m.f16", "m.bf16", "m.f32"] {
        let t_key = format!("{key}{TRANSPOSED}");
        assert!(w.contains_tensor(&t_key), "{t_key}");
        for dtype in [DType::F32, DType::F16] {
            let got = w.load(&t_key, &[70, 37], dtype, &dev).unwrap();
            assert_eq!(got.dims(), [70, 37]);
            assert!(got.is_contiguous());
            let want = w.load(key, &[37, 70], dtype, &dev).unwrap().t().unwrap();
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(flat(&got), flat(&want), "{t_key} as {dtype:?}");
        }
        let err = w
            .load(&t_key, &[37, 70], DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains("70"), "{err}");
    }
    assert!(!w.contains_tensor(&format!("v{TRANSPOSED}")));
    assert!(w
        .load(&format!("v{TRANSPOSED}"), &[2590], DType::F32, &dev)
        .is_err());
}

/// A key read through `<key>@S` is the stored tensor in its stored dtype whatever dtype is asked;
/// a dense layer loaded from fp16, bf16 and f32 files through a variable builder keeps its weight
/// in that precision where the packed CPU kernel runs, and computes candle's `Linear` of the f32
/// weights (rel L2 ≤ 1e-6); a stored shape that does not fit is refused naming the key.
#[test]
fn dense_layers_keep_their_stored_precision() {
    use candle_core::{Module, Tensor};
    use candle_nn::var_builder::SimpleBackend;
    use kd_models::checkpoint::STORED;
    use kd_models::dense::{dense, Activation};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    let dev = Device::Cpu;
    let w32 = Tensor::randn(0f32, 0.5, (70, 37), &dev).unwrap();
    let bias = Tensor::randn(0f32, 0.5, 70, &dev).unwrap();
    let mut all = std::collections::HashMap::new();
    for (name, dtype) in [
        ("f16", DType::F16),
        ("bf16", DType::BF16),
        ("f32", DType::F32),
    ] {
        all.insert(format!("{name}.weight"), w32.to_dtype(dtype).unwrap());
        all.insert(format!("{name}.bias"), bias.clone());
    }
    candle_core::safetensors::save(&all, &file).unwrap();
    let w = Weights::open_files(vec![file.clone()]).unwrap();
    for (name, dtype) in [
        ("f16", DType::F16),
        ("bf16", DType::BF16),
        ("f32", DType::F32),
    ] {
        let key = format!("{name}.weight{STORED}");
        assert!(w.contains_tensor(&key));
        let got = w.load(&key, &[70, 37], DType::F32, &dev).unwrap();
        assert_eq!(got.dtype(), dtype, "{key}");
        let err = w
            .load(&key, &[37, 70], DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{name}.weight")) && err.contains("37"),
            "{err}"
        );
    }
    assert!(!w.contains_tensor(&format!("missing{STORED}")));
    let vb = Weights::open_files(vec![file])
        .unwrap()
        .var_builder(DType::F32, &dev);
    let x = Tensor::randn(0f32, 1.0, (3, 5, 37), &dev).unwrap();
    for (name, dtype, precision) in [
        ("f16", DType::F16, kd_kernels::PackedPrecision::F16),
        ("bf16", DType::BF16, kd_kernels::PackedPrecision::BF16),
        ("f32", DType::F32, kd_kernels::PackedPrecision::F32),
    ] {
        let layer = dense(37, 70, vb.pp(name)).unwrap();
        let packed = kd_kernels::packed_dense_enabled();
        assert_eq!(
            layer.packed_precision(),
            packed.then_some(precision),
            "{name}"
        );
        let weight = w32.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let want = candle_nn::Linear::new(weight, Some(bias.clone()))
            .forward(&x)
            .unwrap();
        let got = layer.forward_act(&x, Activation::Identity).unwrap();
        let e = kd_testkit::parity::rel_l2(&got, &want).unwrap();
        assert!(e <= 1e-6, "{name}: rel L2 {e:.2e}");
    }
}

/// A safetensors header that lies about the file is refused at open, naming the file.
#[test]
fn safetensors_headers_that_do_not_fit_the_file_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.safetensors");
    let header = |json: &str, data: usize| {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "header length"),
        (u64::MAX.to_le_bytes().to_vec(), "header of"),
        (
            (1000u64).to_le_bytes().to_vec(),
            "header of 1000 bytes in a file of 8",
        ),
        (header("{not json", 0), "header"),
        (
            // 4 f32 = 16 bytes described, 8 present.
            header(
                r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
            "describes 16 bytes",
        ),
        (
            // The size does not match the shape.
            header(
                r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
                12,
            ),
            "header",
        ),
        (
            // An element count that overflows.
            header(
                r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                16,
            ),
            "header",
        ),
    ];
    for (bytes, needle) in cases {
        std::fs::write(&file, &bytes).unwrap();
        let err = Weights::open_files(vec![file.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains(needle),
            "{needle}: {err}"
        );
    }
}
