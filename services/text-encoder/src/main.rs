//! `kd-text-encoder`: parses the configuration and runs the service until SIGTERM.

use clap::Parser;
use kd_runtime::Shutdown;
use kd_text_encoder::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kd_runtime::telemetry::init(config.common.log_format);
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_text_encoder::run(config, shutdown).await?;
    Ok(())
}
