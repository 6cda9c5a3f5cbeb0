//! Connections: one writer thread, a checkpointer thread, and a read connection per thread
//! that reads (WAL lets them read while the writer writes).

use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use im_domain::ports::EventReaders;
use im_domain::{Clock, DomainError};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::handoff::OutboxHandoff;
use crate::wal_index::{HEADERS as WAL_INDEX_HEADERS, READ as WAL_INDEX_READ, WalIndex};

/// Most writes committed together in one transaction (group commit).
const MAX_GROUP: usize = 128;

/// While the disk is behind ([`Gate::disk_behind`]), how long the writer waits for more writes
/// after the first of a group, unless [`MAX_GROUP`] come sooner. Each commit writes whole pages
/// to the WAL, the last partly filled page of each B-tree it changed among them, whatever the
/// group's size: groups of 8 creates wrote 5.6 pages each, 2.9 KB a create, and the disk flushes
/// all of it at the next checkpoint. Bigger groups write fewer bytes a write when bytes are what
/// the disk cannot keep up with; when it keeps up, nothing waits.
const GATHER_WAIT: Duration = Duration::from_millis(1);
/// While gathering, the writer stops waiting once no write came for this long: the writes
/// that were under way have come (with 64 clients, groups of about 60 instead of 8).
const GATHER_GAP: Duration = Duration::from_micros(200);
/// A held checkpoint pass that took this long was waiting for the disk: a pass that catches up
/// holds writes 1 to 3 ms when the disk keeps up, seconds when it does not.
const SLOW_HOLD: Duration = Duration::from_millis(50);
/// How long the writer gathers its groups after a slow held pass ([`SLOW_HOLD`]): under a load
/// the disk cannot keep up with, the next held pass comes within a WAL cycle (under a second at
/// 80 MB/s), so gathering goes on while it lasts, and ends soon after it.
const GATHER_FOR: Duration = Duration::from_secs(2);

/// A write waiting for the writer thread: runs inside the group's transaction and returns
/// whether it failed after changing something (then the group cannot commit), and what to do
/// once the group's end is known.
type Job = (Writer, Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>);
/// What a write is, for the debug log of slow groups: the type name of its closure, which names
/// the function that wrote it.
type Writer = &'static str;
/// Told `None` when the group committed, else why nothing of it was.
type Completion = Box<dyn FnOnce(Option<&str>) + Send>;

static NEXT_DB_ID: AtomicU64 = AtomicU64::new(1);

/// Called after a commit that wrote to the outbox ([`Db::on_outbox_commit`]).
type OutboxWake = Arc<dyn Fn() + Send + Sync>;

thread_local! {
    /// Set on the writer thread by a write of the group under way that inserted into the
    /// outbox ([`note_outbox_write`]); taken once the group ends.
    static OUTBOX_WRITTEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tells the writer that the write under way inserted into the outbox (unclaimed): once its group commits,
/// the callback of [`Db::on_outbox_commit`] runs.
pub(crate) fn note_outbox_write() {
    OUTBOX_WRITTEN.with(|written| written.set(true));
}

thread_local! {
    /// This thread's read connections, one per open database (keyed by [`Db::id`]).
    static READERS: RefCell<Vec<(u64, Arc<Mutex<Reader>>)>> = const { RefCell::new(Vec::new()) };
}

/// Where the WAL index's header's `mxFrame` (the frames committed to the WAL, native-endian `u32`) is.
const MX_FRAME: usize = 16;
/// Where the header's `isInit` (non-zero once the index is built) is: a file just started over
/// (zeros) is never taken for one all copied.
const IS_INIT: usize = 12;

/// A thread's read connection to one database.
///
/// Each read used to be a transaction of its own: taking and releasing a read mark of the WAL
/// index, two `fcntl` locks under a mutex that every connection of the process shares (the two HTTP
/// workers' reads met on it, and the one that waited slept: a seventh of a GET's time). Now, when
/// the WAL is all copied into the database file (so that a snapshot reads the file alone: SQLite's
/// read mark 0, which neither blocks the writer nor keeps the WAL from starting over; in the
/// instant a checkpoint or a recovery holds that mark, SQLite gives the snapshot another, which
/// keeps the WAL from starting over until the snapshot ends), a reader keeps its read transaction
/// open after the read, with the WAL index's header as it was just before the transaction began.
/// The next read on this thread reads the header again (where SQLite reads it, in the file's
/// shared mapping: [`WalIndex`], no system call, no lock) and uses the open
/// transaction only if the header is the same byte for byte: no commit of any connection, in this
/// process or another, came in between, so the snapshot is the latest (a read never sees less than
/// what was committed before it began). Otherwise it ends the transaction and reads as before. The
/// checkpointer (whose passes such a snapshot would keep from copying) ends every kept transaction
/// of its database before each pass (before holding writes for the last one) and every
/// [`CHECKPOINT_EVERY`] ([`Snapshots::end_all`]), and so does dropping the database. A read that
/// panics leaves the transaction kept with the header read before it began, checked like any other.
struct Reader {
    conn: Connection,
    /// The WAL index, read to tell whether anything was committed; `None` when it could not be
    /// opened (then every read is a transaction of its own).
    index: Option<&'static WalIndex>,
    /// The WAL index's headers read just before the kept transaction began; `None` when no
    /// transaction is kept open.
    kept: Option<[u8; WAL_INDEX_HEADERS]>,
    /// Rows read by key in a kept snapshot ([`Db::read_row`]).
    rows: KeptRows,
}

/// A row read by key ([`Db::read_row`]): a document's concurrency token, body and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyedRow {
    pub etag: String,
    pub body: String,
    /// Unix seconds; `None` = kept until deleted.
    pub expires_at: Option<i64>,
}

