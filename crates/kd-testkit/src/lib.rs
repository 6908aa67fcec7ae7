//! Test utilities shared by the workspace's tests (kept out of the libraries so they do not
//! slow every build): an in-process server on loopback ports ([`TestServer`]), waiting for
//! `grpc.health.v1` SERVING, scraping `/metrics`, wire tensors, the committed fixtures and a real
//! `redis-server`, and the parity helpers ([`parity`]: `rel_l2`, references) every model test
//! measures against the diffusers fixtures with.
#![forbid(unsafe_code)]

pub mod cpu;
mod health;
mod metrics;
pub mod parity;
pub mod pki;
mod redis;
mod server;
mod wire;

pub use health::{
    assert_health_lifecycle, connect, health_status, wait_serving, watch_health, HealthWatch,
    Target,
};
pub use metrics::{http_get, metric, metric_at, scrape};
pub use redis::{free_port, RedisServer};
pub use server::{stage_info, TestServer, SHUTDOWN_BOUND};
pub use wire::{unwire, wire};

use std::path::{Path, PathBuf};

/// The repository's `tests/fixtures` (tiny and deep checkpoints, diffusers references).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The command line of a stage binary `bin` serving `model_dir` on the CPU, then `extra`:
/// `[bin, --model-dir, <dir>, --device, cpu, extra...]` (parse it with the stage's `Config`).
pub fn stage_args(bin: &str, model_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        bin.to_string(),
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
