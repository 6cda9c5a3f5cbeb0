//! Container/partition/id documents with concurrency tokens, expiry and paging: the
//! Cosmos-like layer every repository of this crate is written on.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use im_domain::common::invalid_continuation;
use im_domain::events::DomainEvent;
use im_domain::{DomainError, ETag, JsonTexts, PageRequest};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{Db, KeyedRow, map_sqlite};
use crate::handoff::OutboxHandoff;

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub pk: String,
    pub id: String,
    pub etag: ETag,
    pub body: String,
}

/// A query inside one container: optionally one partition, equality filters on JSON paths,
/// a case-insensitive text search, ordered by id and paged.
#[derive(Debug, Clone)]
pub struct Query {
    pub container: &'static str,
    /// `None` queries across partitions.
    pub pk: Option<String>,
    /// `(json path such as "$.status", value)`; all must match.
    pub filters: Vec<(&'static str, String)>,
    /// `(json paths, text)`: matches when any path contains the text, ignoring ASCII case.
    pub search: Option<(Vec<&'static str>, String)>,
    /// `(json path of an array, value)`: the array must hold the value; all must match.
    pub contains: Vec<(&'static str, String)>,
    pub page: PageRequest,
}

const TOKEN_PREFIX: &str = "v1:";

pub(crate) fn encode_token(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{last_id}"))
}

pub(crate) fn decode_token(token: &str) -> Result<String, DomainError> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid_continuation())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid_continuation())?;
    text.strip_prefix(TOKEN_PREFIX).map(str::to_owned).ok_or_else(invalid_continuation)
}

pub(crate) fn new_etag() -> ETag {
    ETag::new(uuid::Uuid::new_v4().simple().to_string())
}

/// When a document written at `now` (unix seconds) with `ttl` expires: at the end of the
/// minute in which its TTL ends (at most 59 s later). The writes of one minute share their
/// expiry, so a document written again within the minute of its last write (a delivery's
/// outcome, mostly, a few seconds after the fan-out that made it) leaves its entry in the index
/// by expiry where it is: SQLite moves an entry whose value changes, a page or more a commit
/// (two and a half of the sixteen pages of a commit of outcomes to ten endpoints).
pub(crate) fn expiry(now: i64, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|ttl| {
        let ends = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        ends.saturating_add(59).div_euclid(60).saturating_mul(60).max(ends)
    })
}

// The container is compared as `+?`, not `?`: a partial index on `container = '<literal>'`
// (`shard_records_by_seq`) makes SQLite check each bound container against that literal and
// then prepare the statement again on every new binding; `+?` is the same value, compared
// the same way and still served by the key index, but never matched against the literal.

/// Not expired, with the current time as the next parameter (the statements written out in full
/// repeat it, so that they are constant text for the statement cache).
const LIVE: &str = "(expires_at IS NULL OR expires_at > ?)";

/// Document operations on the embedded database. Its writes leave a row's `hold_until` NULL:
/// deliveries are written by their repository, which sets it ([`crate::deliveries`]).
#[derive(Debug, Clone)]
pub struct Documents {
    db: Arc<Db>,
}

impl Documents {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    /// The database, for a query of its own.
    pub(crate) fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Creates a document; `ttl` makes it expire.
    ///
    /// # Errors
    /// `Conflict` if a live document has the same container, partition and id.
    pub async fn create(
        &self,
        container: &'static str,
        pk: String,
        id: String,
        body: String,
        ttl: Option<Duration>,
    ) -> Result<ETag, DomainError> {
        self.create_with_events(container, pk, id, body, ttl, &[]).await
    }

    /// Creates a document and records `events` in the outbox, in one transaction.
    ///
    /// # Errors
    /// `Conflict` if a live document has the same container, partition and id (no event is recorded).
    pub async fn create_with_events(
        &self,
        container: &'static str,
        pk: String,
        id: String,
        body: String,
        ttl: Option<Duration>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        self.create_requiring(container, pk, id, body, ttl, events, None).await
    }

