//! Post-processing (diffusers `numpy_to_pil`), PNG/JPEG/WebP encoding and image-input errors.

use candle_core::{DType, Device, Tensor};
use kd_models::image::{
    decode_image, decode_mask, encode_image, postprocess, postprocess_nhwc01, preprocess_img2img,
    preprocess_inpaint, MaskImage, OutputFormat,
};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::{CheckpointDir, ModelError};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn flat(imgs: &[image::RgbImage]) -> Vec<u8> {
    imgs.iter()
        .flat_map(|i| i.as_raw().iter().copied())
        .collect()
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> i32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .max()
        .unwrap()
}

fn invalid_msg(e: ModelError, field: &str) -> String {
    match e {
        ModelError::InvalidInput { field: f, message } => {
            assert_eq!(f, field, "field of {message}");
            message
        }
        other => panic!("expected InvalidInput for `{field}`, got {other:?}"),
    }
}

#[test]
fn postprocess_of_reference_is_exact() {
    for size in ["tiny", "deep"] {
        let r = load_reference(
            fixtures_dir()
                .join(size)
                .join("reference/decoder/movq.safetensors"),
        )
        .unwrap();
        let imgs = postprocess(get(&r, "decoded")).unwrap();
        assert_eq!(flat(&imgs), u8s(get(&r, "decoded_u8")), "{size} decoded_u8");
        let imgs = postprocess(get(&r, "ns_decoded")).unwrap();
        assert_eq!(
            imgs[0].dimensions().0 as usize,
            get(&r, "ns_decoded").dims()[3]
        );
        assert_eq!(
            flat(&imgs),
            u8s(get(&r, "ns_decoded_u8")),
            "{size} ns_decoded_u8"
        );
        let nhwc = postprocess_nhwc01(get(&r, "ns_decoded")).unwrap();
        assert_eq!(rel_l2(&nhwc, get(&r, "ns_decoded_nhwc01")).unwrap(), 0.0);
    }
}

