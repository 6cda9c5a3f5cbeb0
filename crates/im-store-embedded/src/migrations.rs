//! Numbered schema migrations. A migration is never edited once released: add a new one.

use im_domain::DomainError;
use rusqlite::Connection;

use crate::db::map_sqlite;

/// `(version, name, sql)`, applied in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "documents",
        r#"
    -- One table of JSON documents, organised like Cosmos DB containers.
    CREATE TABLE documents (
        container  TEXT    NOT NULL,
        pk         TEXT    NOT NULL,          -- partition key value
        id         TEXT    NOT NULL,
        etag       TEXT    NOT NULL,          -- opaque concurrency token, new on every write
        body       TEXT    NOT NULL,          -- the document, JSON
        expires_at INTEGER,                   -- unix seconds; NULL = kept until deleted
        PRIMARY KEY (container, pk, id)
    ) WITHOUT ROWID;
    CREATE INDEX documents_by_id ON documents (container, id);
    CREATE INDEX documents_by_expiry ON documents (expires_at) WHERE expires_at IS NOT NULL;

    -- Ids of built-in catalog providers that were seeded once: never seeded again, so an
    -- administrator's edit or deletion survives restarts.
    CREATE TABLE catalog_seed (
        provider_id TEXT PRIMARY KEY,
        seeded_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    ),
    (
        2,
        "outbox",
        r#"
    -- The transactional outbox: events written in the same transaction as the change they
    -- describe, deleted once the publisher confirmed them.
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- publication order
        id         TEXT    NOT NULL UNIQUE,            -- the event id
        body       TEXT    NOT NULL,                   -- the event, JSON
        created_at INTEGER NOT NULL                    -- unix milliseconds
    );
    "#,
    ),
    (
        3,
        "delivery_jobs",
        r#"
    -- The durable queue of webhook delivery attempts: a row per delivery waiting for an attempt.
    CREATE TABLE delivery_jobs (
        delivery_id  TEXT    PRIMARY KEY,
        tenant_id    TEXT    NOT NULL,
        due_at       INTEGER NOT NULL,   -- unix milliseconds
        leased_until INTEGER NOT NULL    -- unix milliseconds; a worker holds the job until then
    ) WITHOUT ROWID;
    CREATE INDEX delivery_jobs_by_due ON delivery_jobs (due_at);
    "#,
    ),
    (
        4,
        "outbox_claims",
        r#"
    -- The relay holding an outbox event, and until when (unix milliseconds).
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
    ALTER TABLE outbox ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0;
    "#,
    ),
    (
        5,
        "outbox_dead_letters",
        r#"
    -- Failed tries to read or publish an outbox event, why the last one failed, and when the
    -- event was set aside as a dead letter (unix milliseconds; NULL while it is pending).
    ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN last_error TEXT;
    ALTER TABLE outbox ADD COLUMN dead_at INTEGER;
    "#,
    ),
    (
        6,
        "audit_buffer",
        r#"
    -- Audit records waiting for the Logging Service: written in the request that makes them,
    -- deleted once the service acknowledged them. `seq` orders them; a shipper holds a batch
    -- until `claimed_until` (unix milliseconds).
    CREATE TABLE audit_buffer (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        id            TEXT    NOT NULL UNIQUE,
        recorded_at   INTEGER NOT NULL,   -- the record's timestamp, unix milliseconds
        body          TEXT    NOT NULL,   -- the record in its wire form (JSON)
        claimed_by    TEXT,
        claimed_until INTEGER NOT NULL DEFAULT 0
    );
    "#,
    ),
    (
        7,
        "shard_records_by_seq",
        r#"
    -- The embedded Shard Manager's change sequence per partition: the next number and the
    -- changes after a cursor are index reads, not scans of the partition.
    CREATE INDEX shard_records_by_seq ON documents (pk, json_extract(body, '$.seq')) WHERE container = 'shard_records';
    "#,
    ),
    (
        8,
        "documents_rowid",
        r#"
    -- Documents in a rowid table, their key in a unique index. In a WITHOUT ROWID table each
    -- row, JSON body included, lives in the key's B-tree: a body larger than a cell spills into
    -- overflow pages, and every key comparison of a lookup or insert read the whole document
    -- again. The index holds only the key, so a lookup compares keys and then reads one row.
    CREATE TABLE documents_by_rowid (
        container  TEXT    NOT NULL,
        pk         TEXT    NOT NULL,          -- partition key value
        id         TEXT    NOT NULL,
        etag       TEXT    NOT NULL,          -- opaque concurrency token, new on every write
        body       TEXT    NOT NULL,          -- the document, JSON
        expires_at INTEGER                    -- unix seconds; NULL = kept until deleted
    );
    INSERT INTO documents_by_rowid (container, pk, id, etag, body, expires_at)
        SELECT container, pk, id, etag, body, expires_at FROM documents ORDER BY container, pk, id;
    DROP TABLE documents;
    ALTER TABLE documents_by_rowid RENAME TO documents;
    CREATE UNIQUE INDEX documents_key ON documents (container, pk, id);
    CREATE INDEX documents_by_id ON documents (container, id);
    CREATE INDEX documents_by_expiry ON documents (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX shard_records_by_seq ON documents (pk, json_extract(body, '$.seq')) WHERE container = 'shard_records';
    "#,
    ),
    (
        9,
        "deliveries_by_hold_end",
        r#"
    -- Pending deliveries held by an attempt, by the end of the hold: the sweep that queues
    -- again the first attempts of an instance that stopped before recording them reads only
    -- these (a handful), never the deliveries of the last 7 days.
    CREATE INDEX deliveries_by_hold_end ON documents (json_extract(body, '$.leaseUntil'))
        WHERE container = 'integration_webhook_deliveries' AND json_extract(body, '$.status') = 'pending'
            AND json_extract(body, '$.leaseUntil') IS NOT NULL;
    "#,
    ),
    (
        10,
        "deliveries_by_hold",
        r#"
    -- The end of a pending delivery's hold in a column of its own, written with the delivery:
    -- an index on the body's fields parsed each delivery's JSON (old row and new) at every
    -- write, to find the few that the sweep reads.
    ALTER TABLE documents ADD COLUMN hold_until TEXT;  -- RFC 3339 (UTC); NULL but for held pending deliveries
    -- The held ones found by the index about to go (not by parsing every delivery of 7 days).
    UPDATE documents INDEXED BY deliveries_by_hold_end SET hold_until = json_extract(body, '$.leaseUntil')
        WHERE container = 'integration_webhook_deliveries' AND json_extract(body, '$.status') = 'pending'
            AND json_extract(body, '$.leaseUntil') IS NOT NULL;
    DROP INDEX deliveries_by_hold_end;
    CREATE INDEX deliveries_by_hold ON documents (hold_until) WHERE hold_until IS NOT NULL;
    "#,
    ),
    (
        11,
        "providers_by_id",
        r#"
    -- Documents by id in any partition: only the catalog's providers are read that way (a
    -- provider is named without its category) or listed across partitions. The index over
    -- every container cost each write of an integration, a delivery or a sync record one more
    -- B-tree insert; it now holds the providers alone, with their expiry and version, so that
    -- a create's check of its provider's version reads the index alone.
    DROP INDEX documents_by_id;
    CREATE INDEX providers_by_id ON documents (id, expires_at, etag) WHERE container = 'integration_providers';
    "#,
    ),
    (
        12,
        "queues_without_autoincrement",
        r#"
    -- The outbox and the audit buffer number their rows without AUTOINCREMENT. `seq` only orders
    -- the rows there (each is deleted once published or acknowledged): a new row takes one more
    -- than the largest left, after every row waiting, as before. AUTOINCREMENT also kept the
    -- largest number ever given in `sqlite_sequence`, read and written again by every insert:
    -- one more page in each commit that wrote an event (a change's; with RabbitMQ, a delivery's
    -- outcome's too) or an audit record.
    -- The rows, their numbers and their claims are kept as they are.
    CREATE TABLE outbox_next (
        seq           INTEGER PRIMARY KEY,        -- publication order
        id            TEXT    NOT NULL UNIQUE,    -- the event id
        body          TEXT    NOT NULL,           -- the event, JSON
        created_at    INTEGER NOT NULL,           -- unix milliseconds
        claimed_by    TEXT,
        claimed_until INTEGER NOT NULL DEFAULT 0,
        attempts      INTEGER NOT NULL DEFAULT 0,
        last_error    TEXT,
        dead_at       INTEGER
    );
    INSERT INTO outbox_next (seq, id, body, created_at, claimed_by, claimed_until, attempts, last_error, dead_at)
        SELECT seq, id, body, created_at, claimed_by, claimed_until, attempts, last_error, dead_at FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_next RENAME TO outbox;
    CREATE TABLE audit_buffer_next (
        seq           INTEGER PRIMARY KEY,
        id            TEXT    NOT NULL UNIQUE,
        recorded_at   INTEGER NOT NULL,   -- the record's timestamp, unix milliseconds
        body          TEXT    NOT NULL,   -- the record in its wire form (JSON)
        claimed_by    TEXT,
        claimed_until INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO audit_buffer_next (seq, id, recorded_at, body, claimed_by, claimed_until)
        SELECT seq, id, recorded_at, body, claimed_by, claimed_until FROM audit_buffer;
    DROP TABLE audit_buffer;
    ALTER TABLE audit_buffer_next RENAME TO audit_buffer;
    "#,
    ),
];

/// What [`crate::EmbeddedStore::migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations applied by this call.
    pub applied: Vec<String>,
    /// The schema version after the call.
    pub version: i64,
}

