//! `kd-prior`: parses the configuration and runs the service until SIGTERM.

use clap::Parser;
use kd_prior::Config;
use kd_runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kd_runtime::telemetry::init(config.common.log_format);
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_prior::run(config, shutdown).await?;
    Ok(())
}
