//! Connections: one writer behind a mutex, a small pool of readers (WAL lets them read while
//! the writer writes), all used from tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_domain::{Clock, DomainError};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

/// Readers kept open between requests.
const MAX_IDLE_READERS: usize = 8;

/// Called after a transaction that recorded events commits (wakes the outbox relay).
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

pub struct Db {
    path: PathBuf,
    notifier: std::sync::RwLock<Option<Notifier>>,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish_non_exhaustive()
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL: readers never block the writer; NORMAL sync is durable against a crash of the
    // process (a committed transaction is in the WAL before the call returns).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Translates SQLite failures: a busy or locked database is temporary, everything else is a defect.
pub(crate) fn map_sqlite(error: rusqlite::Error) -> DomainError {
    use rusqlite::ErrorCode;
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            DomainError::Unavailable { reason: "the embedded database is busy".into(), retry_after: Some(Duration::from_secs(1)) }
        }
        Some(ErrorCode::DiskFull | ErrorCode::CannotOpen | ErrorCode::SystemIoFailure) => {
            DomainError::unavailable(format!("embedded database: {error}"))
        }
        _ => DomainError::Unexpected(anyhow::Error::new(error).context("embedded database")),
    }
}

fn join_error(error: tokio::task::JoinError) -> DomainError {
    DomainError::Unexpected(anyhow::anyhow!("embedded database task failed: {error}"))
}

impl Db {
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let writer = Connection::open(path).map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
        configure(&writer)?;
        Ok(Self { path: path.to_owned(), notifier: std::sync::RwLock::new(None), writer: Arc::new(Mutex::new(writer)), readers: Arc::new(Mutex::new(Vec::new())), clock })
    }

    pub fn set_notifier(&self, notifier: Notifier) {
        *self.notifier.write().unwrap_or_else(|p| p.into_inner()) = Some(notifier);
    }

    pub(crate) fn notify_if(&self, recorded_events: bool) {
        if recorded_events {
            if let Some(notify) = self.notifier.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
                notify();
            }
        }
    }

    /// Current time in unix seconds, from the injected clock (TTL expiry uses it).
    pub fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    fn reader(path: &Path, pool: &Mutex<Vec<Connection>>) -> rusqlite::Result<Connection> {
        if let Some(conn) = pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Runs `f` on a reader connection in the blocking pool.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, DomainError> {
        let (path, pool) = (self.path.clone(), self.readers.clone());
        tokio::task::spawn_blocking(move || {
            let conn = Self::reader(&path, &pool).map_err(map_sqlite)?;
            let result = f(&conn).map_err(map_sqlite);
            let mut idle = pool.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(join_error)?
    }

    /// Runs `f` in one immediate transaction on the writer, committed when `f` succeeds and
    /// rolled back whole when it fails.
    pub async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<R, DomainError> + Send + 'static,
    ) -> Result<R, DomainError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_sqlite)?;
            let value = f(&tx)?;
            tx.commit().map_err(map_sqlite)?;
            Ok(value)
        })
        .await
        .map_err(join_error)?
    }
}