pub(crate) fn apply(tx: &Connection) -> Result<MigrationReport, DomainError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at INTEGER NOT NULL
         )",
    )
    .map_err(map_sqlite)?;
    let current: i64 = tx.query_row("SELECT coalesce(max(version), 0) FROM schema_migrations", [], |r| r.get(0)).map_err(map_sqlite)?;
    let known = MIGRATIONS.last().map_or(0, |(version, _, _)| *version);
    if current > known {
        // A release from before a migration would write the new schema the old way.
        return Err(DomainError::Unexpected(anyhow::anyhow!(
            "the database was migrated to schema version {current} by a newer release; this one knows up to {known}: \
             run the newer release (or restore a backup taken before it)"
        )));
    }
    let mut report = MigrationReport { applied: Vec::new(), version: current };
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > current) {
        tx.execute_batch(sql).map_err(map_sqlite)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, unixepoch())",
            rusqlite::params![version, name],
        )
        .map_err(map_sqlite)?;
        report.applied.push(format!("{version:04}_{name}"));
        report.version = *version;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies and records the migrations before `version`, as a release from before it left
    /// the database.
    fn migrate_below(tx: &Connection, version: i64) {
        tx.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
            .unwrap();
        for (v, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v < version) {
            tx.execute_batch(sql).unwrap();
            tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, 0)", rusqlite::params![v, name]).unwrap();
        }
    }

    /// Writes a document that never expires, as a release of the schema at hand did.
    fn put(tx: &Connection, container: &str, pk: &str, id: &str, body: &str) {
        tx.execute(
            "INSERT INTO documents (container, pk, id, etag, body, expires_at) VALUES (?1, ?2, ?3, 'e', ?4, NULL)",
            rusqlite::params![container, pk, id, body],
        )
        .unwrap();
    }

    /// A database written before the documents moved to a rowid table keeps every document,
    /// and its key stays unique.
    #[test]
    fn documents_written_before_the_rowid_table_survive_it() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        migrate_below(&tx, 8);
        let body = format!("{{\"text\":\"{}\"}}", "x".repeat(20_000));
        for id in ["a", "b"] {
            tx.execute(
                "INSERT INTO documents (container, pk, id, etag, body, expires_at) VALUES ('c', 'p', ?1, 'e', ?2, NULL)",
                rusqlite::params![id, body],
            )
            .unwrap();
        }

        let report = apply(&tx).unwrap();

        assert_eq!(report.applied[..2], ["0008_documents_rowid".to_owned(), "0009_deliveries_by_hold_end".to_owned()]);
        let kept: Vec<(String, String)> = tx
            .prepare("SELECT id, body FROM documents ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, vec![("a".to_owned(), body.clone()), ("b".to_owned(), body)]);
        let again = tx.execute("INSERT INTO documents (container, pk, id, etag, body) VALUES ('c', 'p', 'a', 'e2', '{}')", []);
        assert!(again.is_err(), "the key (container, pk, id) stays unique");
        let upserted = tx
            .execute(
                "INSERT INTO documents (container, pk, id, etag, body) VALUES ('c', 'p', 'a', 'e3', '{}') \
                 ON CONFLICT (container, pk, id) DO UPDATE SET etag = excluded.etag",
                [],
            )
            .unwrap();
        assert_eq!(upserted, 1);
    }

    /// A database from before the providers' own index by id keeps finding them by id, and no
    /// other document is in that index any more.
    #[test]
    fn providers_written_before_their_own_index_are_in_it() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        migrate_below(&tx, 11);
        for (container, pk, id) in [("integration_providers", "vcs", "github"), ("integration_integrations", "tenant", "one")] {
            put(&tx, container, pk, id, "{}");
        }

        let report = apply(&tx).unwrap();

        assert_eq!(report.applied[0], "0011_providers_by_id");
        let column =
            |sql: &str| -> Vec<String> { tx.prepare(sql).unwrap().query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap() };
        let indexes = column("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'documents' ORDER BY name");
        assert!(indexes.contains(&"providers_by_id".to_owned()) && !indexes.contains(&"documents_by_id".to_owned()), "{indexes:?}");
        let indexed =
            column("SELECT id FROM documents INDEXED BY providers_by_id WHERE container = 'integration_providers' AND id = 'github'");
        assert_eq!(indexed, ["github"]);
    }

    /// The outbox's and the audit buffer's columns, constraints and rows waiting when
    /// AUTOINCREMENT went are kept as they were (numbers, claims, failures, dead letters); a new
    /// row comes after them, numbered from the rows left (not from a number kept for the table);
    /// no insert writes `sqlite_sequence` any more.
    #[test]
    fn queued_rows_outlive_the_queues_without_autoincrement() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        migrate_below(&tx, 12);
        for (seq, id, dead_at) in [(3, "a", None), (7, "b", Some(4)), (9, "gone", None)] {
            tx.execute(
                "INSERT INTO outbox (seq, id, body, created_at, claimed_by, claimed_until, attempts, last_error, dead_at) \
                 VALUES (?1, ?2, '{\"n\":1}', 1, 'relay', 5, 2, 'refused', ?3)",
                rusqlite::params![seq, id, dead_at],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO audit_buffer (seq, id, recorded_at, body, claimed_by, claimed_until) VALUES (?1, ?2, 1, '{}', 'shipper', 5)",
                rusqlite::params![seq, id],
            )
            .unwrap();
        }
        tx.execute_batch("DELETE FROM outbox WHERE id = 'gone'; DELETE FROM audit_buffer WHERE id = 'gone';").unwrap();
        let text = |sql: &str, table: &str| -> Vec<String> {
            tx.prepare(&sql.replace("{table}", table)).unwrap().query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        // Every column with its type, NOT NULL, default and key; every index with its columns
        // and whether it is unique; every row, each column.
        let schema = "SELECT format('%s %s %d %s %d', name, type, \"notnull\", dflt_value, pk) FROM pragma_table_info('{table}') \
             UNION ALL SELECT format('index %d %s', il.\"unique\", ii.name) FROM pragma_index_list('{table}') il, pragma_index_info(il.name) ii";
        let rows = "SELECT json_group_array(json_array(seq, id, body, created_at, claimed_by, claimed_until, attempts, last_error, dead_at)) \
             FROM (SELECT * FROM outbox ORDER BY seq)";
        let audit_rows = "SELECT json_group_array(json_array(seq, id, recorded_at, body, claimed_by, claimed_until)) \
             FROM (SELECT * FROM audit_buffer ORDER BY seq)";
        let before = [text(schema, "outbox"), text(schema, "audit_buffer"), text(rows, ""), text(audit_rows, "")];

        let report = apply(&tx).unwrap();

        assert_eq!(report.applied[0], "0012_queues_without_autoincrement");
        let after = [text(schema, "outbox"), text(schema, "audit_buffer"), text(rows, ""), text(audit_rows, "")];
        assert_eq!(after, before);
        assert!(after[0].contains(&"index 1 id".to_owned()), "the event id stays unique: {:?}", after[0]);
        assert_eq!(after[2], [r#"[[3,"a","{\"n\":1}",1,"relay",5,2,"refused",null],[7,"b","{\"n\":1}",1,"relay",5,2,"refused",4]]"#]);
        for table in ["outbox", "audit_buffer"] {
            let sql: String = tx.query_row("SELECT sql FROM sqlite_master WHERE name = ?1", [table], |r| r.get(0)).unwrap();
            assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
        }
        tx.execute("INSERT INTO outbox (id, body, created_at) VALUES ('c', '{}', 2)", []).unwrap();
        tx.execute("INSERT INTO audit_buffer (id, recorded_at, body) VALUES ('c', 2, '{}')", []).unwrap();
        for table in ["outbox", "audit_buffer"] {
            let last: (i64, String) = tx
                .query_row(&format!("SELECT seq, id FROM {table} ORDER BY seq DESC LIMIT 1"), [], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap();
            // With AUTOINCREMENT it would be 10, after the deleted 9.
            assert_eq!(last, (8, "c".to_owned()), "{table}: a new row comes next after the rows waiting");
        }
        let sequences: i64 = tx.query_row("SELECT count(*) FROM sqlite_sequence", [], |r| r.get(0)).unwrap_or(0);
        assert_eq!(sequences, 0, "no insert numbers its row through sqlite_sequence");
    }

    /// A database a newer release migrated is refused, not written the old way.
    #[test]
    fn a_database_of_a_newer_release_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        let latest = apply(&tx).unwrap().version;
        tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'from_a_newer_release', 0)", [latest + 1])
            .unwrap();

        let refused = apply(&tx).unwrap_err().to_string();

        assert!(refused.contains(&format!("schema version {}", latest + 1)), "{refused}");
    }

    /// The deliveries held when the hold moved to its own column are found by its index: the
    /// pending ones with a hold, and no other document.
    #[test]
    fn deliveries_held_before_the_hold_column_are_indexed_by_it() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        migrate_below(&tx, 10);
        let rows = [
            ("integration_webhook_deliveries", "held", r#"{"status":"pending","leaseUntil":"2026-12-03T12:02:00.5Z"}"#),
            ("integration_webhook_deliveries", "waiting", r#"{"status":"pending","nextAttemptAt":"2026-12-03T12:02:00Z"}"#),
            ("integration_webhook_deliveries", "done", r#"{"status":"succeeded","leaseUntil":"2026-12-03T12:02:00Z"}"#),
            ("integrations", "other", r#"{"status":"pending","leaseUntil":"2026-12-03T12:02:00Z"}"#),
        ];
        for (container, id, body) in rows {
            put(&tx, container, "p", id, body);
        }

        let report = apply(&tx).unwrap();

        assert_eq!(report.applied[0], "0010_deliveries_by_hold");
        let held: Vec<(String, String)> = tx
            .prepare("SELECT id, hold_until FROM documents INDEXED BY deliveries_by_hold WHERE hold_until IS NOT NULL ORDER BY hold_until")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(held, vec![("held".to_owned(), "2026-12-03T12:02:00.5Z".to_owned())]);
    }
}
