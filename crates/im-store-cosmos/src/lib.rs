//! The Azure Cosmos DB (NoSQL API) store: every repository port of the domain, and the outbox,
//! on the official `azure_data_cosmos` SDK.
//!
//! - Seven containers with the partition keys and TTLs of the specification ([`CONTAINERS`]),
//!   created by [`provision`] (`integration-manager migrate`) and checked by [`CosmosStore::connect`].
//! - Documents are camelCase JSON with `id`, the partition-key field, a `type` discriminator and
//!   a `schemaVersion`; the adapter owns their structs ([`docs`]).
//! - Every point operation passes the partition key; every listing stays in one partition when
//!   the filter names it, uses parameters, and pages with Cosmos continuation tokens.
//! - `_etag` is the concurrency token; updates and deletes send `If-Match`.
//! - Outbox entries are written in the same transactional batch as the change they describe,
//!   in the same partition of the same container.
//! - SDK errors are mapped here (404, 409, 412, 429 with its retry-after, 5xx, timeouts); no
//!   SDK type crosses a port.

mod audit;
mod client;
mod connections;
mod deliveries;
pub mod docs;
mod errors;
mod idempotency;
mod integrations;
mod outbox;
mod providers;
mod support;
mod sync;
mod webhooks;

pub use client::{CONTAINERS, ContainerSpec, CosmosSettings, CosmosStore, EMULATOR_KEY, ProvisionReport, provision};
