//! Parity of the CLIP image processor and vision tower against the transformers reference
//! (`tests/fixtures/tiny/reference/prior/{image_processor,image_encoder}.*`).

use candle_core::{DType, Device, Tensor};
use kd_models::clip::{
    convert_to_rgb, decode_image, ClipImageProcessor, ClipVisionModelWithProjection,
};
use kd_models::{CheckpointDir, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::path::PathBuf;

fn ckpt() -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap()
}
fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

fn processor() -> ClipImageProcessor {
    let cfg = ckpt()
        .component("image_processor")
        .unwrap()
        .image_processor_config()
        .unwrap();
    ClipImageProcessor::new(&cfg)
}

fn vision(dtype: DType) -> ClipVisionModelWithProjection {
    let comp = ckpt().component("image_encoder").unwrap();
    let cfg = comp.clip_vision_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    ClipVisionModelWithProjection::new(&cfg, vb).unwrap()
}

fn load_png(name: &str) -> image::DynamicImage {
    decode_image(&std::fs::read(refdir().join(name)).unwrap()).unwrap()
}

fn u8_tensor(img: &image::RgbImage) -> Tensor {
    Tensor::from_vec(
        img.as_raw().clone(),
        (img.height() as usize, img.width() as usize, 3),
        &Device::Cpu,
    )
    .unwrap()
}

/// Number of differing bytes and the largest absolute difference.
fn u8_diff(a: &Tensor, b: &Tensor) -> (usize, u8) {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mut n = 0;
    let mut m = 0;
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            n += 1;
            m = m.max(x.abs_diff(*y));
        }
    }
    (n, m)
}

#[test]
fn image_processor_matches_reference_exactly() {
    let refs = load_reference(refdir().join("image_processor.safetensors")).unwrap();
    let p = processor();
    for (key, file) in [
        ("a", "image_a_160x96_rgb.png"),
        ("b", "image_b_320x256_rgba.png"),
    ] {
        let img = load_png(file);
        let rgb = convert_to_rgb(&img);
        let d = u8_diff(&u8_tensor(&rgb), get(&refs, &format!("{key}.rgb_u8")));
        eprintln!("{key}.rgb_u8: {} bytes differ, max {}", d.0, d.1);
        assert_eq!(d.0, 0, "{key}.rgb_u8 must be bit-exact");
        let cropped = p.resize_and_crop(&img).unwrap();
        let d = u8_diff(
            &u8_tensor(&cropped),
            get(&refs, &format!("{key}.cropped_u8")),
        );
        eprintln!("{key}.cropped_u8: {} bytes differ, max {}", d.0, d.1);
        assert_eq!(d.0, 0, "{key}.cropped_u8 must be bit-exact");
    }
    let px = p
        .preprocess(&load_png("image_a_160x96_rgb.png"), &Device::Cpu)
        .unwrap();
    let expected = get(&refs, "a.pixel_values");
    let e = rel_l2(&px, expected).unwrap();
    eprintln!("a.pixel_values rel L2 {e:e}");
    assert_eq!(
        px.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "pixel_values bit-exact"
    );
}

#[test]
fn undecodable_image_is_a_clear_error() {
    let err = decode_image(b"definitely not an image")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid `image`") && err.contains("PNG, JPEG, WebP"),
        "{err}"
    );
}

#[test]
fn vision_tower_matches_reference() {
    let refs = load_reference(refdir().join("image_encoder.safetensors")).unwrap();
    let model = vision(DType::F32);
    let px = get(&refs, "pixel_values_f16").to_dtype(DType::F32).unwrap();
    let out = model.forward(&px).unwrap();
    for (name, got) in [
        ("image_embeds", &out.image_embeds),
        ("last_hidden_state", &out.last_hidden_state),
    ] {
        let e = rel_l2(got, get(&refs, name)).unwrap();
        eprintln!("{name} rel L2 {e:e}");
        assert_close(name, got, get(&refs, name), 1e-4);
    }
    let zeros = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
    let z = model.forward(&zeros).unwrap().image_embeds;
    eprintln!(
        "zero_image_embeds rel L2 {:e}",
        rel_l2(&z, get(&refs, "zero_image_embeds")).unwrap()
    );
    assert_close(
        "zero_image_embeds",
        &z,
        get(&refs, "zero_image_embeds"),
        1e-4,
    );

    let p = processor();
    for (name, file) in [
        ("image_a_embeds", "image_a_160x96_rgb.png"),
        ("image_b_embeds", "image_b_320x256_rgba.png"),
    ] {
        let px = p.preprocess(&load_png(file), &Device::Cpu).unwrap();
        let e = model.forward(&px).unwrap().image_embeds;
        eprintln!("{name} rel L2 {:e}", rel_l2(&e, get(&refs, name)).unwrap());
        assert_close(name, &e, get(&refs, name), 1e-4);
    }
}

#[test]
fn vision_tower_f16_is_close() {
    let refs = load_reference(refdir().join("image_encoder.safetensors")).unwrap();
    let out = vision(DType::F16)
        .forward(get(&refs, "pixel_values_f16"))
        .unwrap();
    let e = rel_l2(&out.image_embeds, get(&refs, "image_embeds")).unwrap();
    eprintln!("f16 image_embeds rel L2 {e:e}");
    assert_close(
        "f16 image_embeds",
        &out.image_embeds,
        get(&refs, "image_embeds"),
        1e-2,
    );
}

#[test]
fn vision_tower_rejects_wrong_shape() {
    let bad = Tensor::zeros((1, 3, 200, 224), DType::F32, &Device::Cpu).unwrap();
    let err = vision(DType::F32).forward(&bad).unwrap_err().to_string();
    assert!(
        err.contains("pixel_values") && err.contains("(B ≥ 1, 3, 224, 224)"),
        "{err}"
    );
}
