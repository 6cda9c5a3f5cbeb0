//! The domain of Integration Manager: aggregates, value objects, port traits and use-case
//! services.
//!
//! This crate depends on no web framework, no async runtime, no HTTP client and no database
//! driver (a tidy test enforces it), so sibling services can reuse it as a library.

pub mod audit;
pub mod auth;
pub mod cache;
pub mod common;
pub mod connection;
pub mod custom;
pub mod duration;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod integration;
pub mod oauth2;
pub mod ports;
pub mod provider;
pub mod provider_client;
pub mod retry;
pub mod schema;
pub mod secrets;
pub mod services;
pub mod sync;
pub mod webhooks;

pub use auth::{Caller, Role};
pub use common::{
    Clock, ETag, IdGenerator, IntegrationId, JsonText, JsonTexts, Page, PageRequest, Stored, SystemClock, TenantId, TextPage, UserId,
    UuidV7,
};
pub use duration::HumanDuration;
pub use error::{DomainError, DomainResult, FieldViolation, ViolationKind, Violations};
