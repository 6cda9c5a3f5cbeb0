//! Memory at rest: what a one-time build leaves freed in its thread's allocator.
//!
//! A few things are built once, by the first request that needs them: a request body's
//! validators are compiled from the OpenAPI document's schemas, which allocates and frees about
//! 7 MB to keep well under one. An allocator keeps what a thread freed committed to that thread
//! until it allocates again (mimalloc: after a purge delay of 10 ms), and an HTTP worker that
//! stays idle after such a build never does, so an instance at rest would hold that memory. The
//! library says when such memory can go back ([`release_freed`], after each such build); the
//! binary, which picks the allocator, says how ([`on_release`], in `main.rs`).

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Registers how the process's allocator hands the calling thread's freed memory back to the
/// operating system. The first registration is kept.
pub fn on_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Hands the calling thread's freed memory back, after a one-time build; does nothing without
/// a registration (the libraries' and tests' system allocator).
pub fn release_freed() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}
