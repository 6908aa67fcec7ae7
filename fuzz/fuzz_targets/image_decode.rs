//! Any bytes as an input image and as an inpaint mask (PNG, JPEG, WebP and what the decoders
//! sniff): an error, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kd_models::image::decode_image(data);
    let _ = kd_models::image::decode_mask(data);
    let _ = kd_models::clip::image_processor::decode_image(data);
});
