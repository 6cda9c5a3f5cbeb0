//! Webhooks: signing and verifying deliveries the Standard Webhooks way.

pub mod delivery;
pub mod endpoint;
pub mod ports;
pub mod signature;
