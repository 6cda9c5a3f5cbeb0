//! Webhooks: signing and verifying deliveries the Standard Webhooks way.

pub mod signature;