#[test]
fn decoded_u8_within_one_of_diffusers() {
    for size in ["tiny", "deep"] {
        let root = fixtures_dir().join(size);
        let ckpt = CheckpointDir::open(root.join("kandinsky-2-2-decoder")).unwrap();
        let movq = VqModel::load(
            &ckpt.component("movq").unwrap(),
            MovqOptions::default(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let r = load_reference(root.join("reference/decoder/movq.safetensors")).unwrap();
        for (lat, want) in [("latents", "decoded_u8"), ("ns_latents", "ns_decoded_u8")] {
            let d = movq.decode(get(&r, lat)).unwrap();
            let got = flat(&postprocess(&d).unwrap());
            let m = max_abs_diff(&got, &u8s(get(&r, want)));
            eprintln!("{size} {want}: max |diff| {m}");
            assert!(m <= 1, "{size} {want}: max |diff| {m} > 1");
        }
        let nhwc = postprocess_nhwc01(&movq.decode(get(&r, "ns_latents")).unwrap()).unwrap();
        assert_close(
            "ns_decoded_nhwc01",
            &nhwc,
            get(&r, "ns_decoded_nhwc01"),
            1e-4,
        );
    }
}

fn sample_image() -> image::RgbImage {
    let r = load_reference(fixtures_dir().join("tiny/reference/decoder/movq.safetensors")).unwrap();
    postprocess(get(&r, "decoded")).unwrap().remove(0)
}

#[test]
fn png_and_webp_round_trip_losslessly() {
    let img = sample_image();
    for fmt in [OutputFormat::Png, OutputFormat::WebP] {
        let bytes = encode_image(&img, fmt).unwrap();
        let magic: &[u8] = match fmt {
            OutputFormat::Png => b"\x89PNG",
            _ => b"RIFF",
        };
        assert!(bytes.starts_with(magic), "{fmt:?} magic");
        let back = decode_image(&bytes).unwrap();
        assert_eq!(back.as_raw(), img.as_raw(), "{fmt:?} round trip");
    }
}

#[test]
fn jpeg_respects_quality() {
    let img = sample_image();
    let hi = encode_image(&img, OutputFormat::jpeg(95).unwrap()).unwrap();
    let lo = encode_image(&img, OutputFormat::jpeg(10).unwrap()).unwrap();
    assert!(hi.starts_with(&[0xFF, 0xD8]));
    assert!(
        lo.len() < hi.len(),
        "q10 {} vs q95 {} bytes",
        lo.len(),
        hi.len()
    );
    let back = decode_image(&hi).unwrap();
    assert_eq!(back.dimensions(), img.dimensions());
    let mean: f64 = back
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / img.as_raw().len() as f64;
    eprintln!("jpeg q95 mean |diff| {mean:.2}");
    assert!(mean < 4.0, "jpeg q95 mean |diff| {mean}");
}

#[test]
fn output_format_errors() {
    assert_eq!(OutputFormat::parse("PNG", 90).unwrap(), OutputFormat::Png);
    assert_eq!(
        OutputFormat::parse("jpg", 90).unwrap(),
        OutputFormat::Jpeg { quality: 90 }
    );
    assert_eq!(
        OutputFormat::parse("webp", 90).unwrap().mime_type(),
        "image/webp"
    );
    let m = invalid_msg(OutputFormat::parse("gif", 90).unwrap_err(), "output_format");
    assert!(m.contains("gif") && m.contains("png, jpeg, webp"), "{m}");
    let m = invalid_msg(OutputFormat::parse("jpeg", 0).unwrap_err(), "jpeg_quality");
    assert!(m.contains("1..=100"), "{m}");
    let m = invalid_msg(
        encode_image(&image::RgbImage::new(0, 0), OutputFormat::Png).unwrap_err(),
        "image",
    );
    assert!(m.contains("zero-sized"), "{m}");
}

#[test]
fn bad_image_bytes_are_clear_errors() {
    let m = invalid_msg(decode_image(b"").unwrap_err(), "image");
    assert!(m.contains("empty"), "{m}");
    let m = invalid_msg(
        decode_image(b"definitely not an image").unwrap_err(),
        "image",
    );
    assert!(m.contains("PNG, JPEG, WebP"), "{m}");
    let png = encode_image(&sample_image(), OutputFormat::Png).unwrap();
    let m = invalid_msg(decode_image(&png[..png.len() / 2]).unwrap_err(), "image");
    assert!(m.contains("corrupt or truncated"), "{m}");
    let mut bad = png.clone();
    for b in bad.iter_mut().skip(40).take(200) {
        *b ^= 0x5A;
    }
    let m = invalid_msg(decode_image(&bad).unwrap_err(), "image");
    assert!(m.contains("corrupt or truncated"), "{m}");
    let jpg = encode_image(&sample_image(), OutputFormat::jpeg(90).unwrap()).unwrap();
    let m = invalid_msg(decode_mask(&jpg[..20]).unwrap_err(), "mask_image");
    assert!(m.contains("corrupt or truncated"), "{m}");
}

#[test]
fn bad_preprocess_inputs_are_clear_errors() {
    let img = sample_image();
    let m = invalid_msg(
        preprocess_img2img(&image::RgbImage::new(0, 5), 64, 64, 8).unwrap_err(),
        "image",
    );
    assert!(m.contains("zero-sized"), "{m}");
    let m = invalid_msg(preprocess_img2img(&img, 7, 64, 8).unwrap_err(), "height");
    assert!(m.contains("at least 8"), "{m}");
    let mask = MaskImage::Luma(image::GrayImage::new(32, 64));
    let m = invalid_msg(
        preprocess_inpaint(&img, &mask, 64, 64, 64).unwrap_err(),
        "mask_image",
    );
    assert!(m.contains("32×64") && m.contains("same size"), "{m}");
    let mask = MaskImage::Luma(image::GrayImage::new(64, 64));
    let m = invalid_msg(
        preprocess_inpaint(&img, &mask, 96, 64, 64).unwrap_err(),
        "height",
    );
    assert!(m.contains("multiple of 64"), "{m}");
    let m = invalid_msg(
        kd_models::image::check_image_size(512, 500, 64).unwrap_err(),
        "width",
    );
    assert!(m.contains("positive multiple of 64, got 500"), "{m}");
}
