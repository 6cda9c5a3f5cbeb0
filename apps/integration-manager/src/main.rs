use std::process::ExitCode;

use clap::Parser as _;
use integration_manager::cli::{Cli, run};

/// The service's allocator: mimalloc (docs/architecture.md, "Memory": faster than the system
/// allocator on the write and delivery paths, with about the same memory at rest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    run(Cli::parse()).await
}
