//! The [`v1::ModelInfo`] a stage reports: family, component, compute dtype, device and a
//! revision that identifies the weights (part of the gateway's cache keys).

#[cfg(feature = "models")]
use crate::error::ServiceError;
#[cfg(feature = "models")]
use candle_core::{DType, Device, DeviceLocation};
#[cfg(feature = "models")]
use kd_models::{CheckpointDir, ModelFamily};
use kd_proto::v1;
#[cfg(feature = "models")]
use std::path::Path;

#[cfg(feature = "models")]
/// Config files up to this size are hashed byte for byte; larger files (weights, vocabularies)
/// by name and size.
const HASH_BYTES_LIMIT: u64 = 1 << 20;

#[cfg(feature = "models")]
/// FNV-1a, 64 bit: stable across builds and platforms (unlike `DefaultHasher`).
struct Fnv(u64);

#[cfg(feature = "models")]
impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Field separator, so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

#[cfg(feature = "models")]
fn io_err(path: &Path, e: std::io::Error) -> ServiceError {
    ServiceError::Internal(format!("{}: {e}", path.display()))
}

#[cfg(feature = "models")]
/// A short (12 hex digit) hash of the listed components' files: the bytes of every small JSON
/// config (`config.json`, `scheduler_config.json`, ...) and the name and size of every other file
/// (the safetensors weights, tokenizer files). Cheap: weights are never read. The component `.`
/// is the folder's own files (a Kandinsky 2.0 folder's `.pt` / `.ckpt` checkpoints and sidecars).
pub fn revision(dir: &CheckpointDir, components: &[&str]) -> Result<String, ServiceError> {
    let mut h = Fnv::new();
    for &name in components {
        let folder = dir.root().join(name);
        h.write(name.as_bytes());
        let mut entries: Vec<_> = std::fs::read_dir(&folder)
            .map_err(|e| io_err(&folder, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for path in entries {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            let len = std::fs::metadata(&path)
                .map_err(|e| io_err(&path, e))?
                .len();
            h.write(file.as_bytes());
            if file.ends_with(".json") && len <= HASH_BYTES_LIMIT {
                h.write(&std::fs::read(&path).map_err(|e| io_err(&path, e))?);
            } else {
                h.write(&len.to_le_bytes());
            }
        }
    }
    Ok(format!("{:016x}", h.0)[..12].to_string())
}

#[cfg(feature = "models")]
/// The wire name of a device: `cpu`, `cuda:N` or `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "models")]
/// The wire dtype of a compute dtype (unspecified for dtypes the wire lacks).
pub fn wire_dtype(dtype: DType) -> v1::DType {
    match dtype {
        DType::F32 => v1::DType::DtypeF32,
        DType::F16 => v1::DType::DtypeF16,
        DType::BF16 => v1::DType::DtypeBf16,
        DType::I64 => v1::DType::DtypeI64,
        _ => v1::DType::DtypeUnspecified,
    }
}

#[cfg(feature = "models")]
/// The wire family of a checkpoint family.
pub fn wire_family(family: ModelFamily) -> v1::ModelFamily {
    match family {
        ModelFamily::Kandinsky22 => v1::ModelFamily::Kandinsky22,
        ModelFamily::Kandinsky21 => v1::ModelFamily::Kandinsky21,
        ModelFamily::Amused => v1::ModelFamily::Amused,
        ModelFamily::Kandinsky20 => v1::ModelFamily::Kandinsky20,
    }
}

/// The public name of a family's generation (`kandinsky-2-1`, `kandinsky-2-2`): the prefix of
/// every model name of the family, and what mixed-family errors name.
pub const fn model_name(family: v1::ModelFamily) -> &'static str {
    match family {
        v1::ModelFamily::Kandinsky21 => "kandinsky-2-1",
        v1::ModelFamily::Kandinsky22 | v1::ModelFamily::Unspecified => "kandinsky-2-2",
        v1::ModelFamily::Amused => "amused",
        v1::ModelFamily::Kandinsky20 => "kandinsky-2-0",
    }
}

/// The public name of the model a stage set serves: its family, then what its decoder is
/// (`-distilled` for a few-step student, `-inpaint` for an inpainting UNet, `-controlnet` for a
/// ControlNet UNet; nothing for a text-to-image teacher). aMUSEd is named by the image side it was
/// trained at (`native_size`): `amused-512` from 512 pixels up, else `amused-256`; one folder
/// serves text-to-image, image-to-image and inpainting.
pub const fn served_name(
    family: v1::ModelFamily,
    kind: v1::DecoderKind,
    distilled: bool,
    native_size: u32,
) -> &'static str {
    use v1::DecoderKind as K;
    use v1::ModelFamily as F;
    match (family, kind, distilled) {
        (F::Amused, _, _) if native_size >= 512 => "amused-512",
        (F::Amused, _, _) => "amused-256",
        (F::Kandinsky20, K::Inpaint, _) => "kandinsky-2-0-inpaint",
        (F::Kandinsky20, _, _) => "kandinsky-2-0",
        (F::Kandinsky21, K::Inpaint, _) => "kandinsky-2-1-inpaint",
        (F::Kandinsky21, K::Controlnet, _) => "kandinsky-2-1-controlnet",
        (F::Kandinsky21, _, true) => "kandinsky-2-1-distilled",
        (F::Kandinsky21, _, false) => "kandinsky-2-1",
        (_, K::Inpaint, _) => "kandinsky-2-2-inpaint",
        (_, K::Controlnet, _) => "kandinsky-2-2-controlnet",
        (_, _, true) => "kandinsky-2-2-distilled",
        (_, _, false) => "kandinsky-2-2",
    }
}

