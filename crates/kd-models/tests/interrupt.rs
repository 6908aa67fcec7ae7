//! Long forward passes stop between layers when the caller's stop check says so, and an
//! interruptible pass that is never stopped computes exactly what the plain one does.

use candle_core::{DType, Device, Tensor};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::unet::{UNet2DConditionModel, UNetConditioning};
use kd_models::{CheckpointDir, ModelError, Variant};
use kd_testkit::parity::{fixtures_dir, rel_l2};
use std::cell::Cell;

fn decoder_dir() -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join("deep/kandinsky-2-2-decoder")).unwrap()
}

fn unet() -> UNet2DConditionModel {
    let comp = decoder_dir().component("unet").unwrap();
    let cfg = comp.unet_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

fn movq() -> VqModel {
    let comp = decoder_dir().component("movq").unwrap();
    VqModel::load(&comp, MovqOptions::default(), DType::F32, &Device::Cpu).unwrap()
}

/// A stop check that says stop on its `n`-th call, and counts its calls.
struct StopAt {
    n: usize,
    calls: Cell<usize>,
}

impl StopAt {
    fn new(n: usize) -> Self {
        Self {
            n,
            calls: Cell::new(0),
        }
    }

    fn ask(&self) -> bool {
        self.calls.set(self.calls.get() + 1);
        self.calls.get() >= self.n
    }
}

fn assert_interrupted<T: std::fmt::Debug>(r: Result<T, ModelError>) {
    match r {
        Err(ModelError::Interrupted { piece }) => assert!(!piece.is_empty()),
        other => panic!("expected Interrupted, got {other:?}"),
    }
}

#[test]
fn a_unet_forward_asks_between_layers_and_stops_at_once() {
    let unet = unet();
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &Device::Cpu).unwrap();
    let embeds = Tensor::randn(0f32, 1.0, (2, unet.embed_dim()), &Device::Cpu).unwrap();
    let cond = UNetConditioning::image(&embeds);

    let never = StopAt::new(usize::MAX);
    let out = unet
        .forward_interruptible(&sample, 500.0, &cond, &|| never.ask())
        .unwrap();
    let plain = unet.forward(&sample, 500.0, &cond).unwrap();
    assert_eq!(rel_l2(&out, &plain).unwrap(), 0.0);
    let layers = never.calls.get();
    assert!(layers >= 8, "only {layers} checks in a whole forward pass");

    for n in [1, layers / 2, layers] {
        let stop = StopAt::new(n);
        assert_interrupted(unet.forward_interruptible(&sample, 500.0, &cond, &|| stop.ask()));
        assert_eq!(
            stop.calls.get(),
            n,
            "work went on after the check said stop"
        );
    }
}

#[test]
fn a_movq_decode_and_encode_ask_between_layers_and_stop_at_once() {
    let movq = movq();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let side = 8 * movq.scale_factor();
    let image = Tensor::randn(0f32, 0.5, (1, 3, side, side), &Device::Cpu).unwrap();

    let never = StopAt::new(usize::MAX);
    let decoded = movq.decode_interruptible(&z, &|| never.ask()).unwrap();
    assert_eq!(rel_l2(&decoded, &movq.decode(&z).unwrap()).unwrap(), 0.0);
    let decode_checks = never.calls.replace(0);
    let encoded = movq.encode_interruptible(&image, &|| never.ask()).unwrap();
    assert_eq!(
        rel_l2(&encoded, &movq.encode(&image).unwrap()).unwrap(),
        0.0
    );
    let encode_checks = never.calls.get();
    assert!(
        decode_checks >= 6 && encode_checks >= 6,
        "{decode_checks}, {encode_checks}"
    );

    for n in [1, decode_checks] {
        let stop = StopAt::new(n);
        assert_interrupted(movq.decode_interruptible(&z, &|| stop.ask()));
        assert_eq!(stop.calls.get(), n);
    }
    for n in [1, encode_checks] {
        let stop = StopAt::new(n);
        assert_interrupted(movq.encode_interruptible(&image, &|| stop.ask()));
        assert_eq!(stop.calls.get(), n);
    }
}
