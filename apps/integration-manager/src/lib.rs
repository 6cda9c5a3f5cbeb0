//! Integration Manager: the service. This crate is the only one that knows HTTP shapes and
//! the only one that picks adapters; `main.rs` only parses the command line.

pub mod api;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod deliveries;
pub mod events;
pub mod keys;
pub mod memory;
pub mod metrics;
pub mod startup;
pub mod state;
pub mod sync;
pub mod telemetry;

pub use config::Settings;
pub use startup::{Application, build_app};
pub use state::AppState;
