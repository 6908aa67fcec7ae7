//! Any bytes as a `GenerateRequest`, through the gateway's validation (every task, the sampling
//! presets for a teacher, a student and an aMUSEd model): an error naming a field, never a panic
//! or an overflow.
#![no_main]

use kd_gateway::sampling::DecoderProfile;
use kd_gateway::validate::{validate, Limits};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = kd_proto::v1::GenerateRequest::decode(data) else {
        return;
    };
    match validate(&req, &Limits::default(), || 7) {
        Ok(plan) => {
            let student = DecoderProfile {
                distilled: true,
                default_steps: 4,
                default_timesteps: vec![999, 749, 499, 249],
                ..DecoderProfile::teacher()
            };
            // A model's own checks too: its tasks, its pixel limit, image-to-image's steps.
            let small = DecoderProfile {
                max_pixels: 256 * 256,
                ..DecoderProfile::teacher()
            };
            // aMUSEd: no prior, its own scheduler, masked-token parameters.
            let amused = DecoderProfile {
                family: kd_proto::v1::ModelFamily::Amused,
                default_steps: 12,
                ..DecoderProfile::teacher()
            };
            // Kandinsky 2.0: no prior, the official samplers (PLMS its own), 50 steps balanced.
            let kd20 = DecoderProfile {
                family: kd_proto::v1::ModelFamily::Kandinsky20,
                default_steps: 50,
                ..DecoderProfile::teacher()
            };
            for profile in [DecoderProfile::teacher(), student, small, amused, kd20] {
                let _ = plan.requested.resolve(&profile);
                let _ = plan.for_model(&profile);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
