use std::process::ExitCode;

use clap::Parser as _;
use integration_manager::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    run(Cli::parse()).await
}
