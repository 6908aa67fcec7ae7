//! `kd-text-encoder`: parses the configuration and runs the service until SIGTERM.

use clap::Parser;
use kd_runtime::Shutdown;
use kd_text_encoder::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = kd_runtime::telemetry::init_tracing(&config.common, "kd-text-encoder");
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_text_encoder::run(config, shutdown).await?;
    Ok(())
}
