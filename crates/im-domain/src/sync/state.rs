//! Per-record sync state (the last synced version of a record's mapped fields) and conflicts.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;
use time::OffsetDateTime;
use uuid::Uuid;

use super::execution::Side;
use super::task::SyncTaskId;
use crate::common::TenantId;

/// The last synced state of one record of one task: what both sides agreed on after the last
/// write the sync made or saw. A change is what differs from it; a record read back with this
/// hash is the sync's own write coming back (an echo) and is not written again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncState {
    pub tenant_id: TenantId,
    pub task_id: SyncTaskId,
    /// The record's key in the Shard Manager (for a record born at the provider, its provider id).
    pub platform_key: String,
    /// The record's id at the provider, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// The mapped fields as last synced, by platform pointer.
    pub fields: Value,
    /// [`fields_hash`] of `fields`.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_version: Option<String>,
    /// Which side the last write came from.
    pub origin: Side,
    /// The record was deleted on one side and the delete was applied (or ignored) on the other.
    #[serde(default)]
    pub deleted: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The platform's whole record at `platform_version` when it holds more than the mapped
    /// fields (unmapped fields, or a value in conflict): what a write to the platform starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_data: Option<Value>,
    /// The open conflict of this record, if one is kept for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_conflict: Option<Uuid>,
    /// The full enumeration of the provider that last saw this record (a `full` run deletes
    /// the records its complete enumeration did not see).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_in: Option<Uuid>,
}

/// The store id of a state: one per task and platform key, made of characters every store
/// accepts in an id whatever the key holds (`/`, `?`, `#`...).
pub fn state_id(task: SyncTaskId, platform_key: &str) -> String {
    let digest = sha2::Sha256::digest(platform_key.as_bytes());
    let mut id = format!("state-{task}-");
    push_hex(&mut id, &digest[..16]);
    id
}

/// Appends `bytes` in lowercase hex (what `{:02x}` writes for each), without an allocation per byte.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// A stable hash of a JSON value, whatever the order of its object keys: hex SHA-256 of a
/// canonical form (keys sorted at every level).
pub fn fields_hash(fields: &Value) -> String {
    let mut hasher = sha2::Sha256::new();
    canonical(fields, &mut hasher);
    let mut hex = String::with_capacity(64);
    push_hex(&mut hex, &hasher.finalize());
    hex
}

fn canonical(value: &Value, hasher: &mut sha2::Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            hasher.update(b"{");
            for key in keys {
                write_json(hasher, key);
                hasher.update(b":");
                canonical(&map[key], hasher);
                hasher.update(b",");
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for item in items {
                canonical(item, hasher);
                hasher.update(b",");
            }
            hasher.update(b"]");
        }
        other => write_json(hasher, other),
    }
}

/// Feeds the compact JSON text of `value` to the hasher (the bytes `serde_json::to_string`
/// makes, without making the string).
fn write_json<T: Serialize + ?Sized>(hasher: &mut sha2::Sha256, value: &T) {
    struct Feed<'a>(&'a mut sha2::Sha256);
    impl std::io::Write for Feed<'_> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Writing to a hasher cannot fail, nor can serializing a string or a JSON value.
    let _ = serde_json::to_writer(Feed(hasher), value);
}

/// How a conflict was settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Resolution {
    Winner {
        side: Side,
    },
    /// A value given by a person (the conflicting fields, by platform pointer).
    Value {
        value: Value,
    },
}

/// A record whose fields were changed on both sides since the last sync, under the `manual`
/// policy: both versions are kept until a person decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncConflict {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub task_id: SyncTaskId,
    pub platform_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// The conflicting fields' platform pointers.
    pub fields: Vec<String>,
    /// Their values as last synced, the provider's now and the platform's now (objects keyed by
    /// platform pointer).
    pub base: Value,
    pub provider: Value,
    pub platform: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub resolved_at: Option<OffsetDateTime>,
    /// When a run wrote the resolution to both sides.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub applied_at: Option<OffsetDateTime>,
}

impl SyncConflict {
    pub fn is_open(&self) -> bool {
        self.resolution.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_ignore_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        assert_eq!(fields_hash(&a), fields_hash(&b));
        assert_ne!(fields_hash(&a), fields_hash(&serde_json::json!({"a": 2})));
        assert_eq!(fields_hash(&a).len(), 64);
        // The text hashed is the keys sorted, then each key and value as compact JSON.
        let text = r#"{"a":1,"b":{"c":"x\"y","d":[true,null,2.5,],},}"#;
        let b = serde_json::json!({"b": {"d": [true, null, 2.5], "c": "x\"y"}, "a": 1});
        let expected: String = sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fields_hash(&b), expected);
    }

    #[test]
    fn state_ids_are_the_task_and_half_the_key_digest_in_hex() {
        let task = SyncTaskId(Uuid::nil());
        let digest: String = sha2::Sha256::digest(b"shard/key?#1").iter().take(16).map(|b| format!("{b:02x}")).collect();
        assert_eq!(state_id(task, "shard/key?#1"), format!("state-{task}-{digest}"));
        assert_eq!(digest.len(), 32);
    }
}
