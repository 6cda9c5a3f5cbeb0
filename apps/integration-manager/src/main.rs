use std::process::ExitCode;

use clap::Parser as _;
use integration_manager::cli::{Cli, run};

/// The service's allocator: mimalloc (docs/architecture.md, "Memory": faster than the system
/// allocator on the write and delivery paths, with about the same memory at rest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands the memory the calling thread freed back to the operating system now rather than at
/// its next allocation after the purge delay (`integration_manager::memory`).
#[allow(unsafe_code)]
fn release_freed() {
    // SAFETY: a foreign call that takes no pointer and has no precondition: mimalloc collects
    // the calling thread's heap and purges free pages, which any thread may ask at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[tokio::main]
async fn main() -> ExitCode {
    integration_manager::memory::on_release(release_freed);
    run(Cli::parse()).await
}
