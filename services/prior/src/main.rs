//! `kd-prior`: parses the configuration and runs the service until SIGTERM.

use clap::Parser;
use kd_prior::Config;
use kd_runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = kd_runtime::telemetry::init_tracing(&config.common, "kd-prior");
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_prior::run(config, shutdown).await?;
    Ok(())
}
