//! Command-line conventions shared by every service: every flag `--long` with an environment
//! variable twin; the doc comment is the `--help` text.

#[cfg(feature = "models")]
use candle_core::{DType, Device};
use std::net::SocketAddr;
#[cfg(feature = "models")]
use std::path::PathBuf;
use std::time::Duration;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags every service binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// gRPC listen address (service API, grpc.health.v1, reflection).
    #[arg(long, env = "KD_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// HTTP listen address for Prometheus `/metrics`.
    #[arg(long, env = "KD_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// OTLP/gRPC collector endpoint for traces (e.g. http://otel-collector:4317); off when unset.
    #[arg(long, env = "KD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log output format.
    #[arg(long, env = "KD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Requests allowed to wait for an execution slot; beyond this, RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "KD_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds between health turning NOT_SERVING on SIGTERM and the server closing its listener.
    #[arg(long, env = "KD_DRAIN_DELAY_SECS", default_value_t = 0.0)]
    pub drain_delay_secs: f64,
    /// Largest gRPC message this service accepts or sends, in bytes; a larger request is
    /// refused with RESOURCE_EXHAUSTED naming the limit. Default: the service's own (see
    /// services/README.md: 64 MiB for the gateway, 512 MiB for the stages).
    #[arg(long, env = "KD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

impl CommonArgs {
    /// The drain delay as a duration (negative values count as zero).
    pub fn drain_delay(&self) -> Duration {
        Duration::from_secs_f64(self.drain_delay_secs.max(0.0))
    }

    /// The message-size limit: `--max-message-bytes`, else `default`.
    pub fn message_limit(&self, default: usize) -> usize {
        self.max_message_bytes.unwrap_or(default).max(1)
    }
}

/// Flags of the model-serving stages.
#[cfg(feature = "models")]
#[derive(Debug, Clone, clap::Args)]
pub struct StageArgs {
    /// Diffusers checkpoint folder (the prior folder for text-encoder and prior, the decoder
    /// folder for denoiser and movq).
    #[arg(long, env = "KD_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, env = "KD_DEVICE", default_value = "auto", value_parser = parse_device_spec)]
    pub device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "KD_DTYPE", default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Redis URL of the embedding cache (e.g. redis://redis:6379); in-process LRU when unset.
    #[arg(long, env = "KD_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Byte cap of the in-process cache used when --redis-url is unset (keys, values and
    /// bookkeeping; least recently used entries go first).
    #[arg(long, env = "KD_CACHE_MEMORY_BYTES", default_value_t = 256 << 20)]
    pub cache_memory_bytes: usize,
    /// A request is refused at admission when this × its estimated work (calibrated at
    /// warm-up) exceeds the time left before its deadline; 0 turns the refusal off.
    #[arg(long, env = "KD_ADMISSION_SAFETY", default_value_t = crate::budget::SAFETY)]
    pub admission_safety: f64,
}

/// `--max-batch-rows` / `--batch-wait-ms` of the stages that micro-batch concurrent calls (the
/// text encoder's prompts, the MoVQ's decodes; see [`crate::microbatch`]).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct MicroBatchArgs {
    /// Micro-batching: most rows (prompts, images) one model call takes from concurrent calls
    /// of one class (same latent size); 0 = off, every call computes alone.
    #[arg(long, env = "KD_MAX_BATCH_ROWS", default_value_t = 8)]
    pub max_batch_rows: usize,
    /// With micro-batching: how long a call arriving at an idle stage waits for companions.
    #[arg(long, env = "KD_BATCH_WAIT_MS", default_value_t = 2)]
    pub batch_wait_ms: u64,
}

impl MicroBatchArgs {
    /// The batching policy, `None` when off.
    pub fn policy(&self) -> Option<crate::microbatch::Policy> {
        (self.max_batch_rows > 0).then(|| crate::microbatch::Policy {
            max_rows: self.max_batch_rows,
            wait: Duration::from_millis(self.batch_wait_ms),
        })
    }

    /// Calls admitted at once: with batching, enough one-row calls to fill a model call (they
    /// wait in the loop's queue); off, `concurrency`.
    pub fn admitted(&self, concurrency: usize) -> usize {
        concurrency.max(self.max_batch_rows).max(1)
    }
}

/// `--max-pixels` of the stages that compute images (denoiser, movq).
#[cfg(feature = "models")]
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PixelArgs {
    /// Largest image a request may ask for, height × width in pixels; default 1048576 (1024²)
    /// on a CPU and 4194304 (2048²) on a GPU.
    #[arg(long, env = "KD_MAX_PIXELS", value_parser = clap::value_parser!(u64).range(4096..))]
    pub max_pixels: Option<u64>,
}

