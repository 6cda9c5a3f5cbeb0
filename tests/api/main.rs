//! Black-box tests of the whole service over real HTTP: the app is built as in production
//! (embedded store in a fresh directory, real JWTs) and served on a free port.

mod auth;
mod bad_input;
mod connections;
mod contract;
mod deliveries;
mod deploy;
mod events;
mod helpers;
mod instances;
mod integrations;
mod oauth2;
mod operations;
mod platform;
mod providers;
mod readme;
mod sync_runs;
mod sync_tasks;
mod tidy;
mod webhooks;