    /// [`Documents::create_with_events`], only while the catalog's provider `required.0` is live
    /// at version `required.1`, checked in the same transaction.
    ///
    /// # Errors
    /// As `create_with_events`; `PreconditionFailed` when the provider is at another version or
    /// gone (nothing is written).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_requiring(
        &self,
        container: &'static str,
        pk: String,
        id: String,
        body: String,
        ttl: Option<Duration>,
        events: &[DomainEvent],
        required: Option<(String, ETag)>,
    ) -> Result<ETag, DomainError> {
        let now = self.db.now();
        let mut rows = self.outbox_rows(events)?;
        // Made here, and what the write was given handed back to be dropped here: memory is
        // freed fastest by the thread that allocated it (the writer's frees of the HTTP
        // workers' allocations were a twentieth of its time a create).
        let etag = new_etag();
        let (etag, spent) = self
            .db
            .write(move |tx| {
                if let Some((provider, version)) = &required
                    && crate::group_reads::provider_etag(provider, now, || provider_etag(tx, provider, now).map_err(map_sqlite))?.as_ref()
                        != Some(version)
                {
                    return Err(DomainError::PreconditionFailed);
                }
                let ready = events_to_record(tx, &mut rows)?;
                let etag = insert(tx, container, &pk, &id, &body, expiry(now, ttl), None, now, etag)?;
                record_events(tx, ready)?;
                Ok((etag, (pk, id, body, required, rows)))
            })
            .await?;
        drop(spent);
        Ok(etag)
    }

    /// Runs several writes in one transaction (all or nothing).
    pub async fn transaction<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, i64) -> Result<R, DomainError> + Send + 'static,
    ) -> Result<R, DomainError> {
        let now = self.db.now();
        self.db.write(move |tx| f(tx, now)).await
    }

    pub async fn get(&self, container: &'static str, pk: String, id: String) -> Result<Option<Doc>, DomainError> {
        let now = self.db.now();
        // By key, answered from this thread's copy while nothing was committed since it was
        // read ([`crate::db::Db::read_row`]); the expiry is judged here, at each read.
        let ((_, pk, id), row) =
            self.db.read_row((container, pk, id), |conn, (container, pk, id)| read_row(conn, container, pk, id)).await?;
        Ok(live(row, pk, id, now))
    }

    /// Several documents of one partition by id, in one statement: one answer per id, in the
    /// order of `ids` (`None` where absent or expired).
    pub async fn get_many(&self, container: &'static str, pk: String, ids: Vec<String>) -> Result<Vec<Option<Doc>>, DomainError> {
        let now = self.db.now();
        let wanted = serde_json::to_string(&ids).map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding ids")))?;
        let mut found = self
            .db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, etag, body FROM documents WHERE container = +?1 AND pk = ?2 \
                     AND id IN (SELECT value FROM json_each(?3)) AND (expires_at IS NULL OR expires_at > ?4)",
                )?
                .query_map(params![container, pk, wanted, now], |r| {
                    Ok(Doc { pk: pk.clone(), id: r.get(0)?, etag: ETag::new(r.get::<_, String>(1)?), body: r.get(2)? })
                })?
                .map(|d| d.map(|d| (d.id.clone(), d)))
                .collect::<rusqlite::Result<std::collections::HashMap<_, _>>>()
            })
            .await?;
        Ok(ids.iter().map(|id| found.remove(id)).collect())
    }

    /// Writes several documents of one partition in one transaction, each on its own terms: a
    /// create when its `if_match` is `None` (`Conflict` when a live one exists), else a
    /// replace conditional on `if_match` (`NotFound` named `resource` when absent,
    /// `PreconditionFailed` when stale). A failing item writes nothing and the others go on;
    /// the outcomes come in the order of `items`, after the commit.
    pub async fn write_each(
        &self,
        container: &'static str,
        resource: &'static str,
        pk: String,
        items: Vec<(String, String, Option<ETag>)>,
    ) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        let now = self.db.now();
        self.db
            .write(move |tx| {
                let mut outcomes = Vec::with_capacity(items.len());
                for (id, body, if_match) in items {
                    let outcome = match if_match {
                        None => match insert(tx, container, &pk, &id, &body, None, None, now, new_etag()) {
                            Err(DomainError::Conflict(m)) => Err(DomainError::Conflict(m)),
                            Err(e) => return Err(e),
                            Ok(etag) => Ok(etag),
                        },
                        Some(etag) => {
                            let key = Key { container, resource, pk: &pk, id: &id };
                            match update_current(tx, &key, Some(&etag), now, &body, None, None) {
                                Err(e @ (DomainError::NotFound { .. } | DomainError::PreconditionFailed)) => Err(e),
                                Err(e) => return Err(e),
                                Ok(etag) => Ok(etag),
                            }
                        }
                    };
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            })
            .await
    }

    /// Finds a provider of the catalog by id, in any category.
    pub async fn find_provider(&self, id: String) -> Result<Option<Doc>, DomainError> {
        let now = self.db.now();
        self.db.read(move |conn| find_provider(conn, &id, now)).await
    }

    /// The concurrency token of a provider of the catalog found by id, in any category,
    /// without reading its body.
    pub async fn provider_etag(&self, id: String) -> Result<Option<ETag>, DomainError> {
        let now = self.db.now();
        Ok(self.db.read(move |conn| provider_etag(conn, &id, now)).await?.map(|(etag, _)| etag))
    }

    /// Replaces a document, optionally moving it to partition `new_pk`, conditionally on
    /// `if_match`, and records `events` in the same transaction.
    ///
    /// # Errors
    /// `NotFound` (named `resource`) if absent; `PreconditionFailed` if `if_match` is stale;
    /// `Conflict` if the target partition already holds the id. Nothing is written then.
    #[allow(clippy::too_many_arguments)]
    pub async fn replace(
        &self,
        container: &'static str,
        resource: &'static str,
        pk: String,
        new_pk: String,
        id: String,
        body: String,
        if_match: Option<ETag>,
        ttl: Option<Duration>,
        events: &[DomainEvent],
    ) -> Result<ETag, DomainError> {
        self.replace_then(container, resource, pk, new_pk, id, move |_, _| Ok(body), if_match, ttl, None, events, |_, _| Ok(())).await
    }

    /// [`Self::replace`] with the body `body` gives in the transaction (it reads, never
    /// writes: it runs before anything changes), then `then` in the same transaction (a
    /// failure of `then` writes nothing). Both are given the transaction and its time (unix
    /// seconds). `hold`: as [`insert`]'s (the column is written at every replace).
    ///
    /// # Errors
    /// As [`Self::replace`], or what `then` returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn replace_then(
        &self,
        container: &'static str,
        resource: &'static str,
        pk: String,
        new_pk: String,
        id: String,
        body: impl FnOnce(&Connection, i64) -> Result<String, DomainError> + Send + 'static,
        if_match: Option<ETag>,
        ttl: Option<Duration>,
        hold: Option<String>,
        events: &[DomainEvent],
        then: impl FnOnce(&Connection, i64) -> Result<(), DomainError> + Send + 'static,
    ) -> Result<ETag, DomainError> {
        let now = self.db.now();
        let mut rows = self.outbox_rows(events)?;
        let etag = self
            .db
            .write(move |tx| {
                // Everything that may fail before anything changes (the writer's rule).
                if new_pk != pk {
                    check_current(tx, container, resource, &pk, &id, if_match.as_ref(), now)?;
                    // The target checked free too (no live document there): the move deletes
                    // before it inserts.
                    match check_current(tx, container, resource, &new_pk, &id, None, now) {
                        Err(DomainError::NotFound { .. }) => {}
                        Ok(()) => return Err(DomainError::Conflict(format!("a document with id '{id}' already exists"))),
                        Err(e) => return Err(e),
                    }
                }
                let rows = events_to_record(tx, &mut rows)?;
                let body = body(tx, now)?;
                let etag = if new_pk == pk {
                    let key = Key { container, resource, pk: &pk, id: &id };
                    update_current(tx, &key, if_match.as_ref(), now, &body, expiry(now, ttl), hold.as_deref())?
                } else {
                    remove(tx, container, &pk, &id)?;
                    insert(tx, container, &new_pk, &id, &body, expiry(now, ttl), hold.as_deref(), now, new_etag())?
                };
                record_events(tx, rows)?;
                then(tx, now)?;
                Ok(etag)
            })
            .await?;
        Ok(etag)
    }

    /// Deletes a document conditionally on `if_match`, recording `events` in the same transaction.
    ///
    /// # Errors
    /// `NotFound` (named `resource`) if absent; `PreconditionFailed` if `if_match` is stale.
    pub async fn delete(
        &self,
        container: &'static str,
        resource: &'static str,
        pk: String,
        id: String,
        if_match: Option<ETag>,
        events: &[DomainEvent],
    ) -> Result<(), DomainError> {
        let now = self.db.now();
        let mut rows = self.outbox_rows(events)?;
        self.db
            .write(move |tx| {
                check_current(tx, container, resource, &pk, &id, if_match.as_ref(), now)?;
                let rows = events_to_record(tx, &mut rows)?;
                remove(tx, container, &pk, &id)?;
                record_events(tx, rows)
            })
            .await?;
        Ok(())
    }

    /// Runs a query; returns one page of documents and the token of the next page.
    ///
    /// # Errors
    /// `Validation` on `continuationToken` for a token this store did not issue.
    pub async fn query(&self, query: Query) -> Result<(Vec<Doc>, Option<String>), DomainError> {
        let after = query.page.continuation.as_deref().map(decode_token).transpose()?;
        let now = self.db.now();
        self.db
            .read(move |conn| {
                // Within one partition every row's pk is the one asked for: it is not read back
                // (a column read is a UTF-8 check and a copy, per row of every page).
                let known_pk = query.pk.clone();
                let limit = query.page.limit as usize;
                let (sql, args) = page_sql(query, after, now, if known_pk.is_some() { "id, etag, body" } else { "id, etag, body, pk" });
                let mut statement = conn.prepare_cached(&sql)?;
                let mut docs = statement
                    .query_map(rusqlite::params_from_iter(args), |r| {
                        let pk = match &known_pk {
                            Some(pk) => pk.clone(),
                            None => r.get(3)?,
                        };
                        Ok(Doc { pk, id: r.get(0)?, etag: ETag::new(r.get::<_, String>(1)?), body: r.get(2)? })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let next = if docs.len() > limit {
                    docs.truncate(limit);
                    docs.last().map(|d| encode_token(&d.id))
                } else {
                    None
                };
                Ok((docs, next))
            })
            .await
    }

    /// [`Documents::query`], as the documents' texts in one buffer (no copy per row of its id,
    /// token or text: what a list that passes the stored texts on needs).
    ///
    /// # Errors
    /// As [`Documents::query`].
    pub async fn query_texts<T>(&self, query: Query) -> Result<(JsonTexts<T>, Option<String>), DomainError> {
        let after = query.page.continuation.as_deref().map(decode_token).transpose()?;
        let now = self.db.now();
        self.db
            .read(move |conn| {
                let limit = query.page.limit as usize;
                let (sql, args) = page_sql(query, after, now, "id, body");
                let mut statement = conn.prepare_cached(&sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(args))?;
                let mut texts = JsonTexts::with_capacity(limit, limit * 512);
                // The id of the page's last row (copied once a page), for the continuation.
                let mut last_id = String::new();
                let mut next = None;
                while let Some(row) = rows.next()? {
                    if texts.len() == limit {
                        // A row past the page: there is a next page, after the last row kept
                        // (none after an empty page, as `query` answers).
                        next = (limit > 0).then(|| encode_token(&last_id));
                        break;
                    }
                    texts.push_stored(row.get_ref(1)?.as_str()?);
                    if texts.len() == limit {
                        last_id.push_str(row.get_ref(0)?.as_str()?);
                    }
                }
                Ok((texts, next))
            })
            .await
    }

    /// Deletes expired documents; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, DomainError> {
        let now = self.db.now();
        self.db
            .write(move |tx| {
                crate::group_reads::changed(None);
                tx.execute("DELETE FROM documents WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now]).map_err(map_sqlite)
            })
            .await
    }
}

/// The SQL and arguments of a page of `query` after the id `after`, selecting `columns`: one
/// row more than the page, so a next page shows.
fn page_sql(query: Query, after: Option<String>, now: i64, columns: &str) -> (String, Vec<SqlValue>) {
    let mut args: Vec<SqlValue> = Vec::new();
    let mut sql = match query.pk {
        Some(pk) => {
            args.extend([query.container.to_owned().into(), now.into(), pk.into()]);
            format!("SELECT {columns} FROM documents WHERE container = +? AND {LIVE} AND pk = ?")
        }
        // Across partitions the container is written out, so that the statement implies the
        // condition of the providers' index by id (the only container read this way; see
        // `provider_etag`). A container's name is one of this crate's constants, never a
        // caller's text.
        None => {
            debug_assert!(query.container.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", query.container);
            args.push(now.into());
            format!("SELECT {columns} FROM documents WHERE container = '{}' AND {LIVE}", query.container)
        }
    };
    if let Some(after) = after {
        sql.push_str(" AND id > ?");
        args.push(after.into());
    }
    for (path, value) in query.filters {
        sql.push_str(" AND json_extract(body, ?) = ?");
        args.push(path.to_owned().into());
        args.push(value.into());
    }
    for (path, value) in query.contains {
        sql.push_str(" AND EXISTS (SELECT 1 FROM json_each(body, ?) WHERE json_each.value = ?)");
        args.push(path.to_owned().into());
        args.push(value.into());
    }
    if let Some((paths, text)) = query.search {
        let ors: Vec<_> = paths.iter().map(|_| "instr(lower(coalesce(json_extract(body, ?), '')), lower(?)) > 0").collect();
        sql.push_str(&format!(" AND ({})", ors.join(" OR ")));
        for path in paths {
            args.push(path.to_owned().into());
            args.push(text.clone().into());
        }
    }
    sql.push_str(" ORDER BY id LIMIT ?");
    args.push(i64::from(query.page.limit + 1).into());
    (sql, args)
}

/// An event for the outbox table, with its text ([`OutboxBody`]) beside it.
pub(crate) struct OutboxRow {
    id: String,
    /// Recorded at, in unix milliseconds.
    at: i64,
    /// Written only if this tenant has a webhook endpoint at the write: the event's readers
    /// act on it only for such tenants ([`Db::write_events_for`]).
    needs_webhooks_of: Option<String>,
    event_id: uuid::Uuid,
    /// The relay the event is handed to, if it has room then ([`Db::hand_off_events`]).
    hand_off: Option<Arc<OutboxHandoff>>,
}

/// An outbox row's event: written out before the write when it is written whatever the write
/// finds, else only once the write has found it is to be written (an event for a tenant without
/// webhook endpoints, which most are, is then never written out).
pub(crate) enum OutboxBody {
    Text(String),
    Later(DomainEvent),
}

impl OutboxBody {
    fn into_text(self) -> Result<String, DomainError> {
        match self {
            Self::Text(text) => Ok(text),
            Self::Later(event) => encode_event(&event),
        }
    }
}

/// The outbox's JSON text of `event`.
fn encode_event(event: &DomainEvent) -> Result<String, DomainError> {
    serde_json::to_string(event).map_err(|err| DomainError::Unexpected(anyhow::Error::new(err).context("encoding an event")))
}

impl Documents {
    /// The outbox rows of `events`.
    pub(crate) fn outbox_rows(&self, events: &[DomainEvent]) -> Result<Vec<(OutboxRow, OutboxBody)>, DomainError> {
        let readers = self.db.event_readers();
        let handoff = self.db.handoff();
        events
            .iter()
            .map(|e| {
                let needs_webhooks_of = readers.filter(|r| r.only_for_tenants_with_webhooks(e.event_type)).map(|_| e.tenant_id.to_string());
                let body = match needs_webhooks_of {
                    Some(_) => OutboxBody::Later(e.clone()),
                    None => OutboxBody::Text(encode_event(e)?),
                };
                let at = (e.time.unix_timestamp_nanos() / 1_000_000) as i64;
                Ok((OutboxRow { id: e.id.to_string(), at, needs_webhooks_of, event_id: e.id, hand_off: handoff.cloned() }, body))
            })
            .collect()
    }
}

/// The rows to write to the outbox, each with its text: not an event whose readers act on it
/// only for tenants with webhook endpoints when its tenant has none (seen in this transaction,
/// so an endpoint committed before it is seen, and one committed after it receives only later
/// events). Changes nothing: a write calls it before its first change, so that an event that
/// cannot be written out fails the write alone.
///
/// The rows kept are taken out of `rows`; those left there are not to be written.
fn events_to_record(tx: &Connection, rows: &mut Vec<(OutboxRow, OutboxBody)>) -> Result<Vec<(OutboxRow, String)>, DomainError> {
    let mut ready = Vec::with_capacity(rows.len());
    let mut next = 0;
    while let Some((row, _)) = rows.get(next) {
        if let Some(tenant) = &row.needs_webhooks_of
            && !crate::group_reads::has_webhooks(tenant, || has_webhooks(tx, tenant))?
        {
            next += 1;
            continue;
        }
        let (row, body) = rows.remove(next);
        ready.push((row, body.into_text()?));
    }
    Ok(ready)
}

/// Writes the rows [`events_to_record`] kept to the outbox. A row is written claimed for the
/// relay it is handed to when that has room, else unclaimed.
fn record_events(tx: &Connection, rows: Vec<(OutboxRow, String)>) -> Result<(), DomainError> {
    for (row, body) in rows {
        let handed = row.hand_off.and_then(|to| Some((to.reserve(crate::handoff::now_ms())?, to)));
        match handed {
            Some((until, to)) => {
                let inserted = tx
                    .prepare_cached("INSERT INTO outbox (id, body, created_at, claimed_by, claimed_until) VALUES (?1, ?2, ?3, ?4, ?5)")
                    .and_then(|mut s| s.execute(params![row.id, body, row.at, to.owner(), until]));
                if let Err(e) = inserted {
                    to.done(1);
                    return Err(map_sqlite(e));
                }
                crate::handoff::note(&to, crate::HandedEvent { id: row.event_id, body, claimed_until_ms: until });
            }
            None => {
                tx.prepare_cached("INSERT INTO outbox (id, body, created_at) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![row.id, body, row.at]))
                    .map_err(map_sqlite)?;
                crate::db::note_outbox_write();
            }
        }
    }
    Ok(())
}

/// Whether the tenant has a webhook endpoint (enabled or not).
pub(crate) fn has_webhooks(tx: &Connection, tenant: &str) -> Result<bool, DomainError> {
    tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM documents WHERE container = +?1 AND pk = ?2)")
        .and_then(|mut s| s.query_row(params![crate::containers::WEBHOOKS, tenant], |r| r.get(0)))
        .map_err(map_sqlite)
}

// The catalog's providers are the only documents read by id across partitions (a provider is
// named without its category), and the only ones listed across partitions: the index by id,
// `providers_by_id` (migration 11), holds them alone, so that no other write pays for it. Its
// condition names the container as a literal, and so do the statements below, which SQLite
// serves from it only when their text implies that condition (a bound container would not).

/// The concurrency token and expiry of the live provider `?1`, in any category (`?2`: now).
const PROVIDER_ETAG: &str = "SELECT etag, expires_at FROM documents WHERE container = 'integration_providers' AND id = ?1 \
     AND (expires_at IS NULL OR expires_at > ?2) LIMIT 1";

/// The live provider `?1`, in any category (`?2`: now).
const FIND_PROVIDER: &str = "SELECT pk, etag, body FROM documents WHERE container = 'integration_providers' AND id = ?1 \
     AND (expires_at IS NULL OR expires_at > ?2) LIMIT 1";

/// The concurrency token and expiry of the live provider `id`, in any category.
fn provider_etag(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<crate::group_reads::LiveProvider> {
    conn.prepare_cached(PROVIDER_ETAG)?.query_row(params![id, now], |r| Ok((ETag::new(r.get::<_, String>(0)?), r.get(1)?))).optional()
}

/// The live provider `id`, in any category.
pub(crate) fn find_provider(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<Option<Doc>> {
    conn.prepare_cached(FIND_PROVIDER)?
        .query_row(params![id, now], |r| {
            Ok(Doc { pk: r.get(0)?, id: id.to_owned(), etag: ETag::new(r.get::<_, String>(1)?), body: r.get(2)? })
        })
        .optional()
}

/// Inserts a document at version `etag` (made by the caller, most often with [`new_etag`])
/// inside a transaction, and returns that version; an expired document with the same key is
/// replaced. `hold`: the end of the hold of a pending delivery, kept beside its body for the
/// index of held deliveries (`None` for any other document).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert(
    tx: &Connection,
    container: &str,
    pk: &str,
    id: &str,
    body: &str,
    expires_at: Option<i64>,
    hold: Option<&str>,
    now: i64,
    etag: ETag,
) -> Result<ETag, DomainError> {
    crate::group_reads::changed(Some(container));
    let add = || {
        tx.prepare_cached(
            "INSERT INTO documents (container, pk, id, etag, body, expires_at, hold_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![container, pk, id, etag.as_str(), body, expires_at, hold]))
        .map_err(map_sqlite)
    };
    // The insert first: a key is rarely taken, so the expired one is looked for only when it is.
    if add()? == 0 {
        let expired = tx
            .prepare_cached(
                "DELETE FROM documents WHERE container = +?1 AND pk = ?2 AND id = ?3 AND expires_at IS NOT NULL AND expires_at <= ?4",
            )
            .and_then(|mut s| s.execute(params![container, pk, id, now]))
            .map_err(map_sqlite)?;
        if expired == 0 || add()? == 0 {
            return Err(DomainError::Conflict(format!("a document with id '{id}' already exists")));
        }
    }
    Ok(etag)
}

/// A document's place, and what it is called in errors.
struct Key<'a> {
    container: &'static str,
    resource: &'static str,
    pk: &'a str,
    id: &'a str,
}

/// Replaces the live document at `key` in place, conditionally on `if_match`, in one statement
/// that finds it, checks it and writes it; only when it changes nothing does a read tell which
/// error it is: `NotFound` (absent or expired) or `PreconditionFailed` (stale). Either way the
/// write failed before changing anything, as the writer requires. A check read before every
/// such write was 2.8% of the service's samples delivering to ten endpoints, on the writer.
fn update_current(
    tx: &Connection,
    key: &Key<'_>,
    if_match: Option<&ETag>,
    now: i64,
    body: &str,
    expires_at: Option<i64>,
    hold: Option<&str>,
) -> Result<ETag, DomainError> {
    let etag = new_etag();
    let update = |sql: &str| {
        tx.prepare_cached(sql)
            .and_then(|mut s| {
                s.execute(params![key.container, key.pk, key.id, etag.as_str(), body, expires_at, hold, now, if_match.map(ETag::as_str)])
            })
            .map_err(map_sqlite)
    };
    // First with the expiry left as it is, when it is the one to write (no TTL, or a write
    // within the same second as the last: a delivery's outcome, mostly). SQLite rewrites the
    // index entry of every column an UPDATE sets, even to the value it holds: setting the
    // expiry again cost each such write an entry deleted and inserted in the expiry's index.
    let mut changed = update(
        "UPDATE documents SET etag = ?4, body = ?5, hold_until = ?7 \
         WHERE container = +?1 AND pk = ?2 AND id = ?3 AND expires_at IS ?6 AND (expires_at IS NULL OR expires_at > ?8) \
         AND (?9 IS NULL OR etag = ?9)",
    )?;
    if changed == 0 {
        changed = update(
            "UPDATE documents SET etag = ?4, body = ?5, expires_at = ?6, hold_until = ?7 \
             WHERE container = +?1 AND pk = ?2 AND id = ?3 AND (expires_at IS NULL OR expires_at > ?8) \
             AND (?9 IS NULL OR etag = ?9)",
        )?;
    }
    if changed == 0 {
        check_current(tx, key.container, key.resource, key.pk, key.id, if_match, now)?;
        return Err(DomainError::Unexpected(anyhow::anyhow!("a live, current {} was not updated", key.resource)));
    }
    crate::group_reads::changed(Some(key.container));
    Ok(etag)
}

fn check_current(
    tx: &Connection,
    container: &str,
    resource: &'static str,
    pk: &str,
    id: &str,
    if_match: Option<&ETag>,
    now: i64,
) -> Result<(), DomainError> {
    let current: Option<String> = tx
        .prepare_cached(
            "SELECT etag FROM documents WHERE container = +?1 AND pk = ?2 AND id = ?3 AND (expires_at IS NULL OR expires_at > ?4)",
        )
        .and_then(|mut s| s.query_row(params![container, pk, id, now], |r| r.get(0)).optional())
        .map_err(map_sqlite)?;
    match current {
        None => Err(DomainError::not_found(resource, id)),
        Some(etag) if if_match.is_some_and(|m| m.as_str() != etag) => Err(DomainError::PreconditionFailed),
        Some(_) => Ok(()),
    }
}

fn remove(tx: &Connection, container: &str, pk: &str, id: &str) -> Result<(), DomainError> {
    crate::group_reads::changed(Some(container));
    tx.prepare_cached("DELETE FROM documents WHERE container = +?1 AND pk = ?2 AND id = ?3")
        .and_then(|mut s| s.execute(params![container, pk, id]))
        .map_err(map_sqlite)?;
    Ok(())
}

/// The row of the document `id` of a partition, live or expired.
fn read_row(conn: &Connection, container: &str, pk: &str, id: &str) -> rusqlite::Result<Option<KeyedRow>> {
    conn.prepare_cached("SELECT etag, body, expires_at FROM documents WHERE container = +?1 AND pk = ?2 AND id = ?3")?
        .query_row(params![container, pk, id], |r| Ok(KeyedRow { etag: r.get(0)?, body: r.get(1)?, expires_at: r.get(2)? }))
        .optional()
}

/// The document of `row` if it is live at `now` (unix seconds).
fn live(row: Option<KeyedRow>, pk: String, id: String, now: i64) -> Option<Doc> {
    row.filter(|r| r.expires_at.is_none_or(|at| at > now)).map(|r| Doc { pk, id, etag: ETag::new(r.etag), body: r.body })
}

/// The live document `id` of a partition, on any connection (a reader, or the writer inside a
/// transaction); `now` in unix seconds decides expiry.
pub(crate) fn read_one(conn: &Connection, container: &str, pk: String, id: String, now: i64) -> rusqlite::Result<Option<Doc>> {
    Ok(live(read_row(conn, container, &pk, &id)?, pk, id, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_tokens_are_refused() {
        assert_eq!(decode_token(&encode_token("abc")).unwrap(), "abc");
        assert!(decode_token("not-a-token!").is_err());
        assert!(decode_token(&URL_SAFE_NO_PAD.encode("v2:abc")).is_err());
    }

    /// SQLite's plan of `sql` (bound with `args`), one line a step.
    fn plan(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> String {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(args, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("\n")
    }

    /// A provider named without its category is found through the index that holds the
    /// providers alone: by the create's version check (from the index alone) and by a read,
    /// never by a scan of the catalog. The statements name the providers' container as the
    /// constant does.
    #[test]
    fn a_provider_is_found_by_id_through_its_own_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        crate::migrations::apply(&tx).unwrap();
        let container = format!("container = '{}'", crate::containers::PROVIDERS);
        // The version check reads the index alone; a read of the provider, its row too.
        for (sql, served) in
            [(PROVIDER_ETAG, "USING COVERING INDEX providers_by_id (id=?)"), (FIND_PROVIDER, "USING INDEX providers_by_id (id=?)")]
        {
            assert!(sql.contains(&container), "{sql}");
            let plan = plan(&tx, sql, params!["github", 0]);
            assert!(plan.contains(served), "{plan}");
        }
        for (category, id) in [("vcs", "github"), ("chat", "slack")] {
            insert(&tx, crate::containers::PROVIDERS, category, id, "{}", None, None, 0, new_etag()).unwrap();
        }
        insert(&tx, crate::containers::INTEGRATIONS, "tenant", "github", "{}", None, None, 0, new_etag()).unwrap();
        assert_eq!(find_provider(&tx, "github", 0).unwrap().map(|d| d.pk), Some("vcs".to_owned()));
        assert!(provider_etag(&tx, "slack", 0).unwrap().is_some());
        assert_eq!(provider_etag(&tx, "jira", 0).unwrap(), None);
        let indexed: i64 = tx
            .query_row("SELECT count(*) FROM documents INDEXED BY providers_by_id WHERE container = 'integration_providers'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(indexed, 2, "the index holds the providers alone");
    }

    /// A replace in place writes only a live document whose version matches (any version
    /// without `if_match`), and each failure is told apart (absent or expired: not found;
    /// another version: stale) without a row changed, as the writer requires of a failing write.
    #[test]
    fn a_replace_in_place_writes_the_current_version_only_and_fails_without_a_change() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        crate::migrations::apply(&tx).unwrap();
        let container = crate::containers::INTEGRATIONS;
        let first = insert(&tx, container, "t", "live", "{\"v\":1}", None, None, 100, new_etag()).unwrap();
        insert(&tx, container, "t", "expired", "{}", Some(150), None, 100, new_etag()).unwrap();
        let key = |id| Key { container, resource: "integration", pk: "t", id };
        let body =
            |id: &str| -> String { tx.query_row("SELECT body FROM documents WHERE pk = 't' AND id = ?1", [id], |r| r.get(0)).unwrap() };
        let changes = || tx.total_changes();

        let second = update_current(&tx, &key("live"), Some(&first), 120, "{\"v\":2}", Some(900), Some("hold")).unwrap();
        assert_ne!(second, first, "a new version");
        assert_eq!(body("live"), "{\"v\":2}");
        let columns = |id: &str| -> (String, Option<i64>, Option<String>) {
            tx.query_row("SELECT etag, expires_at, hold_until FROM documents WHERE pk = 't' AND id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
        };
        assert_eq!(columns("live"), (second.as_str().to_owned(), Some(900), Some("hold".to_owned())));
        let before = changes();
        for (id, if_match, now) in [("live", Some(&first), 120), ("missing", None, 120), ("expired", None, 200), ("expired", None, 150)] {
            let outcome = update_current(&tx, &key(id), if_match, now, "{\"v\":3}", None, None);
            match (id, outcome) {
                ("live", Err(DomainError::PreconditionFailed)) | ("missing" | "expired", Err(DomainError::NotFound { .. })) => {}
                (id, other) => panic!("{id} at {now}: {other:?}"),
            }
        }
        assert_eq!(changes(), before, "no failing replace changed a row");
        assert_eq!(body("live"), "{\"v\":2}");
        update_current(&tx, &key("live"), None, 120, "{\"v\":4}", None, None).unwrap();
        assert_eq!(body("live"), "{\"v\":4}", "without if_match, any version is replaced");
        update_current(&tx, &key("expired"), None, 149, "{\"v\":5}", Some(300), None).unwrap();
        assert_eq!(body("expired"), "{\"v\":5}", "a document is live until its expiry");
    }

    /// A move to another partition whose id is taken there fails before anything changes: the
    /// original stays where it was, and a write queued in the same group commits.
    #[tokio::test]
    async fn a_move_onto_a_taken_id_fails_before_deleting_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::EmbeddedStore::open(dir.path(), Arc::new(im_domain::SystemClock)).unwrap();
        store.migrate().await.unwrap();
        let docs = store.documents();
        let container = crate::containers::PROVIDERS;
        let (s, o) = (|v: &str| v.to_owned(), |v: &str| Some(v.to_owned()));
        let etag = docs.create(container, s("vcs"), s("github"), s("{\"at\":\"vcs\"}"), None).await.unwrap();
        docs.create(container, s("chat"), s("github"), s("{\"at\":\"chat\"}"), None).await.unwrap();
        let (moved, other) = tokio::join!(
            docs.replace(container, "provider", s("vcs"), s("chat"), s("github"), s("{}"), Some(etag), None, &[]),
            docs.create(container, s("chat"), s("slack"), s("{}"), None),
        );
        assert!(matches!(moved, Err(DomainError::Conflict(_))), "{moved:?}");
        other.unwrap();
        let body = |pk: &str, id: &str| {
            let docs = docs.clone();
            let (pk, id) = (s(pk), s(id));
            async move { docs.get(container, pk, id).await.unwrap().map(|d| d.body) }
        };
        assert_eq!(body("vcs", "github").await, o("{\"at\":\"vcs\"}"), "the original was not deleted");
        assert_eq!(body("chat", "github").await, o("{\"at\":\"chat\"}"));
        assert!(body("chat", "slack").await.is_some(), "the other write of the group committed");
    }

    /// A page across partitions names its container as text and reads only that container's
    /// documents, in id order.
    #[test]
    fn a_page_across_partitions_reads_its_container_alone() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        crate::migrations::apply(&tx).unwrap();
        for (container, pk, id) in [
            (crate::containers::PROVIDERS, "vcs", "github"),
            (crate::containers::PROVIDERS, "chat", "slack"),
            (crate::containers::PROVIDERS, "chat", "discord"),
            (crate::containers::INTEGRATIONS, "tenant", "asana"),
        ] {
            insert(&tx, container, pk, id, "{}", None, None, 0, new_etag()).unwrap();
        }
        let query = |pk: Option<&str>| Query {
            container: crate::containers::PROVIDERS,
            pk: pk.map(str::to_owned),
            filters: Vec::new(),
            search: None,
            contains: Vec::new(),
            page: PageRequest::first(10),
        };
        let ids = |pk: Option<&str>, after: Option<&str>| -> Vec<String> {
            let (sql, args) = page_sql(query(pk), after.map(str::to_owned), 0, "id");
            tx.prepare(&sql)
                .unwrap()
                .query_map(rusqlite::params_from_iter(args), |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        assert_eq!(ids(None, None), ["discord", "github", "slack"]);
        assert_eq!(ids(None, Some("github")), ["slack"]);
        assert_eq!(ids(Some("chat"), None), ["discord", "slack"]);
    }
}