/// Every public model name the API knows (which ones a deployment serves, ListModels says).
pub const MODEL_NAMES: [&str; 12] = [
    "kandinsky-2-2",
    "kandinsky-2-2-distilled",
    "kandinsky-2-2-inpaint",
    "kandinsky-2-2-controlnet",
    "kandinsky-2-1",
    "kandinsky-2-1-distilled",
    "kandinsky-2-1-inpaint",
    "kandinsky-2-1-controlnet",
    "amused-256",
    "amused-512",
    "kandinsky-2-0",
    "kandinsky-2-0-inpaint",
];

#[cfg(feature = "models")]
/// The [`v1::ModelInfo`] of `component` loaded from `dir`, its revision covering `files_of`.
pub fn model_info(
    dir: &CheckpointDir,
    component: &str,
    files_of: &[&str],
    dtype: DType,
    device: &Device,
) -> Result<v1::ModelInfo, ServiceError> {
    Ok(v1::ModelInfo {
        family: wire_family(dir.family()) as i32,
        revision: revision(dir, files_of)?,
        component: component.into(),
        dtype: wire_dtype(dtype) as i32,
        device: device_name(device),
        ..Default::default()
    })
}

#[cfg(feature = "models")]
/// Checks a request's `options.dtype` against the dtype this replica computes in: unspecified or
/// equal is accepted (one replica serves one dtype; route other dtypes to other replicas).
pub fn check_requested_dtype(
    options: Option<&v1::StageOptions>,
    loaded: DType,
) -> Result<(), ServiceError> {
    let Some(o) = options else { return Ok(()) };
    let want = wire_dtype(loaded);
    match v1::DType::try_from(o.dtype) {
        Ok(v1::DType::DtypeUnspecified) => Ok(()),
        Ok(d) if d == want => Ok(()),
        _ => Err(ServiceError::invalid(
            "options.dtype",
            format!(
                "{} is not served here; this replica computes in {} (allowed: DTYPE_UNSPECIFIED or {})",
                v1::DType::try_from(o.dtype)
                    .map(|d| d.as_str_name().to_string())
                    .unwrap_or_else(|_| o.dtype.to_string()),
                want.as_str_name(),
                want.as_str_name()
            ),
        )),
    }
}

#[cfg(all(test, feature = "models"))]
mod tests {
    use super::*;
    use kd_testkit::parity::fixtures_dir;

    #[test]
    fn every_served_name_is_a_public_name() {
        use v1::DecoderKind as K;
        let families = [
            v1::ModelFamily::Kandinsky21,
            v1::ModelFamily::Kandinsky22,
            v1::ModelFamily::Amused,
        ];
        for family in families {
            for kind in [K::Unspecified, K::TextToImage, K::Inpaint, K::Controlnet] {
                for distilled in [false, true] {
                    for native in [0, 256, 512, 1024] {
                        let name = served_name(family, kind, distilled, native);
                        assert!(MODEL_NAMES.contains(&name), "{name}");
                        assert!(name.starts_with(model_name(family)), "{name}");
                    }
                }
            }
        }
        use v1::ModelFamily::Amused;
        assert_eq!(
            served_name(Amused, K::Unspecified, false, 256),
            "amused-256"
        );
        assert_eq!(
            served_name(Amused, K::Unspecified, false, 512),
            "amused-512"
        );
        let distinct: std::collections::HashSet<_> = MODEL_NAMES.iter().collect();
        assert_eq!(distinct.len(), MODEL_NAMES.len());
    }

    #[test]
    fn revision_is_stable_and_depends_on_the_components() {
        let dir = CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap();
        let a = revision(&dir, &["text_encoder", "tokenizer"]).unwrap();
        assert_eq!(a, revision(&dir, &["text_encoder", "tokenizer"]).unwrap());
        assert_eq!(a.len(), 12);
        assert_ne!(a, revision(&dir, &["prior"]).unwrap());
        let info = model_info(&dir, "prior", &["prior"], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(info.family, v1::ModelFamily::Kandinsky22 as i32);
        assert_eq!(info.dtype, v1::DType::DtypeF32 as i32);
        assert_eq!(info.device, "cpu");
    }

    #[test]
    fn requested_dtype_must_match_the_loaded_one() {
        let f16 = v1::StageOptions {
            dtype: v1::DType::DtypeF16 as i32,
        };
        let e = check_requested_dtype(Some(&f16), DType::F32).unwrap_err();
        assert!(e.to_string().contains("options.dtype"), "{e}");
        assert!(e.to_string().contains("DTYPE_F32"), "{e}");
        check_requested_dtype(Some(&v1::StageOptions::default()), DType::F32).unwrap();
        check_requested_dtype(None, DType::F32).unwrap();
    }
}
