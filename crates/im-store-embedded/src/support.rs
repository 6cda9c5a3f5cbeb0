//! Repository support shared by the containers: documents to and from JSON, reads and listings
//! of one partition, and the leased queues (outbox, audit buffer) claimed and emptied the same
//! way.

use im_domain::{DomainError, Page, PageRequest, Stored};
use rusqlite::{Connection, params};

use crate::db::map_sqlite;
use crate::documents::{Doc, Documents, Query};

/// A table worked through by several instances: rows with `seq`, `id`, `body`, `claimed_by`
/// and `claimed_until` (unix milliseconds), and a condition a row must meet to be worked on.
pub(crate) struct LeasedQueue {
    pub table: &'static str,
    /// SQL over the table's columns, `TRUE` when every row may be claimed.
    pub eligible: &'static str,
}

impl LeasedQueue {
    /// Holds the oldest `limit` eligible rows that are unleased (or already held by `owner`)
    /// for `owner` until `now_ms + lease_ms`, in one statement so that two instances never hold
    /// one row; answers their `(id, body)`, oldest first.
    pub(crate) fn claim(
        &self,
        tx: &Connection,
        owner: &str,
        limit: u32,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<(String, String)>, DomainError> {
        let sql = format!(
            "UPDATE {table} SET claimed_by = ?2, claimed_until = ?4 WHERE seq IN \
             (SELECT seq FROM {table} WHERE ({eligible}) AND (claimed_until <= ?1 OR claimed_by = ?2) ORDER BY seq LIMIT ?3) \
             RETURNING seq, id, body",
            table = self.table,
            eligible = self.eligible
        );
        let mut rows: Vec<(i64, String, String)> = tx
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(params![now_ms, owner, i64::from(limit), now_ms.saturating_add(lease_ms)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(map_sqlite)?;
        rows.sort_unstable_by_key(|(seq, _, _)| *seq);
        Ok(rows.into_iter().map(|(_, id, body)| (id, body)).collect())
    }

    /// Deletes the rows of these ids (done with), in one statement that takes them as a JSON
    /// array, the same text whatever their count: prepared once per connection (a statement
    /// with a mark per id was prepared anew at each call, the relay's every round).
    pub(crate) fn delete(&self, tx: &Connection, ids: &[String]) -> Result<(), DomainError> {
        let ids = serde_json::to_string(ids).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding ids")))?;
        tx.prepare_cached(&format!("DELETE FROM {} WHERE id IN (SELECT value FROM json_each(?1))", self.table))
            .and_then(|mut s| s.execute([ids]))
            .map_err(map_sqlite)?;
        Ok(())
    }
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<String, DomainError> {
    serde_json::to_string(value).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding a document")))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(doc: Doc) -> Result<Stored<T>, DomainError> {
    let value = serde_json::from_str(&doc.body)
        .map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context(format!("decoding stored document '{}'", doc.id))))?;
    Ok(Stored { value, etag: doc.etag })
}

/// The document `id` of partition `pk` of `container`, decoded.
///
/// # Errors
/// `NotFound` naming `resource` and `id` when there is none.
pub(crate) async fn get_decoded<T: serde::de::DeserializeOwned>(
    docs: &Documents,
    container: &'static str,
    resource: &'static str,
    pk: String,
    id: impl std::fmt::Display,
) -> Result<Stored<T>, DomainError> {
    match docs.get(container, pk, id.to_string()).await? {
        Some(doc) => decode(doc),
        None => Err(DomainError::not_found(resource, id)),
    }
}

/// A listing of the partition `pk` of `container`, of the documents that match every filter
/// (`(json path such as "$.status", value)`).
pub(crate) fn partition_query(container: &'static str, pk: String, filters: Vec<(&'static str, String)>, page: &PageRequest) -> Query {
    Query { container, pk: Some(pk), filters, search: None, contains: Vec::new(), page: page.clone() }
}

/// A page of a listing, decoded.
///
/// # Errors
/// `Unexpected` when a document does not decode.
pub(crate) fn decode_page<T: serde::de::DeserializeOwned>(
    (docs, continuation): (Vec<Doc>, Option<String>),
) -> Result<Page<Stored<T>>, DomainError> {
    Ok(Page { items: docs.into_iter().map(decode).collect::<Result<_, _>>()?, continuation })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids given, and only those, are deleted, however many (more than SQLite's marks per
    /// statement once allowed), with ids that need escaping in JSON and ids that are absent.
    #[test]
    fn a_queue_deletes_exactly_the_ids_given() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE)").unwrap();
        let ids: Vec<String> = (0..40_000).map(|i| format!("id-{i}")).chain(["a \"quoted\" \\ id".to_owned()]).collect();
        for id in &ids {
            conn.execute("INSERT INTO q (id) VALUES (?1)", [id]).unwrap();
        }
        let queue = LeasedQueue { table: "q", eligible: "TRUE" };
        let gone: Vec<String> = ids.iter().filter(|id| !id.ends_with('7')).cloned().chain(["absent".to_owned()]).collect();
        queue.delete(&conn, &gone).unwrap();
        queue.delete(&conn, &[]).unwrap();
        let left: Vec<String> =
            conn.prepare("SELECT id FROM q ORDER BY seq").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        let kept: Vec<String> = ids.iter().filter(|id| id.ends_with('7')).cloned().collect();
        assert_eq!(left, kept);
    }
}