/// The key of a [`KeyedRow`]: container, partition, id.
pub(crate) type RowKey = (&'static str, String, String);

/// Most rows a reader keeps, and most bytes of their bodies: beyond either, it starts over.
const KEPT_ROWS: usize = 1024;
const KEPT_ROW_BYTES: usize = 1 << 20;

/// The rows a reader read by key in one kept snapshot, with the WAL index's headers of that
/// snapshot. While a later read finds the headers unchanged (nothing committed since, by any
/// connection of any process: [`Reader`]) and the snapshot still kept, the database is in the
/// same state byte for byte, so a row read then is the row a new read would give: it is answered
/// from here, without SQLite. Any other snapshot (other headers) finds none of them.
#[derive(Default)]
struct KeptRows {
    of: Option<[u8; WAL_INDEX_HEADERS]>,
    rows: std::collections::HashMap<RowKey, Option<KeyedRow>, foldhash::fast::RandomState>,
    bytes: usize,
}

impl KeptRows {
    fn get(&self, snapshot: &[u8; WAL_INDEX_HEADERS], key: &RowKey) -> Option<&Option<KeyedRow>> {
        if self.of.as_ref() != Some(snapshot) {
            return None;
        }
        self.rows.get(key)
    }

    fn put(&mut self, snapshot: [u8; WAL_INDEX_HEADERS], key: RowKey, row: Option<KeyedRow>) {
        let size = row.as_ref().map_or(0, |r| r.body.len() + r.etag.len()) + key.1.len() + key.2.len();
        if size > KEPT_ROW_BYTES {
            // Never kept, and no reason to drop the others.
            return;
        }
        if self.of != Some(snapshot) || self.rows.len() >= KEPT_ROWS || self.bytes + size > KEPT_ROW_BYTES {
            self.rows.clear();
            self.bytes = 0;
            self.of = Some(snapshot);
        }
        self.bytes += size;
        self.rows.insert(key, row);
    }
}

impl Reader {
    fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        configure_connection(&conn)?;
        // A first read maps the WAL index into this connection: from then on, as long as the
        // connection is open, no connection (of any process) removes the file or makes a new
        // one (SQLite does so only when closing the last connection to the database), so the
        // file opened here stays the one every commit updates.
        let _: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        // The file name SQLite resolved (symbolic links followed), as it names the WAL index.
        let index = conn.path().and_then(|db| WalIndex::open(&format!("{db}-shm")));
        Ok(Self { conn, index, kept: None, rows: KeptRows::default() })
    }

    /// The row of `key`, from the rows kept for the current snapshot or read by `f` (as
    /// [`Reader::read`] does), then kept if its snapshot is.
    fn read_row(
        &mut self,
        key: RowKey,
        f: impl FnOnce(&Connection, &RowKey) -> rusqlite::Result<Option<KeyedRow>>,
    ) -> rusqlite::Result<(RowKey, Option<KeyedRow>)> {
        if let (Some(index), Some(header)) = (self.index, &self.kept)
            && let Some(row) = self.rows.get(header, &key)
        {
            let mut now = [0u8; WAL_INDEX_READ];
            if index.read(&mut now) && now[..WAL_INDEX_HEADERS] == header[..] {
                return Ok((key, row.clone()));
            }
        }
        let row = self.read(|conn| f(conn, &key))?;
        // Kept after the read: its snapshot is the state of the headers kept (`read` checked them
        // before and, for a new snapshot, after the read too).
        if let Some(header) = self.kept {
            self.rows.put(header, key.clone(), row.clone());
        }
        Ok((key, row))
    }

    fn read<R>(&mut self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        let Self { conn, index, kept, .. } = self;
        if kept.is_none() && !conn.is_autocommit() {
            // Left open by an end that failed: never read in it.
            ended(conn, kept)?;
        }
        let Some(index) = index else { return f(conn) };
        let mut before = [0u8; WAL_INDEX_READ];
        let read = index.read(&mut before);
        if let Some(header) = kept {
            if read && before[..WAL_INDEX_HEADERS] == header[..] {
                let outcome = f(conn);
                if matches!(outcome, Err(rusqlite::Error::SqliteFailure(..))) {
                    end(conn, kept);
                }
                return outcome;
            }
            ended(conn, kept)?;
        }
        let (copy, other) = before[..WAL_INDEX_HEADERS].split_at(WAL_INDEX_HEADERS / 2);
        let word = |at: usize| u32::from_ne_bytes([before[at], before[at + 1], before[at + 2], before[at + 3]]);
        let all_copied = copy == other && before[IS_INIT] != 0 && word(MX_FRAME) == word(WAL_INDEX_HEADERS);
        if !read || !all_copied || conn.prepare_cached("BEGIN").and_then(|mut s| s.execute([])).is_err() {
            return f(conn);
        }
        // Kept from here, with the header read before it began, also if `f` panics: the next
        // read then checks the header as for any kept transaction.
        *kept = before[..WAL_INDEX_HEADERS].try_into().ok();
        let outcome = f(conn);
        let mut after = [0u8; WAL_INDEX_READ];
        // Unchanged from before the transaction began to after its read: the snapshot is of that
        // state, read from the database file alone (read mark 0). A commit in between would not
        // make a later read stale (the header differs from the one kept), but the snapshot would
        // hold a read mark that keeps the WAL from starting over until the next read ends it.
        if !(outcome.is_ok() && index.read(&mut after) && after[..WAL_INDEX_HEADERS] == before[..WAL_INDEX_HEADERS]) {
            end(conn, kept);
        }
        outcome
    }
}

/// Ends the read transaction `conn` keeps open, if any (a read transaction changed nothing: a
/// rollback, if the commit fails, ends it the same).
fn end(conn: &Connection, kept: &mut Option<[u8; WAL_INDEX_HEADERS]>) {
    *kept = None;
    if conn.is_autocommit() {
        return;
    }
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    if let Err(e) = run("COMMIT").or_else(|_| run("ROLLBACK")) {
        tracing::warn!(error = %e, "embedded database: cannot end a read transaction");
    }
}

/// Ends the read transaction `conn` keeps open, as [`end`] does, or fails if it stays open: a
/// read must not run in a snapshot it did not begin (it could be any age).
fn ended(conn: &Connection, kept: &mut Option<[u8; WAL_INDEX_HEADERS]>) -> rusqlite::Result<()> {
    end(conn, kept);
    if conn.is_autocommit() {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        Some("a read transaction left open cannot be ended".into()),
    ))
}

/// The read connections of one database, on whichever threads they are, so that the
/// checkpointer can end the read transactions they keep open ([`Reader`]).
#[derive(Default)]
struct Snapshots(Mutex<Vec<std::sync::Weak<Mutex<Reader>>>>);

impl Snapshots {
    fn add(&self, reader: &Arc<Mutex<Reader>>) {
        let mut readers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        readers.retain(|r| r.strong_count() > 0);
        readers.push(Arc::downgrade(reader));
    }

    /// Ends every read transaction kept open (waiting for a read under way on it).
    fn end_all(&self) {
        let readers: Vec<_> = self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(std::sync::Weak::upgrade).collect();
        for reader in readers {
            let mut reader = reader.lock().unwrap_or_else(PoisonError::into_inner);
            let Reader { conn, kept, .. } = &mut *reader;
            if kept.is_some() || !conn.is_autocommit() {
                end(conn, kept);
            }
        }
    }
}

/// The database: reads run at once on the calling thread (a point read from SQLite's page
/// cache takes microseconds, less than a hop to another thread), on a read-only connection of
/// that thread; WAL lets them run while the writer writes. Writes go to one writer thread that
/// commits whatever is queued in one transaction (group commit). A write that fails has
/// written nothing, as every write here checks before it changes: the writer counts the rows
/// each write changed, and a write that fails after changing some (a failure of the disk,
/// say) rolls back its whole group, every write of which is answered `Unavailable`. Writes that
/// may fail half-way by design (migrations: DDL changes no rows) use [`Db::write_in_savepoint`],
/// which rolls back alone. (A savepoint per write made SQLite copy every page each write
/// touched into its statement journal: a fifth of the writer's time.)
pub struct Db {
    id: u64,
    path: PathBuf,
    /// Shared by every caller as it is (a channel's sender is `Sync`): a lock around it made
    /// concurrent writers wait for each other, and sleep, just to queue.
    writes: mpsc::SyncSender<Job>,
    /// Writes sent and not yet taken by the writer thread (it counts them off a group at a time).
    queued: Arc<AtomicUsize>,
    /// Writes that may wait before a request's are refused ([`DbOptions::write_queue`]); a
    /// worker's may wait beyond that, in [`WORKER_ROOM`] more.
    capacity: usize,
    clock: Arc<dyn Clock>,
    /// Who reads the events written to the outbox, once told ([`Db::write_events_for`]).
    readers: std::sync::OnceLock<Arc<dyn EventReaders>>,
    /// The read connections, whose kept read transactions the checkpointer ends.
    snapshots: Arc<Snapshots>,
    /// Run by the writer after each commit that wrote to the outbox unclaimed, once told.
    outbox_wake: Arc<std::sync::OnceLock<OutboxWake>>,
    /// This process's relay, handed the events written claimed for it, once told.
    handoff: std::sync::OnceLock<Arc<OutboxHandoff>>,
    /// Dropped with the database: the checkpointer thread then ends.
    _checkpoints: mpsc::Sender<()>,
}

/// How often the checkpointer looks for commits to copy from the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A WAL of at least this many frames (4 KiB pages: 32 MiB) after a checkpoint is
/// checkpointed once more with this process's writes held, so that it starts over
/// ([`checkpoint_loop`]). Holding writes costs two `fsync`s (5 to 35 ms under a saturating load
/// on a 2-core machine, up to 64 ms on a slow disk, while the held pass's flush of the database
/// file wrote every page copied since the WAL last started over; 2 to 7 ms since that is flushed
/// before, on a disk where it had been 9 to 19 ms): at 1,024 frames that came every 100 ms and
/// halved the deliveries a second. A larger WAL makes the held pass rarer but not shorter: on a
/// slow disk each one waits behind the flush of more WAL, and with 16,384 frames (64 MiB) the
/// paced p99 of 10 endpoints was 28 ms (median of nine runs) against 18 at 8,192 and 17 at
/// 4,096, at the same rates; with 65,536, 140 to 160 ms. The service sets it from
/// `storage.wal_restart_mb`.
pub const WAL_RESTART_FRAMES: i64 = 8_192;

