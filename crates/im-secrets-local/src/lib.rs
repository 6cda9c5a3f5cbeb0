//! The embedded default of the Secret Management port: secrets encrypted with AES-256-GCM and
//! kept in `secrets.db` in the data directory. The key comes from configuration or from a key
//! file the app creates with mode 0600 on first run; the database holds only ciphertext. Each value is
//! bound to its name and version (associated data), so a ciphertext cannot be moved to another
//! secret.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use im_domain::DomainError;
use im_domain::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use rusqlite::{Connection, OptionalExtension, params};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// AES-256 key length.
pub const KEY_BYTES: usize = 32;

/// Secrets encrypted at rest in a local SQLite file.
pub struct LocalSecretStore {
    cipher: Aes256Gcm,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for LocalSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecretStore").finish_non_exhaustive()
    }
}

fn unexpected(e: impl std::fmt::Display) -> DomainError {
    DomainError::Unexpected(anyhow::anyhow!("local secret store: {e}"))
}

/// The local store's key of the `secrets` section.
#[derive(Debug, Clone, Deserialize)]
pub struct LocalSecretSettings {
    /// Base64 of 32 bytes; empty: the key file the app keeps in the data directory. A secret.
    pub local_key: SecretString,
}

impl LocalSecretSettings {
    /// Problems of the values, each with its key in the section.
    #[must_use]
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        match self.configured_key() {
            Ok(_) => Vec::new(),
            Err(_) => vec![("local_key", "must be base64 of 32 bytes".to_owned())],
        }
    }

    /// The configured key; `None` when `local_key` is empty (the key file is used then).
    ///
    /// # Errors
    /// When the key is not base64 of exactly 32 bytes.
    pub fn configured_key(&self) -> anyhow::Result<Option<[u8; KEY_BYTES]>> {
        match self.local_key.expose_secret() {
            "" => Ok(None),
            text => parse_key(text).map(Some),
        }
    }
}

/// Parses a base64 32-byte key.
///
/// # Errors
/// When it is not base64 of exactly 32 bytes.
pub fn parse_key(text: &str) -> anyhow::Result<[u8; KEY_BYTES]> {
    let bytes = STANDARD.decode(text).map_err(|_| anyhow::anyhow!("the key is not base64"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("the key must be {KEY_BYTES} bytes"))
}

impl LocalSecretStore {
    /// Opens (creating if needed) `secrets.db` in `data_dir`.
    ///
    /// # Errors
    /// When the file cannot be opened or its schema created.
    pub fn open(data_dir: &Path, key: &[u8; KEY_BYTES]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let conn = Connection::open(data_dir.join("secrets.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS secrets (
                 name       TEXT    NOT NULL,
                 version    INTEGER NOT NULL,
                 nonce      BLOB    NOT NULL,
                 ciphertext BLOB    NOT NULL,
                 metadata   TEXT    NOT NULL,
                 created_at INTEGER NOT NULL DEFAULT (unixepoch()),
                 PRIMARY KEY (name, version)
             ) WITHOUT ROWID",
        )?;
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| anyhow::anyhow!("the key must be {KEY_BYTES} bytes"))?;
        Ok(Self { cipher, conn: Mutex::new(conn) })
    }

    fn aad(name: &SecretName, version: i64) -> Vec<u8> {
        format!("{name}#{version}").into_bytes()
    }
}

#[async_trait]
impl SecretStore for LocalSecretStore {
    #[tracing::instrument(skip_all, name = "secrets.put", fields(secret = %name))]
    async fn put(&self, name: &SecretName, value: &SecretValue, metadata: &BTreeMap<String, String>) -> Result<SecretRef, DomainError> {
        let plaintext = serde_json::to_vec(&value.0).map_err(unexpected)?;
        let metadata = serde_json::to_string(metadata).map_err(unexpected)?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(unexpected)?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(unexpected)?;
        let version: i64 = tx
            .query_row("SELECT coalesce(max(version), 0) + 1 FROM secrets WHERE name = ?1", [name.as_str()], |r| r.get(0))
            .map_err(unexpected)?;
        let aad = Self::aad(name, version);
        let ciphertext = self.cipher.encrypt(&Nonce::from(nonce), Payload { msg: &plaintext, aad: &aad }).map_err(unexpected)?;
        tx.execute(
            "INSERT INTO secrets (name, version, nonce, ciphertext, metadata) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name.as_str(), version, nonce.as_slice(), ciphertext, metadata],
        )
        .map_err(unexpected)?;
        tx.commit().map_err(unexpected)?;
        Ok(SecretRef { secret_name: name.clone(), version: version.to_string() })
    }