#[cfg(feature = "models")]
impl PixelArgs {
    /// Default on a CPU: 1024 × 1024.
    pub const CPU_DEFAULT: u64 = 1024 * 1024;
    /// Default on a GPU: 2048 × 2048.
    pub const GPU_DEFAULT: u64 = 2048 * 2048;

    /// The limit on `device`: the flag, else the device's default.
    pub fn limit(&self, device: &candle_core::Device) -> u64 {
        self.max_pixels.unwrap_or(if device.is_cpu() {
            Self::CPU_DEFAULT
        } else {
            Self::GPU_DEFAULT
        })
    }

    /// INVALID_ARGUMENT naming `field` when `height × width` (pixels) is over `limit`.
    pub fn check(
        field: &str,
        height: u64,
        width: u64,
        limit: u64,
    ) -> Result<(), crate::ServiceError> {
        match height.checked_mul(width) {
            Some(p) if p <= limit => Ok(()),
            _ => Err(crate::ServiceError::invalid(
                field,
                format!(
                    "{height}×{width} pixels; allowed: height × width ≤ {limit} (this stage's \
                     --max-pixels)"
                ),
            )),
        }
    }
}

#[cfg(feature = "models")]
/// A requested compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first CUDA device if this build and machine have one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

#[cfg(feature = "models")]
/// Parses `auto`, `cpu` or `cuda:N`.
pub fn parse_device_spec(s: &str) -> Result<DeviceSpec, String> {
    match s {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("unknown device `{s}` (allowed: auto, cpu, cuda:N)")),
    }
}

#[cfg(feature = "models")]
/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("unknown dtype `{s}` (allowed: f32, f16, bf16)")),
    }
}

#[cfg(feature = "models")]
impl StageArgs {
    /// Opens `--device` for `--dtype`: bf16 is refused on a CPU, whose candle kernels have no
    /// bf16 matmul or convolution (a CUDA device computes it; on a CPU use f32 or f16).
    pub fn open_device(&self) -> Result<Device, crate::ServiceError> {
        let device = self
            .device
            .open()
            .map_err(|e| crate::ServiceError::Unavailable(format!("--device: {e}")))?;
        if device.is_cpu() && self.dtype == DType::BF16 {
            return Err(crate::ServiceError::Unavailable(
                "--dtype bf16 needs a CUDA device (--device cuda:N): candle's CPU kernels have \
                 no bf16 matmul or convolution; on a CPU use --dtype f32 or f16"
                    .into(),
            ));
        }
        Ok(device)
    }
}

#[cfg(feature = "models")]
impl DeviceSpec {
    /// Opens the device; `cuda:N` fails with a clear message when this build has no CUDA.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|e| format!("cannot open cuda:{n}: {e}")),
        }
    }
}

#[cfg(feature = "models")]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_parsing() {
        assert_eq!(parse_device_spec("auto"), Ok(DeviceSpec::Auto));
        assert_eq!(parse_device_spec("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device_spec("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        let e = parse_device_spec("gpu").unwrap_err();
        assert!(e.contains("allowed: auto, cpu, cuda:N"), "{e}");
        assert_eq!(parse_dtype("f16"), Ok(DType::F16));
        assert!(parse_dtype("f64")
            .unwrap_err()
            .contains("allowed: f32, f16, bf16"));
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn bf16_is_refused_on_a_cpu_naming_the_flags() {
        let args = |dtype: &str| {
            #[derive(clap::Parser)]
            struct A {
                #[command(flatten)]
                stage: StageArgs,
            }
            <A as clap::Parser>::parse_from([
                "x",
                "--model-dir",
                "m",
                "--device",
                "cpu",
                "--dtype",
                dtype,
            ])
            .stage
        };
        let e = args("bf16").open_device().unwrap_err().to_string();
        assert!(e.contains("--dtype bf16 needs a CUDA device"), "{e}");
        assert!(args("f16").open_device().unwrap().is_cpu());
    }
}

#[cfg(all(test, feature = "models"))]
mod pixel_tests {
    use super::PixelArgs;
    use candle_core::Device;

    #[test]
    fn the_pixel_limit_defaults_by_device_and_refuses_by_name() {
        let unset = PixelArgs { max_pixels: None };
        assert_eq!(unset.limit(&Device::Cpu), 1024 * 1024);
        let set = PixelArgs {
            max_pixels: Some(512 * 512),
        };
        assert_eq!(set.limit(&Device::Cpu), 512 * 512);
        PixelArgs::check("height", 512, 512, 512 * 512).unwrap();
        let e = PixelArgs::check("height", 512, 576, 512 * 512).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("height") && m.contains("≤ 262144"), "{m}");
        // No overflow on hostile sides.
        assert!(PixelArgs::check("width", u64::MAX, u64::MAX, u64::MAX).is_err());
    }
}