/// The size of a WAL frame, near enough (a page of the default size; each frame adds a
/// 24-byte header).
const FRAME_BYTES: i64 = 4096;

impl Drop for Db {
    fn drop(&mut self) {
        // The read connections outlive the database on their threads: none keeps a snapshot
        // that would hold back the checkpoints of the file's next opening.
        self.snapshots.end_all();
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What every connection to the file is set to, whatever it does (writer, readers,
/// checkpointer).
fn configure_connection(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    // No memory-mapped reads: a connection unmaps the whole file at its first read after any
    // commit (SQLite resets its view of the file then), so with writes going on all the time
    // mapping costs an munmap (with its TLB shootdown on the other cores) and page faults per
    // read. The page cache serves what did not change.
    conn.pragma_update(None, "mmap_size", 0)?;
    // Plans never look at bound values (the query planner stability guarantee). Otherwise a
    // statement whose plan could depend on a value (a bound `LIMIT`, a value compared with a
    // partial index's condition) is prepared again at every run, since every run binds anew:
    // that was a fifth of the cost of a page of a list, and of every take of the delivery queue.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// A read-write connection to the file; the writer's gathers each commit's WAL frames into one
/// write (`gather`: [`crate::gathered_wal`]).
fn open_for_writing(path: &Path, gather: bool) -> anyhow::Result<Connection> {
    let opened = match crate::gathered_wal::name().filter(|_| gather) {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs),
        None => Connection::open(path),
    };
    let conn = opened.map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
    configure_connection(&conn)?;
    Ok(conn)
}

/// The writer's settings of the file (WAL, durability, foreign keys).
fn configure_writer(conn: &Connection, restart_frames: i64) -> rusqlite::Result<()> {
    // WAL: readers never block the writer; NORMAL sync is durable against a crash of the
    // process (a committed transaction is in the WAL before the call returns).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoints run on a thread of their own, not in the commit of a group (where the copy
    // and its fsyncs would hold every waiting write).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A WAL file that grew past twice the size at which it is made to start over (a reader
    // holding an old snapshot for long can keep it from starting over meanwhile) is cut back to
    // that when it starts over; a steady load does not cut and grow it again each time.
    conn.pragma_update(None, "journal_size_limit", restart_frames.saturating_mul(2 * FRAME_BYTES))?;
    Ok(())
}

/// Writes that may wait for the writer thread before new ones are refused.
pub const WRITE_QUEUE: usize = 4096;

/// Room in the write queue beyond [`DbOptions::write_queue`] for the writes of background
/// workers ([`as_worker`]): when requests fill the queue, they are refused (`503`, to be tried
/// again), but a worker's write still gets in: the webhook fan-out of events already committed,
/// the release of events a relay could not publish, a delivery's outcome. Refused, such a write
/// leaves its work held until a claim ends (30 s) instead of pushing back on anyone. A worker's
/// write that finds even this room full waits for it ([`WORKER_WAIT`]).
pub const WORKER_ROOM: usize = 1024;

/// How long a background worker's write waits for room in a full queue before it is refused,
/// and how often it looks.
const WORKER_WAIT: Duration = Duration::from_secs(10);
const WORKER_POLL: Duration = Duration::from_millis(2);

tokio::task_local! {
    /// Set for the futures of background workers ([`as_worker`]).
    static WORKER: ();
}

/// Runs `work` as a background worker's: its writes to the embedded database are not refused
/// when requests have filled the write queue ([`WORKER_ROOM`]). Requests are refused there so
/// that their clients try again later; a worker refused would leave what it holds (events
/// claimed, a delivery leased) until its claim ends.
pub async fn as_worker<F: Future>(work: F) -> F::Output {
    WORKER.scope((), work).await
}

/// How the database runs.
#[derive(Debug, Clone, Copy)]
pub struct DbOptions {
    /// Writes that may wait for the writer thread before new ones are refused.
    pub write_queue: usize,
    /// The WAL's size, in frames, past which it is made to start over ([`WAL_RESTART_FRAMES`]).
    pub wal_restart_frames: i64,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self { write_queue: WRITE_QUEUE, wal_restart_frames: WAL_RESTART_FRAMES }
    }
}

impl DbOptions {
    /// These options with the WAL made to start over past `mib` MiB.
    #[must_use]
    pub fn with_wal_restart_mib(self, mib: u32) -> Self {
        Self { wal_restart_frames: i64::from(mib) * (1024 * 1024 / FRAME_BYTES), ..self }
    }
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

impl Db {
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        Self::open_with(path, clock, DbOptions::default())
    }

    /// Opens the database with room for `capacity` writes waiting for the writer: past that,
    /// writes are refused as [`DomainError::Unavailable`] (overload pushes back instead of
    /// growing memory).
    pub fn with_write_queue(path: &Path, clock: Arc<dyn Clock>, capacity: usize) -> anyhow::Result<Self> {
        Self::open_with(path, clock, DbOptions { write_queue: capacity, ..DbOptions::default() })
    }

    /// Opens the database with `options`.
    pub fn open_with(path: &Path, clock: Arc<dyn Clock>, options: DbOptions) -> anyhow::Result<Self> {
        let DbOptions { write_queue: capacity, wal_restart_frames } = options;
        let writer = open_for_writing(path, true)?;
        configure_writer(&writer, wal_restart_frames)?;
        let checkpointer = open_for_writing(path, false)?;
        let commits = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Gate::default());
        let (writes, jobs) = mpsc::sync_channel::<Job>(capacity + WORKER_ROOM);
        let queued = Arc::new(AtomicUsize::new(0));
        let (committed, writing, taken) = (commits.clone(), gate.clone(), queued.clone());
        let outbox_wake = Arc::new(std::sync::OnceLock::<OutboxWake>::new());
        let woken = outbox_wake.clone();
        std::thread::Builder::new()
            .name("im-sqlite-writer".into())
            .spawn(move || write_loop(writer, &jobs, &taken, &committed, &writing, &woken))?;
        let (checkpoints, stop) = mpsc::channel::<()>();
        let snapshots = Arc::new(Snapshots::default());
        let kept = snapshots.clone();
        std::thread::Builder::new().name("im-sqlite-ckpt".into()).spawn(move || {
            let file = checkpointer.path().and_then(crate::kept_open::open).map(|(_, file)| file);
            checkpoint_loop(&checkpointer, file, &commits, &gate, &kept, wal_restart_frames, &stop);
        })?;
        Ok(Self {
            id: NEXT_DB_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_owned(),
            writes,
            queued,
            capacity,
            clock,
            readers: std::sync::OnceLock::new(),
            snapshots,
            outbox_wake,
            handoff: std::sync::OnceLock::new(),
            _checkpoints: checkpoints,
        })
    }

    /// Writes events to the outbox only when `readers` may act on them: an event of a type
    /// that only the webhook fan-out reads is not written when its tenant has no webhook
    /// endpoint at the write (checked in the write's transaction). Until this is called (and
    /// with a broker, whose readers are unknown: never call it then), every event is written.
    /// Only the first call counts.
    pub fn write_events_for(&self, readers: Arc<dyn EventReaders>) {
        let _ = self.readers.set(readers);
    }

    /// Runs `wake` (on the writer thread: it must not block) after every commit that wrote an
    /// event to the outbox unclaimed, and after no other: an event this store skipped (nobody
    /// reads it, [`Db::write_events_for`]) or handed to the relay ([`Db::hand_off_events`])
    /// wakes nobody. Only the first call counts.
    pub fn on_outbox_commit(&self, wake: OutboxWake) {
        let _ = self.outbox_wake.set(wake);
    }

    /// Writes the events of later writes claimed for `handoff`'s relay (while it has room and
    /// is not paused) and hands them to it once they commit ([`crate::handoff`]). Only the first
    /// call counts.
    pub fn hand_off_events(&self, handoff: Arc<OutboxHandoff>) {
        let _ = self.handoff.set(handoff);
    }

    /// The relay events are handed to, if any.
    pub(crate) fn handoff(&self) -> Option<&Arc<OutboxHandoff>> {
        self.handoff.get()
    }

    /// Who reads the events written to the outbox; `None`: anyone may.
    pub(crate) fn event_readers(&self) -> Option<&Arc<dyn EventReaders>> {
        self.readers.get()
    }

    /// Current time in unix seconds, from the injected clock (TTL expiry uses it).
    pub fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Runs `f` on this thread's read connection to the database.
    pub async fn read<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, DomainError> {
        self.with_reader(|reader| reader.read(f))
    }

    /// The row of `key` (given back with it) as `f` reads it on this thread's read connection, as
    /// [`Db::read`] does; answered without SQLite when this thread read it in the same snapshot,
    /// nothing having been committed since ([`KeptRows`]). `f` must read the row of `key` and
    /// nothing else.
    pub(crate) async fn read_row(
        &self,
        key: RowKey,
        f: impl FnOnce(&Connection, &RowKey) -> rusqlite::Result<Option<KeyedRow>>,
    ) -> Result<(RowKey, Option<KeyedRow>), DomainError> {
        self.with_reader(|reader| reader.read_row(key, f))
    }

    fn with_reader<R>(&self, f: impl FnOnce(&mut Reader) -> rusqlite::Result<R>) -> Result<R, DomainError> {
        READERS.with(|cell| {
            let mut readers = cell.borrow_mut();
            let index = match readers.iter().position(|(id, _)| *id == self.id) {
                Some(index) => index,
                None => {
                    let reader = Arc::new(Mutex::new(Reader::open(&self.path).map_err(map_sqlite)?));
                    self.snapshots.add(&reader);
                    readers.push((self.id, reader));
                    readers.len() - 1
                }
            };
            let mut reader = readers[index].1.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut reader).map_err(map_sqlite)
        })
    }