    #[tracing::instrument(skip_all, name = "secrets.get", fields(secret = %reference.secret_name, version = %reference.version))]
    async fn get(&self, reference: &SecretRef) -> Result<SecretValue, DomainError> {
        let not_found = || DomainError::not_found("secret", &reference.secret_name);
        let version: i64 = reference.version.parse().map_err(|_| not_found())?;
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .query_row(
                "SELECT nonce, ciphertext FROM secrets WHERE name = ?1 AND version = ?2",
                params![reference.secret_name.as_str(), version],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unexpected)?;
        let (nonce, ciphertext) = row.ok_or_else(not_found)?;
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| unexpected("a stored nonce is damaged"))?;
        let aad = Self::aad(&reference.secret_name, version);
        let plaintext = self
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &ciphertext, aad: &aad })
            .map_err(|_| unexpected("a secret failed authentication (wrong key, or tampered data)"))?;
        Ok(SecretValue(serde_json::from_slice(&plaintext).map_err(unexpected)?))
    }

    #[tracing::instrument(skip_all, name = "secrets.delete", fields(secret = %name))]
    async fn delete(&self, name: &SecretName) -> Result<(), DomainError> {
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute("DELETE FROM secrets WHERE name = ?1", [name.as_str()])
            .map_err(unexpected)?;
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "secrets.prune", fields(secret = %current.secret_name, version = %current.version))]
    async fn prune(&self, current: &SecretRef) -> Result<(), DomainError> {
        // A version that is not ours (not a number) has nothing older in this store.
        let Ok(version) = current.version.parse::<i64>() else { return Ok(()) };
        // One statement: a reader sees the old versions or not, never a half-deleted row.
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute("DELETE FROM secrets WHERE name = ?1 AND version < ?2", params![current.secret_name.as_str(), version])
            .map_err(unexpected)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_domain::TenantId;
    use serde_json::json;

    fn name(id: &str) -> SecretName {
        SecretName::new(&TenantId::new("acme").unwrap(), "webhook", id)
    }

    #[test]
    fn the_configured_key_is_checked_and_never_prints() {
        let settings = |key: &str| LocalSecretSettings { local_key: key.into() };
        let good = STANDARD.encode([7u8; KEY_BYTES]);
        assert_eq!(settings(&good).configured_key().unwrap(), Some([7u8; KEY_BYTES]));
        assert_eq!(settings("").configured_key().unwrap(), None);
        assert!(settings("").problems().is_empty());
        for bad in ["not base64!", &STANDARD.encode([7u8; 16])] {
            assert_eq!(settings(bad).problems(), [("local_key", "must be base64 of 32 bytes".to_owned())], "{bad}");
        }
        assert!(!format!("{:?}", settings(&good)).contains(&good));
    }

    #[tokio::test]
    async fn versions_round_trip_encrypted_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let key = [5u8; KEY_BYTES];
        let store = LocalSecretStore::open(dir.path(), &key).unwrap();
        let v1 = store.put(&name("w1"), &SecretValue(json!({"secret": "whsec_first"})), &BTreeMap::new()).await.unwrap();
        let v2 = store.put(&name("w1"), &SecretValue(json!({"secret": "whsec_second"})), &BTreeMap::new()).await.unwrap();
        assert_eq!((v1.version.as_str(), v2.version.as_str()), ("1", "2"));
        assert_eq!(store.get(&v1).await.unwrap().0["secret"], "whsec_first");
        drop(store);

        let raw = std::fs::read(dir.path().join("secrets.db")).unwrap();
        assert!(!raw.windows(12).any(|w| w == b"whsec_second"), "no plaintext on disk");

        let store = LocalSecretStore::open(dir.path(), &key).unwrap();
        assert_eq!(store.get(&v2).await.unwrap().0["secret"], "whsec_second");
        store.delete(&name("w1")).await.unwrap();
        store.delete(&name("w1")).await.unwrap();
        assert!(matches!(store.get(&v2).await, Err(DomainError::NotFound { .. })));
    }

    #[tokio::test]
    async fn a_wrong_key_or_moved_ciphertext_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalSecretStore::open(dir.path(), &[1u8; 32]).unwrap();
        let reference = store.put(&name("w1"), &SecretValue(json!("s")), &BTreeMap::new()).await.unwrap();
        drop(store);
        let other = LocalSecretStore::open(dir.path(), &[2u8; 32]).unwrap();
        assert!(matches!(other.get(&reference).await, Err(DomainError::Unexpected(_))));
        let conn = Connection::open(dir.path().join("secrets.db")).unwrap();
        conn.execute("UPDATE secrets SET name = 'integration-manager/acme/webhook/w2'", []).unwrap();
        let store = LocalSecretStore::open(dir.path(), &[1u8; 32]).unwrap();
        let moved = SecretRef { secret_name: name("w2"), version: "1".into() };
        assert!(matches!(store.get(&moved).await, Err(DomainError::Unexpected(_))), "bound to its name");
    }

    #[tokio::test]
    async fn passes_the_secret_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalSecretStore::open(dir.path(), &[7u8; KEY_BYTES]).unwrap();
        im_testkit::secrets::contract(&store).await;
    }

    #[test]
    fn keys_are_32_bytes_of_base64() {
        assert!(parse_key("c2hvcnQ=").is_err());
        assert!(parse_key(&STANDARD.encode([9u8; 32])).is_ok());
    }
}
