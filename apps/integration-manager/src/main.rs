use std::process::ExitCode;

use clap::Parser as _;
use integration_manager::cli::{Cli, run};

// The service allocates many small, short-lived objects on several threads (requests, JSON,
// SQLite rows): mimalloc does that with less contention than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    run(Cli::parse()).await
}