    /// Runs `f` inside a transaction of the writer thread; its changes commit (with the other
    /// writes of its group) when it succeeds. `f` must change nothing when it fails: one that
    /// fails after changing rows has its group rolled back (every write of it answered
    /// `Unavailable`). Resolves after the commit.
    pub async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, DomainError> + Send + 'static,
    ) -> Result<R, DomainError> {
        self.submit(std::any::type_name_of_val(&f), move |tx| {
            let before = tx.total_changes();
            let outcome = f(tx);
            let half_written = outcome.is_err() && tx.total_changes() != before;
            (half_written, outcome)
        })
        .await
    }

    /// [`Db::write`] for a write that may fail after changing something (schema changes, which
    /// no row count shows): it runs in a savepoint of its own and rolls back alone.
    pub async fn write_in_savepoint<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, DomainError> + Send + 'static,
    ) -> Result<R, DomainError> {
        self.submit(std::any::type_name_of_val(&f), move |tx| match in_savepoint(tx, f) {
            // The rollback to the savepoint failed: what it wrote is still there.
            Err(Rollback(e)) => (true, Err(e)),
            Ok(outcome) => (false, outcome),
        })
        .await
    }

    async fn submit<R: Send + 'static>(
        &self,
        writer: Writer,
        run: impl FnOnce(&Connection) -> (bool, Result<R, DomainError>) + Send + 'static,
    ) -> Result<R, DomainError> {
        let (done, result) = oneshot::channel::<Result<R, DomainError>>();
        let job: Job = (
            writer,
            Box::new(move |tx| {
                let (half_written, outcome) = run(tx);
                crate::handoff::write_ended(outcome.is_ok());
                let complete: Completion = Box::new(move |group_error: Option<&str>| {
                    let _ = done.send(match (group_error, outcome) {
                        // A failed write keeps its own error: nothing of it is committed either way.
                        (Some(_), Err(e)) | (None, Err(e)) => Err(e),
                        (Some(e), Ok(_)) => Err(DomainError::unavailable(format!("embedded database: {e}"))),
                        (None, Ok(value)) => Ok(value),
                    });
                });
                (half_written, complete)
            }),
        );
        self.make_room().await?;
        self.writes.try_send(job).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                // Not expected: `make_room` counted a place for it.
                mpsc::TrySendError::Full(_) => too_many_waiting(),
                mpsc::TrySendError::Disconnected(_) => DomainError::Unexpected(anyhow::anyhow!("the embedded database writer has stopped")),
            }
        })?;
        // Unanswered: the writer could not begin a transaction (the database stayed busy past its
        // timeout, or failed); temporary as far as the caller can tell.
        result.await.map_err(|_| DomainError::Unavailable {
            reason: "the embedded database could not begin a write (busy past its timeout)".into(),
            retry_after: Some(Duration::from_secs(1)),
        })?
    }

    /// Writes queued and not yet taken by the writer thread (requests' and workers').
    #[must_use]
    pub fn queued_writes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts a place in the write queue for the caller's write: a request's fits below
    /// `capacity` or is refused; a background worker's ([`as_worker`]) fits below `capacity`
    /// plus [`WORKER_ROOM`], or waits for that (up to [`WORKER_WAIT`]).
    async fn make_room(&self) -> Result<(), DomainError> {
        let worker = WORKER.try_with(|()| ()).is_ok();
        let limit = if worker { self.capacity + WORKER_ROOM } else { self.capacity };
        let mut waited = Duration::ZERO;
        loop {
            if self.queued.fetch_add(1, Ordering::Relaxed) < limit {
                return Ok(());
            }
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if !worker || waited >= WORKER_WAIT {
                return Err(too_many_waiting());
            }
            tokio::time::sleep(WORKER_POLL).await;
            waited += WORKER_POLL;
        }
    }
}

fn too_many_waiting() -> DomainError {
    DomainError::Unavailable {
        reason: "the embedded database has too many writes waiting".into(),
        retry_after: Some(Duration::from_secs(1)),
    }
}

/// Runs one of the writer's transaction statements (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`,
/// and a write's savepoint) from the connection's statement cache: rusqlite's `Transaction`
/// prepares each anew (`execute_batch`), at every group.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// A savepoint that could not be rolled back to.
struct Rollback(DomainError);

fn in_savepoint<R>(tx: &Connection, f: impl FnOnce(&Connection) -> Result<R, DomainError>) -> Result<Result<R, DomainError>, Rollback> {
    let run = |sql: &str| run_cached(tx, sql).map_err(map_sqlite);
    run("SAVEPOINT write").map_err(Rollback)?;
    match f(tx) {
        Ok(value) => {
            run("RELEASE write").map_err(Rollback)?;
            Ok(Ok(value))
        }
        Err(e) => {
            // What the group kept of reads made after the write's changes would outlive them.
            crate::group_reads::changed(None);
            run("ROLLBACK TO write").map_err(Rollback)?;
            run("RELEASE write").map_err(Rollback)?;
            Ok(Err(e))
        }
    }
}

