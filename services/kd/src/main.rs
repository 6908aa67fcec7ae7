//! `kd`: run the kandinsky-serve stack locally and generate images from the command line.

mod generate;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kd", about = "kandinsky-serve command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole stack (gateway + four stages) on loopback ports; Ctrl-C stops it.
    Up(up::UpArgs),
    /// Generate images through a gateway.
    Generate(Box<generate::GenerateArgs>),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Up(a) => up::run(a).await,
        Command::Generate(a) => generate::run(*a).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", generate::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
