//! Sync tasks: scheduled and manual inbound, outbound and bidirectional sync between a
//! provider's entity and a Shard Manager shard type, with checkpoints, per-record state,
//! conflicts and execution history.

pub mod execution;
pub mod merge;
pub mod ports;
pub mod state;
pub mod task;

pub use execution::{Counts, DirectionCounts, EXECUTION_TTL, ExecutionStatus, RecordError, Side, SyncExecution, Trigger};
pub use state::{Resolution, SyncConflict, SyncState, fields_hash, state_id};
pub use task::{
    Checkpoints, ConflictPolicy, CronSchedule, DeletePolicy, Direction, FieldMapping, JsonPointer, LastExecution, MAX_OUTBOUND_ATTEMPTS,
    MAX_PENDING_OUTBOUND, PendingOutbound, Schedule, SyncMode, SyncTask, SyncTaskDraft, SyncTaskId, SyncTaskSettings, TaskLease,
    TaskStatus,
};

/// Timestamps stored as unix milliseconds (an `i64`), so stores can compare them in queries.
pub mod unix_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn to_millis(at: OffsetDateTime) -> i64 {
        i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    fn from_millis<E: serde::de::Error>(ms: i64) -> Result<OffsetDateTime, E> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(E::custom)
    }

    pub fn serialize<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(to_millis(*at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        from_millis(i64::deserialize(d)?)
    }

    /// The same for an optional timestamp (`null` when absent).
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(at: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => s.serialize_some(&to_millis(*at)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
            Option::<i64>::deserialize(d)?.map(from_millis).transpose()
        }
    }
}