/// The writes of a group: `first`, those queued behind it and, until `gather_until` when it is
/// set (the disk is behind: [`GATHER_WAIT`]), those that come meanwhile, each within
/// [`GATHER_GAP`] of the one before; at most [`MAX_GROUP`].
fn take_group<T>(first: T, jobs: &mpsc::Receiver<T>, gather_until: Option<std::time::Instant>) -> Vec<T> {
    let mut group = vec![first];
    while group.len() < MAX_GROUP {
        let next = match gather_until {
            Some(until) => jobs.recv_timeout(until.saturating_duration_since(std::time::Instant::now()).min(GATHER_GAP)).ok(),
            None => jobs.try_recv().ok(),
        };
        match next {
            Some(job) => group.push(job),
            None => break,
        }
    }
    group
}

/// The writer thread: takes every queued write (up to [`MAX_GROUP`]), runs them in one
/// transaction, commits once, then answers each. Each transaction holds `gate` (the
/// checkpointer's held pass waits for it). Ends when the database is dropped.
fn write_loop(
    conn: Connection,
    jobs: &mpsc::Receiver<Job>,
    queued: &AtomicUsize,
    commits: &AtomicU64,
    gate: &Gate,
    outbox_wake: &std::sync::OnceLock<OutboxWake>,
) {
    while let Ok(first) = jobs.recv() {
        let group = take_group(first, jobs, gate.disk_behind().then(|| std::time::Instant::now() + GATHER_WAIT));
        queued.fetch_sub(group.len(), Ordering::Relaxed);
        let held = gate.for_write();
        let began = std::time::Instant::now();
        let timed = tracing::enabled!(target: "im_store_embedded::groups", tracing::Level::DEBUG);
        let sched = timed.then(Schedstat::of_this_thread).flatten();
        let mut slowest: (Writer, Duration) = ("", Duration::ZERO);
        let size = group.len();
        if let Err(e) = run_cached(&conn, "BEGIN IMMEDIATE") {
            let reason = e.to_string();
            tracing::error!(error = %reason, "embedded database: cannot begin a transaction");
            // Dropping the jobs unrun answers each waiting caller with an error.
            drop(group);
            continue;
        }
        let tx = &conn;
        let mut half_written = false;
        crate::group_reads::begin();
        let completions: Vec<Completion> = group
            .into_iter()
            .map(|(writer, job)| {
                let started = timed.then(std::time::Instant::now);
                let (failed_after_changes, complete) = job(tx);
                if let Some(took) = started.map(|s| s.elapsed())
                    && took > slowest.1
                {
                    slowest = (writer, took);
                }
                half_written |= failed_after_changes;
                complete
            })
            .collect();
        crate::group_reads::end();
        let commit_error = if half_written {
            let error = "a write of its group failed after changing rows; the group was rolled back".to_owned();
            // Run apart from the log line: its fields are evaluated only when it is logged.
            let rollback = run_cached(tx, "ROLLBACK").err();
            tracing::error!(rollback = ?rollback, "embedded database: {error}");
            Some(error)
        } else {
            run_cached(tx, "COMMIT").err().map(|e| format!("commit failed: {e}"))
        };
        // A commit or a rollback that failed may leave the transaction open: nothing of it is
        // kept, and the next group begins its own.
        if !tx.is_autocommit() {
            let _ = run_cached(tx, "ROLLBACK");
        }
        if let Some(e) = commit_error.as_deref().filter(|_| !half_written) {
            tracing::error!(error = %e, "embedded database: commit failed");
        }
        drop(held);
        let took = began.elapsed();
        if took > Duration::from_millis(5) {
            let (cpu_ms, runnable_ms) = Schedstat::since(sched);
            tracing::debug!(
                target: "im_store_embedded::groups",
                size,
                took_ms = took.as_secs_f64() * 1e3,
                cpu_ms,
                runnable_ms,
                slowest_write = slowest.0,
                slowest_write_ms = slowest.1.as_secs_f64() * 1e3,
                "embedded database: a slow group"
            );
        }
        commits.fetch_add(1, Ordering::Relaxed);
        crate::handoff::group_ended(commit_error.is_none());
        // Taken whatever the outcome: a group rolled back wrote nothing to wake anyone for.
        let wrote_events = OUTBOX_WRITTEN.with(std::cell::Cell::take);
        if commit_error.is_none()
            && wrote_events
            && let Some(wake) = outbox_wake.get()
        {
            wake();
        }
        for complete in completions {
            complete(commit_error.as_deref());
        }
    }
}

