//! Repository support shared by the containers: documents to and from JSON.

use im_domain::{DomainError, Stored};

use crate::documents::Doc;

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<String, DomainError> {
    serde_json::to_string(value).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding a document")))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(doc: Doc) -> Result<Stored<T>, DomainError> {
    let value = serde_json::from_str(&doc.body)
        .map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context(format!("decoding stored document '{}'", doc.id))))?;
    Ok(Stored { value, etag: doc.etag })
}