/// The checkpointer thread: every [`CHECKPOINT_EVERY`] that saw a commit, copies what the WAL
/// holds into the database file (`PASSIVE`: it waits for no reader and no writer). Ends when
/// the database is dropped.
///
/// SQLite starts the WAL over only when a write transaction begins with every frame of it
/// copied; under a steady stream of writes that never happens (each pass ends behind the
/// writes made meanwhile), and the WAL file grew by the whole volume written (100 MB/s when
/// delivering at saturation), never shrinking. So when a pass leaves at least
/// `restart_frames` ([`WAL_RESTART_FRAMES`]) in the WAL, the database file is flushed (`file`,
/// kept open for the process's life: [`crate::kept_open`]), more passes copy what was written
/// during the one before until that is a few frames ([`CatchUp`]: or until the writes outrun
/// the copying, or the WAL holds twice `restart_frames`), and a last pass runs with `gate`
/// held, so that no write of this process runs meanwhile: it copies only what the passes
/// before it left (its time, writes held, is its two `fsync`s and the pages it writes: with the
/// first pass alone before it, 6 to 10 ms at 4,000 deliveries a second, and the paced p99 of
/// `make bench` 13 ms instead of 9 to 10; SQLite flushes the database file only in the pass
/// that may let the WAL start over, so without the flush before, the held pass's flush wrote
/// every page copied since the last one: 9 to 19 ms held on a slow disk, 2 to 7 with it), and
/// the next write transaction starts the WAL over
/// (unless a reader still reads an old snapshot of it: then a later pass does). The file is
/// cut back to twice `restart_frames` when it starts over after having grown past that.
fn checkpoint_loop(
    conn: &Connection,
    file: Option<&File>,
    commits: &AtomicU64,
    gate: &Gate,
    snapshots: &Snapshots,
    restart_frames: i64,
    stop: &mpsc::Receiver<()>,
) {
    let mut seen = 0;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        // Each pass first ends the read transactions that readers keep open, whose snapshots
        // (read mark 0) would keep it from copying anything; this one also when this process
        // committed nothing (another process's checkpoints may wait for them).
        snapshots.end_all();
        let now = commits.load(Ordering::Relaxed);
        if now == seen {
            continue;
        }
        seen = now;
        let started = std::time::Instant::now();
        match checkpoint_pass(conn) {
            Ok(mut pass) if pass.log >= restart_frames => {
                // The database file's pages copied since it was last flushed (by every pass since
                // the WAL last started over: SQLite flushes the file only before it may start
                // over) are flushed now, writes not held; the held pass's own flush then waits
                // only for the few pages the passes after this one copy.
                flush(file);
                // Catch up without holding writes: each pass copies what was written during
                // the one before, until that is a few frames; the held pass then copies, and
                // flushes to the disk, only those (its time grows with the pages it writes).
                let mut catch_up = CatchUp::new(restart_frames);
                for _ in 0..CATCH_UP_PASSES {
                    snapshots.end_all();
                    match checkpoint_pass(conn) {
                        Ok(next) => {
                            let go_on = catch_up.go_on(pass, next);
                            pass = next;
                            if !go_on {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "embedded database: checkpoint failed");
                            break;
                        }
                    }
                }
                if pass.log < restart_frames {
                    // The WAL started over meanwhile (a write found it all copied).
                    continue;
                }
                let copied = started.elapsed();
                // Before holding writes (not while: ending a snapshot waits for a read under way
                // on its connection). A snapshot kept from here began with the WAL all copied;
                // if writes came before the hold, it keeps this pass from copying them, and a
                // later pass does.
                snapshots.end_all();
                let held = gate.for_checkpoint();
                let holding = std::time::Instant::now();
                let sched = tracing::enabled!(target: "im_store_embedded::checkpoints", tracing::Level::DEBUG)
                    .then(Schedstat::of_this_thread)
                    .flatten();
                let last = checkpoint_pass(conn);
                let writes_held = holding.elapsed();
                drop(held);
                gate.held_for(writes_held);
                match last {
                    Ok(last) => {
                        let (cpu_ms, runnable_ms) = Schedstat::since(sched);
                        tracing::debug!(
                            target: "im_store_embedded::checkpoints",
                            frames = pass.log,
                            behind = pass.behind(),
                            left = last.log,
                            first_passes_ms = copied.as_secs_f64() * 1e3,
                            writes_held_ms = writes_held.as_secs_f64() * 1e3,
                            cpu_ms,
                            runnable_ms,
                            "embedded database: checkpoint with writes held"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "embedded database: checkpoint failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "embedded database: checkpoint failed"),
        }
    }
}

/// This thread's time on a CPU and waiting for one (runnable, not running), from Linux's
/// `/proc/thread-self/schedstat`: the debug logs of slow writer groups and held checkpoint
/// passes tell from them whether a long one computed, waited for a core, or waited for the disk
/// (the rest). Read only when those logs are on.
#[derive(Debug, Clone, Copy)]
struct Schedstat {
    cpu_ns: u64,
    runnable_ns: u64,
}

impl Schedstat {
    fn of_this_thread() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
        Some(Self { cpu_ns: fields.next()?.ok()?, runnable_ns: fields.next()?.ok()? })
    }

    /// Milliseconds on a CPU and runnable since `before` (NaN when unknown; nothing is read
    /// without `before`, as when the logs are off).
    fn since(before: Option<Self>) -> (f64, f64) {
        match before.and_then(|before| Some((before, Self::of_this_thread()?))) {
            Some((before, now)) => {
                (now.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e6, now.runnable_ns.saturating_sub(before.runnable_ns) as f64 / 1e6)
            }
            None => (f64::NAN, f64::NAN),
        }
    }
}

/// What the writer holds around each transaction and the checkpointer around its held pass.
///
/// A plain mutex would let the writer, taking it again as soon as it lets it go under a
/// stream of writes, keep the checkpointer waiting for hundreds of milliseconds (measured:
/// thousands of frames written between the last pass without writes held and the held one).
/// So both first pass a turnstile: the checkpointer waits in it for the writer's transaction
/// to end, and the writer's next transaction waits for the held pass.
///
/// It also tells the writer when the disk is behind ([`Gate::disk_behind`]): a held pass that
/// took long ([`SLOW_HOLD`]) was waiting for the disk to take what the writes gave it.
#[derive(Debug, Default)]
struct Gate {
    turnstile: Mutex<()>,
    writes: Mutex<()>,
    /// Until when the writer gathers its groups: milliseconds after `since`; 0 = never.
    gather_until_ms: AtomicU64,
    since: Since,
}

/// The instant the gate was made, from which [`Gate::gather_until_ms`] counts.
#[derive(Debug)]
struct Since(std::time::Instant);

impl Default for Since {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Gate {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Told by the checkpointer how long its held pass held writes: one that took at least
    /// [`SLOW_HOLD`] makes the writer gather its groups for the next [`GATHER_FOR`].
    fn held_for(&self, held: Duration) {
        if held >= SLOW_HOLD {
            let until = self.now_ms().saturating_add(u64::try_from(GATHER_FOR.as_millis()).unwrap_or(u64::MAX));
            self.gather_until_ms.store(until, Ordering::Relaxed);
        }
    }

    /// Whether a held pass took long lately: the disk flushes less than the writes give it, so
    /// what each commit writes is what bounds the rate of writes.
    fn disk_behind(&self) -> bool {
        let until = self.gather_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    fn for_write(&self) -> MutexGuard<'_, ()> {
        let turn = self.turnstile.lock().unwrap_or_else(PoisonError::into_inner);
        let held = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        drop(turn);
        held
    }

    fn for_checkpoint(&self) -> (MutexGuard<'_, ()>, MutexGuard<'_, ()>) {
        let turn = self.turnstile.lock().unwrap_or_else(PoisonError::into_inner);
        let held = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        (turn, held)
    }
}

/// Passes without holding writes, at most, after the first and before the held one.
const CATCH_UP_PASSES: usize = 6;
/// Frames written during a pass that are few enough for the held pass.
const CATCH_UP_FRAMES: i64 = 32;

/// When the passes before the held one stop: once one leaves few new frames
/// ([`CATCH_UP_FRAMES`]: the held pass will be short); once one leaves no fewer new frames than
/// the pass before it (the writes outrun the copying: holding them sooner is shorter than
/// letting the WAL grow); or once the WAL holds twice `restart_frames` (the file stays
/// bounded however slow the disk's flushes are).
#[derive(Debug)]
struct CatchUp {
    restart_frames: i64,
    grown_before: i64,
}

impl CatchUp {
    fn new(restart_frames: i64) -> Self {
        Self { restart_frames, grown_before: i64::MAX }
    }

    /// Whether to make another pass without holding writes, after `next` followed `before`.
    fn go_on(&mut self, before: Pass, next: Pass) -> bool {
        let grown = next.log - before.log;
        let converging = grown < self.grown_before;
        self.grown_before = grown;
        // A WAL that started over (fewer frames than before) is for the caller to see.
        grown > CATCH_UP_FRAMES && converging && next.log < 2 * self.restart_frames
    }
}

/// What a checkpoint pass left: frames in the WAL, frames copied into the database file.
#[derive(Debug, Clone, Copy)]
struct Pass {
    log: i64,
    copied: i64,
}

impl Pass {
    fn behind(self) -> i64 {
        (self.log - self.copied).max(0)
    }
}

/// Flushes the database file's written pages to the disk (`fdatasync`), when it is open here.
fn flush(file: Option<&File>) {
    if let Some(Err(e)) = file.map(File::sync_data) {
        tracing::warn!(error = %e, "embedded database: flushing the database file failed");
    }
}

/// A `PASSIVE` checkpoint.
fn checkpoint_pass(conn: &Connection) -> rusqlite::Result<Pass> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok(Pass { log: r.get(1)?, copied: r.get(2)? }))
}

#[cfg(test)]
mod tests {
    use super::{CATCH_UP_FRAMES, CatchUp, Pass};

    /// A write rolled back to its savepoint leaves nothing the group kept of what it read after
    /// its changes (an endpoint it created and then found, here).
    #[test]
    fn a_write_rolled_back_to_its_savepoint_leaves_no_read_of_its_changes_kept() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        crate::migrations::apply(&tx).unwrap();
        let has = |tx: &rusqlite::Connection| crate::group_reads::has_webhooks("t", || crate::documents::has_webhooks(tx, "t"));
        crate::group_reads::begin();
        let outcome = super::in_savepoint(&tx, |tx| {
            crate::documents::insert(tx, crate::containers::WEBHOOKS, "t", "wh", "{}", None, None, 0, crate::documents::new_etag())?;
            assert!(has(tx)?, "its own endpoint, seen");
            Err::<(), _>(im_domain::DomainError::PreconditionFailed)
        });
        assert!(matches!(outcome, Ok(Err(im_domain::DomainError::PreconditionFailed))));
        assert!(!has(&tx).unwrap(), "rolled back: no endpoint");
        crate::group_reads::end();
    }

    fn pass(log: i64) -> Pass {
        Pass { log, copied: log }
    }

    #[test]
    fn a_slow_held_pass_makes_the_writer_gather_for_a_while() {
        let gate = super::Gate::default();
        assert!(!gate.disk_behind(), "not before any pass");
        gate.held_for(super::SLOW_HOLD - std::time::Duration::from_millis(1));
        assert!(!gate.disk_behind(), "a held pass shorter than SLOW_HOLD: the disk kept up");
        gate.held_for(super::SLOW_HOLD);
        assert!(gate.disk_behind());
        // Its end, GATHER_FOR later (less the milliseconds since).
        let left = gate.gather_until_ms.load(std::sync::atomic::Ordering::Relaxed) - gate.now_ms();
        let gather_for = u64::try_from(super::GATHER_FOR.as_millis()).unwrap();
        assert!(left <= gather_for && left + 500 > gather_for, "{left} ms left");
        gate.gather_until_ms.store(gate.now_ms(), std::sync::atomic::Ordering::Relaxed);
        assert!(!gate.disk_behind(), "over once GATHER_FOR passed");
    }

    #[test]
    fn a_group_takes_what_is_queued_and_waits_for_more_only_while_gathering() {
        let (send, jobs) = std::sync::mpsc::channel();
        send.send(2).unwrap();
        assert_eq!(super::take_group(1, &jobs, None), [1, 2], "what is queued, no wait");
        // Gathering ends once no write came for GATHER_GAP, long before its end.
        for n in 3..=5 {
            send.send(n).unwrap();
        }
        let late = send.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(super::GATHER_GAP * 2_500);
            late.send(6).unwrap();
        });
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let started = std::time::Instant::now();
        let group = super::take_group(1, &jobs, Some(until));
        let took = started.elapsed();
        sender.join().unwrap();
        assert_eq!(group, [1, 3, 4, 5], "not the write after the gap");
        assert!(took < super::GATHER_GAP * 2_500, "ended at the gap ({took:?}), not at its end");
        assert_eq!(super::take_group(0, &jobs, None), [0, 6]);
        // Not past its end, however many keep coming: a write every 20 us for 50 ms, gathered
        // for 2 ms, is about 100 writes, not MAX_GROUP (the cap were the end not kept).
        let (streamed, stream_jobs) = std::sync::mpsc::channel();
        let stream = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut n = 0;
            while started.elapsed() < std::time::Duration::from_millis(50) {
                n += 1;
                let _ = streamed.send(n);
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        });
        let first = stream_jobs.recv().unwrap();
        let group = super::take_group(first, &stream_jobs, Some(std::time::Instant::now() + std::time::Duration::from_millis(2)));
        stream.join().unwrap();
        assert!(group.len() < super::MAX_GROUP, "{}", group.len());
        send.send(4).unwrap();
        assert_eq!(super::take_group(1, &jobs, None), [1, 4]);
        // At most MAX_GROUP, even while gathering.
        for n in 0..super::MAX_GROUP + 5 {
            send.send(n).unwrap();
        }
        let group = super::take_group(0, &jobs, Some(std::time::Instant::now() + std::time::Duration::from_secs(60)));
        assert_eq!(group.len(), super::MAX_GROUP);
    }

    #[test]
    fn the_wal_restart_size_in_mib_counts_4_kib_frames() {
        // 32 MiB: the default of `storage.wal_restart_mb`, and the store's own.
        assert_eq!(super::DbOptions::default().with_wal_restart_mib(32).wal_restart_frames, super::WAL_RESTART_FRAMES);
        assert_eq!(super::DbOptions::default().with_wal_restart_mib(8).wal_restart_frames, 2_048);
    }

    #[test]
    fn catching_up_goes_on_while_each_pass_leaves_fewer_new_frames() {
        let mut catch_up = CatchUp::new(16_384);
        assert!(catch_up.go_on(pass(16_400), pass(17_000)), "600 new frames: another pass");
        assert!(catch_up.go_on(pass(17_000), pass(17_200)), "200, fewer than 600");
        assert!(!catch_up.go_on(pass(17_200), pass(17_200 + CATCH_UP_FRAMES)), "few enough to hold writes for");
    }

    #[test]
    fn catching_up_stops_when_the_writes_outrun_the_copying() {
        let mut catch_up = CatchUp::new(16_384);
        assert!(catch_up.go_on(pass(16_400), pass(17_000)));
        assert!(!catch_up.go_on(pass(17_000), pass(17_600)), "as many new frames as the pass before");
    }

    #[test]
    fn catching_up_stops_at_twice_the_restart_limit() {
        let mut catch_up = CatchUp::new(64);
        assert!(!catch_up.go_on(pass(100), pass(128)), "at 2 x 64 frames the WAL is held for");
        let mut catch_up = CatchUp::new(64);
        assert!(catch_up.go_on(pass(64), pass(127)));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn schedstat_counts_this_threads_time_on_a_cpu() {
        // Spinning, the thread is on a CPU or waiting for one all the time: the two add up to the
        // time spun (less what the kernel has not yet accounted: up to a tick).
        let before = super::Schedstat::of_this_thread();
        assert!(before.is_some(), "/proc/thread-self/schedstat is read");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let (cpu_ms, runnable_ms) = super::Schedstat::since(before);
        let spun_ms = spin.elapsed().as_secs_f64() * 1e3;
        assert!(cpu_ms > 0.0 && runnable_ms >= 0.0, "{cpu_ms} ms on a CPU, {runnable_ms} ms runnable");
        assert!(
            (spun_ms / 2.0..=spun_ms + 1.0).contains(&(cpu_ms + runnable_ms)),
            "{cpu_ms} ms on a CPU and {runnable_ms} ms runnable in {spun_ms} ms spinning"
        );
    }

    /// Whether this thread's reader of `db` keeps a read transaction open.
    fn keeps(db: &super::Db) -> Option<bool> {
        super::READERS.with(|readers| {
            let readers = readers.borrow();
            readers.iter().find(|(id, _)| *id == db.id).map(|(_, reader)| reader.lock().unwrap().kept.is_some())
        })
    }

    #[tokio::test]
    async fn a_reader_keeps_its_snapshot_only_while_the_wal_is_all_copied_and_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.db");
        let db = super::Db::open(&path, std::sync::Arc::new(im_domain::SystemClock)).unwrap();
        db.write(|tx| tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)").map_err(super::map_sqlite)).await.unwrap();
        let count = || db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)));
        let other = rusqlite::Connection::open(&path).unwrap();
        let checkpoint = || super::checkpoint_pass(&other).unwrap();

        assert_eq!(count().await.unwrap(), 0);
        assert_eq!(keeps(&db), Some(false), "the WAL holds frames not yet copied: a transaction per read");
        let mapped = super::READERS.with(|readers| {
            let readers = readers.borrow();
            readers.iter().any(|(id, reader)| *id == db.id && reader.lock().unwrap().index.is_some_and(super::WalIndex::mapped))
        });
        assert!(mapped, "the reader reads the WAL index in place, not with a system call a read");
        let pass = checkpoint();
        assert_eq!(pass.copied, pass.log, "nothing keeps the checkpoint from copying everything");
        assert_eq!(count().await.unwrap(), 0);
        assert_eq!(keeps(&db), Some(true), "all copied: the snapshot is kept");
        assert_eq!(count().await.unwrap(), 0);
        assert_eq!(keeps(&db), Some(true), "nothing committed since: still kept");

        other.execute("INSERT INTO t (k) VALUES (1)", []).unwrap();
        assert_eq!(count().await.unwrap(), 1, "a commit of another connection ends the kept snapshot");
        assert_eq!(keeps(&db), Some(false));

        checkpoint();
        assert_eq!(count().await.unwrap(), 1);
        assert_eq!(keeps(&db), Some(true));
        db.snapshots.end_all();
        assert_eq!(keeps(&db), Some(false), "the checkpointer ends it");
    }

    #[tokio::test]
    async fn a_read_that_panics_in_a_kept_transaction_leaves_no_stale_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.db");
        let db = std::sync::Arc::new(super::Db::open(&path, std::sync::Arc::new(im_domain::SystemClock)).unwrap());
        db.write(|tx| tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)").map_err(super::map_sqlite)).await.unwrap();
        let count = || db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)));
        let other = rusqlite::Connection::open(&path).unwrap();
        assert_eq!(count().await.unwrap(), 0);
        super::checkpoint_pass(&other).unwrap();

        // On this thread (a current-thread runtime): the WAL is all copied, so the read begins a
        // transaction to keep, and panics in it.
        let reading = db.clone();
        let read = tokio::spawn(async move {
            reading
                .read(|c| -> rusqlite::Result<()> {
                    let _: i64 = c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
                    panic!("a read that fails half-way")
                })
                .await
        });
        assert!(read.await.unwrap_err().is_panic());

        other.execute("INSERT INTO t (k) VALUES (1)", []).unwrap();
        assert_eq!(count().await.unwrap(), 1, "the commit made after the panic is seen");
        let pass = super::checkpoint_pass(&other).unwrap();
        assert_eq!(pass.copied, pass.log, "no snapshot left open holds back the checkpoint");
    }

    #[tokio::test]
    async fn a_read_never_runs_in_a_transaction_it_cannot_end() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.db");
        let db = super::Db::open(&path, std::sync::Arc::new(im_domain::SystemClock)).unwrap();
        db.write(|tx| tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2)").map_err(super::map_sqlite))
            .await
            .unwrap();

        // A transaction on the reader's connection with a statement under way (its rows never
        // dropped, so never reset: it goes back to the statement cache active), interrupted: its
        // COMMIT and its ROLLBACK both fail while that statement is active.
        db.read(|c| {
            c.execute_batch("BEGIN")?;
            let mut stmt = c.prepare_cached("SELECT k FROM t")?;
            let mut rows = stmt.query([])?;
            assert!(rows.next()?.is_some());
            std::mem::forget(rows);
            c.get_interrupt_handle().interrupt();
            Ok(())
        })
        .await
        .unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute("INSERT INTO t (k) VALUES (3)", []).unwrap();

        let ran = AtomicBool::new(false);
        let refused = db
            .read(|_| {
                ran.store(true, Ordering::Relaxed);
                Ok(())
            })
            .await;
        assert!(matches!(refused, Err(im_domain::DomainError::Unavailable { .. })), "{refused:?}");
        assert!(!ran.load(Ordering::Relaxed), "a read ran in the snapshot it could not end");

        // The active statement finalized: the transaction can be ended again.
        super::READERS.with(|readers| {
            let readers = readers.borrow();
            let (_, reader) = readers.iter().find(|(id, _)| *id == db.id).unwrap();
            reader.lock().unwrap().conn.flush_prepared_statement_cache();
        });
        let count = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))).await.unwrap();
        assert_eq!(count, 3, "once it can be ended, reads see the newest commit");
    }

    #[tokio::test]
    async fn a_row_read_by_key_is_read_again_only_once_something_was_committed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.db");
        let db = super::Db::open(&path, std::sync::Arc::new(im_domain::SystemClock)).unwrap();
        db.write(|tx| tx.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)").map_err(super::map_sqlite)).await.unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute("INSERT INTO t (k, v) VALUES ('a', 'one')", []).unwrap();
        let queries = AtomicUsize::new(0);
        let get = |k: &str| {
            let key = ("t", String::new(), k.to_owned());
            let (queries, db) = (&queries, &db);
            async move {
                let (_, row) = db
                    .read_row(key, |conn, (_, _, k)| {
                        queries.fetch_add(1, Ordering::SeqCst);
                        conn.query_row("SELECT v FROM t WHERE k = ?1", [k], |r| r.get::<_, String>(0))
                            .optional()
                            .map(|v| v.map(|v| super::KeyedRow { etag: String::new(), body: v, expires_at: None }))
                    })
                    .await
                    .unwrap();
                row.map(|r| r.body)
            }
        };
        use rusqlite::OptionalExtension;
        let queried = || queries.load(Ordering::SeqCst);

        assert_eq!(get("a").await.as_deref(), Some("one"));
        assert_eq!(get("a").await.as_deref(), Some("one"));
        assert_eq!(queried(), 2, "the WAL holds frames not yet copied (no kept snapshot): a query per read");

        super::checkpoint_pass(&other).unwrap();
        // The checkpointer thread ends kept snapshots every 100 ms (the rows stay: the next
        // snapshot has the same headers), so a try may read a row twice; one of a few does not.
        let mut read_once = false;
        for _ in 0..20 {
            let before = queried();
            assert_eq!(get("a").await.as_deref(), Some("one"));
            assert_eq!((get("a").await.as_deref(), get("b").await), (Some("one"), None));
            assert_eq!(get("b").await, None);
            if get("a").await.is_some() && queried() - before <= 2 {
                read_once = true;
                break;
            }
        }
        assert!(read_once, "in the kept snapshot, a row (or its absence) is read once");

        other.execute("UPDATE t SET v = 'two' WHERE k = 'a'", []).unwrap();
        let before = queried();
        assert_eq!(get("a").await.as_deref(), Some("two"), "a commit of another connection is seen at the next read");
        assert_eq!(queried(), before + 1);
        super::checkpoint_pass(&other).unwrap();
        assert_eq!(get("a").await.as_deref(), Some("two"));
        assert_eq!(get("b").await, None);
        other.execute("INSERT INTO t (k, v) VALUES ('b', 'three')", []).unwrap();
        assert_eq!(get("b").await.as_deref(), Some("three"), "an absence is not kept past a commit either");
        other.execute("DELETE FROM t WHERE k = 'a'", []).unwrap();
        assert_eq!(get("a").await, None);

        super::checkpoint_pass(&other).unwrap();
        assert_eq!(get("b").await.as_deref(), Some("three"));
        assert_eq!(get("a").await, None, "a row kept in an earlier snapshot is not taken for this one's");
        db.snapshots.end_all();
        assert_eq!(keeps(&db), Some(false), "the checkpointer ends the snapshot");
        let before = queried();
        assert_eq!(get("b").await.as_deref(), Some("three"));
        assert_eq!(queried(), before + 1, "a snapshot ended: the row is read again");
    }

    #[test]
    fn kept_rows_start_over_beyond_their_bounds_and_for_another_snapshot() {
        let row = |len: usize| Some(super::KeyedRow { etag: "e".into(), body: "x".repeat(len), expires_at: None });
        let key = |i: usize| ("c", "p".to_owned(), i.to_string());
        let (first, second) = ([1u8; super::WAL_INDEX_HEADERS], [2u8; super::WAL_INDEX_HEADERS]);
        let mut kept = super::KeptRows::default();
        for i in 0..super::KEPT_ROWS {
            kept.put(first, key(i), row(10));
        }
        assert!(kept.get(&first, &key(0)).is_some() && kept.get(&second, &key(0)).is_none(), "kept for its snapshot only");
        kept.put(first, key(super::KEPT_ROWS), row(10));
        assert_eq!(kept.rows.len(), 1, "one row too many: it starts over");
        kept.put(first, key(1), row(super::KEPT_ROW_BYTES));
        assert!(kept.get(&first, &key(1)).is_none(), "a row larger than the bound is not kept");
        assert!(kept.get(&first, &key(super::KEPT_ROWS)).is_some(), "and the others stay");
        kept.put(first, key(2), row(super::KEPT_ROW_BYTES / 2));
        kept.put(first, key(3), row(super::KEPT_ROW_BYTES / 2));
        assert!(kept.get(&first, &key(2)).is_none() && kept.get(&first, &key(3)).is_some(), "too many bytes: it starts over");
        kept.put(second, key(4), row(1));
        assert!(kept.get(&first, &key(3)).is_none() && kept.get(&second, &key(4)).is_some(), "another snapshot: it starts over");
        assert_eq!(kept.rows.len(), 1);
    }

    #[test]
    fn a_wal_that_started_over_ends_the_catching_up() {
        let mut catch_up = CatchUp::new(64);
        assert!(!catch_up.go_on(pass(100), pass(3)));
    }
}
