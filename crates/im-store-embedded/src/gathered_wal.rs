//! The writer's WAL writes, gathered: one `pwrite` a commit instead of two a page.
//!
//! SQLite appends each page of a commit to the WAL with two writes, the frame's 24-byte header
//! and then the page, each a system call, and each touching the file's cache pages (a frame of a
//! 4 KiB page spans two). Delivering to ten endpoints with RabbitMQ at a steady 4,000 attempts a
//! second, that was 7.7 `pwrite`s an attempt, the most frequent system call of the writer; at
//! ten endpoints' saturation (embedded), 8,741 in 2 s, 519 with this VFS. This VFS is the default one (`unix`) with the
//! WAL's writes gathered in memory while a commit's frames are written, then written with one
//! call when its last frame (the one that carries the commit mark) is complete: before the
//! commit returns and before SQLite makes it visible to readers (it publishes a commit by
//! rewriting the WAL index's header after the frames are written). So what is on disk (in the
//! file, as far as the operating system is concerned) when a commit returns is what it was:
//! durability and what a crash leaves are unchanged, and a failed write fails the commit.
//!
//! Rules, for the WAL file of a connection opened with this VFS:
//! - a write that continues the gathered bytes is added to them; any other write first writes
//!   them out;
//! - when the page of a commit frame is added (a frame header's "database size" field, bytes 4
//!   to 8, is not zero only in a commit's last frame), the gathered bytes are written out, and
//!   further writes go straight through until the commit is published (SQLite then calls the
//!   database file's memory barrier, `xShmBarrier`): the frame headers that SQLite rewrites
//!   after its last frame (checksums of frames overwritten in the same transaction) are not held;
//! - every other operation on the WAL file (read, size, truncate, sync, file control, close)
//!   first writes out what was gathered (frames a transaction spilled before its commit, when
//!   it outgrew the page cache), and so does the database file's barrier;
//! - bytes that could not be written fail every later write to the WAL until the write
//!   transaction ends (so it cannot commit: its earlier frames are not all in the file), and an
//!   operation other than a write that had to write them out reports an I/O error (which makes
//!   SQLite roll back the whole transaction, where a full disk could roll back one statement);
//! - when the write transaction ends (SQLite releases the WAL's write lock), what is still
//!   gathered, a rolled-back transaction's spilled frames, is dropped: never read, and written
//!   out later it would overwrite what another connection committed meanwhile;
//! - at most [`GATHERED_MAX`] bytes are written with one call.
//!
//! Nothing is gathered when a commit is published, but for a bug: the barrier writes out what
//! would be, and if that fails, where SQLite takes no error, it ends the process before the
//! commit could be published (what a crash leaves: the commit was not answered, and recovery
//! keeps complete commits only).
//!
//! Only the writer's connection uses it ([`crate::db`]); readers and the checkpointer use the
//! default VFS. This module holds `unsafe` code: a VFS is a table of C callbacks.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The VFS's registered name.
pub(crate) const NAME: &CStr = c"im-gathered-wal";

/// The most bytes gathered before they are written out (a commit of more frames is written in
/// several calls): the default VFS writes at most 128 KiB - 1 bytes a call (it masks the length
/// with `0x1ffff`; a longer write would be cut short, and fail as a full disk).
const GATHERED_MAX: usize = 120 * 1024;

/// A WAL frame header's size.
const FRAME_HEADER: usize = 24;

/// The VFS this one wraps (SQLite's default), once registered.
struct Registered {
    inner: *mut ffi::sqlite3_vfs,
}

// SAFETY: the pointer is to SQLite's default VFS object, which lives (unchanged) as long as the
// process; SQLite calls its methods from any thread.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Option<Registered>> = OnceLock::new();

/// Registers the VFS (once a process); its name, or `None` when SQLite has no default VFS to
/// wrap (then connections use the default VFS itself).
pub(crate) fn name() -> Option<&'static CStr> {
    REGISTERED.get_or_init(register).as_ref().map(|_| NAME)
}

fn register() -> Option<Registered> {
    // SAFETY: `sqlite3_vfs_find` initializes SQLite and returns the default VFS (or null); the
    // copy made of it is leaked, so it lives as long as SQLite may use it.
    unsafe {
        let inner = ffi::sqlite3_vfs_find(ptr::null());
        if inner.is_null() {
            return None;
        }
        let inner_size = usize::try_from((*inner).szOsFile).ok()?;
        let mut vfs: ffi::sqlite3_vfs = *inner;
        vfs.pNext = ptr::null_mut();
        vfs.zName = NAME.as_ptr();
        vfs.szOsFile = c_int::try_from(INNER_OFFSET + inner_size).ok()?;
        vfs.xOpen = Some(open);
        let vfs = Box::leak(Box::new(vfs));
        if ffi::sqlite3_vfs_register(vfs, 0) != ffi::SQLITE_OK {
            return None;
        }
        Some(Registered { inner })
    }
}

/// What a file being opened through this VFS is to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    MainDb,
    Wal,
    Other,
}

/// A WAL file's gathered writes.
#[derive(Default)]
struct Gathered {
    /// The file offset of `bytes[0]`.
    start: i64,
    bytes: Vec<u8>,
    /// The last write added was a commit frame's header: the next (its page) completes it.
    commit_header: bool,
    /// A commit's frames were written out and it is not published yet: writes go straight through.
    through: bool,
    /// Gathered bytes could not be written: until the write transaction ends, every WAL write
    /// fails, so the transaction cannot commit (its earlier frames are not all in the file).
    failed: bool,
    #[cfg(test)]
    stats: Stats,
}

/// What a WAL file's writes did (for tests).
#[cfg(test)]
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Stats {
    /// Calls made to the default VFS's write.
    pub(crate) writes: u64,
    /// The most bytes written with one call.
    pub(crate) largest: usize,
    /// Barriers that found bytes still gathered (a commit's frames are written out before its
    /// publication: never, but for a bug).
    pub(crate) late: u64,
    /// Write transactions that ended with bytes still gathered (a rolled-back spill's), which
    /// were dropped.
    pub(crate) dropped: u64,
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's writes to WAL files fail (for tests).
    static FAIL_WRITES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The file object SQLite allocates (`szOsFile` bytes): this, then the default VFS's own file.
#[repr(C)]
struct Wrapped {
    /// What SQLite sees: `pMethods` is [`METHODS`].
    base: ffi::sqlite3_file,
    /// The default VFS's file, at [`INNER_OFFSET`] in the same allocation.
    inner: *mut ffi::sqlite3_file,
    /// A main database file: its WAL's object while that is open.
    wal: *mut Wrapped,
    /// A WAL file: its main database file's object.
    db: *mut Wrapped,
    /// A WAL file's gathered writes (`None` for any other file).
    gathered: Option<Box<Gathered>>,
}

/// Where the default VFS's file starts in the allocation (aligned for any of its fields).
const INNER_OFFSET: usize = size_of::<Wrapped>().next_multiple_of(16);

/// SQLite's WAL write lock: the first of the WAL index's locks.
const WAL_WRITE_LOCK: c_int = 0;

impl Wrapped {
    /// The default VFS's methods of this file.
    fn methods(&self) -> &'static ffi::sqlite3_io_methods {
        // SAFETY: set by the default VFS's open, which succeeded (else this object has no
        // methods and SQLite calls none), and static in it.
        unsafe { &*(*self.inner).pMethods }
    }

    /// The default VFS's write of `data` at `offset`.
    fn write_through(&mut self, data: &[u8], offset: i64) -> c_int {
        let Ok(amount) = c_int::try_from(data.len()) else { return ffi::SQLITE_IOERR_WRITE };
        let Some(write) = self.methods().xWrite else { return ffi::SQLITE_IOERR_WRITE };
        #[cfg(test)]
        if let Some(gathered) = self.gathered.as_deref_mut() {
            gathered.stats.writes += 1;
            gathered.stats.largest = gathered.stats.largest.max(data.len());
            if FAIL_WRITES.get() {
                // What the default VFS answers for a full disk.
                return ffi::SQLITE_FULL;
            }
        }
        // SAFETY: the default VFS's write of its own open file, with `data`.
        unsafe { write(self.inner, data.as_ptr().cast(), amount, offset) }
    }

    /// Writes the gathered bytes out; SQLite's result code. A failure is kept (`failed`).
    fn write_out(&mut self) -> c_int {
        let Some(gathered) = self.gathered.as_deref_mut() else { return ffi::SQLITE_OK };
        gathered.commit_header = false;
        if gathered.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let (bytes, start) = (std::mem::take(&mut gathered.bytes), gathered.start);
        let rc = self.write_through(&bytes, start);
        if let Some(gathered) = self.gathered.as_deref_mut() {
            // Its buffer kept for the next commit.
            gathered.bytes = bytes;
            gathered.bytes.clear();
            gathered.failed |= rc != ffi::SQLITE_OK;
        }
        rc
    }

    /// Writes out what was gathered before another operation on a WAL file; a failure is
    /// reported as an I/O error (which makes SQLite roll back the whole transaction, where a
    /// full disk may roll back only a statement, whose earlier frames were not written either).
    fn write_out_before(&mut self) -> c_int {
        match self.write_out() {
            ffi::SQLITE_OK => ffi::SQLITE_OK,
            _ => ffi::SQLITE_IOERR_WRITE,
        }
    }

    /// A WAL write: gathered or written (see the module's rules).
    fn write(&mut self, data: &[u8], offset: i64) -> c_int {
        let Some(gathered) = self.gathered.as_deref() else { return ffi::SQLITE_IOERR_WRITE };
        if gathered.failed {
            return ffi::SQLITE_IOERR_WRITE;
        }
        let follows = gathered.start + gathered.bytes.len() as i64 == offset;
        // Whether this is the page of a commit frame whose header was just gathered.
        let completes_commit = gathered.commit_header && follows && data.len() != FRAME_HEADER;
        let through = gathered.through || data.len() > GATHERED_MAX;
        if through || !follows || gathered.bytes.len() + data.len() > GATHERED_MAX {
            let rc = self.write_out();
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if through {
            return self.write_through(data, offset);
        }
        let Some(gathered) = self.gathered.as_deref_mut() else { return ffi::SQLITE_IOERR_WRITE };
        if gathered.bytes.is_empty() {
            gathered.start = offset;
        }
        gathered.bytes.extend_from_slice(data);
        if data.len() == FRAME_HEADER {
            gathered.commit_header = data[4..8] != [0, 0, 0, 0];
            return ffi::SQLITE_OK;
        }
        gathered.commit_header = false;
        if !completes_commit {
            return ffi::SQLITE_OK;
        }
        let rc = self.write_out();
        if let Some(gathered) = self.gathered.as_deref_mut() {
            gathered.through = true;
        }
        rc
    }

    /// The database file's WAL object, when it is linked.
    fn linked_wal(&mut self) -> Option<&mut Wrapped> {
        // SAFETY: a linked WAL object is open (its close unlinks it) and used by the same
        // connection as this file, so from this thread, and is a different object.
        (!self.wal.is_null()).then(|| unsafe { &mut *self.wal })
    }
}

/// The object of `file`.
///
/// # Safety
/// `file` is a file SQLite opened through this VFS (its methods are [`METHODS`]) and no other
/// reference to it is live (SQLite calls a file's methods from one thread at a time).
unsafe fn wrapped<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Wrapped {
    // SAFETY: the caller's.
    unsafe { &mut *file.cast::<Wrapped>() }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        Kind::MainDb
    } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
        Kind::Wal
    } else {
        Kind::Other
    };
    // SAFETY: SQLite allocated `szOsFile` bytes at `file`, for this object then the default
    // VFS's file; this object is initialized here before any method can be called, the default
    // VFS's file by its open.
    unsafe {
        ptr::write(
            file.cast::<Wrapped>(),
            Wrapped {
                base: ffi::sqlite3_file { pMethods: ptr::null() },
                inner: file.cast::<u8>().add(INNER_OFFSET).cast(),
                wal: ptr::null_mut(),
                db: ptr::null_mut(),
                gathered: (kind == Kind::Wal).then(Box::default),
            },
        );
        let this = wrapped(file);
        let Some(registered) = REGISTERED.get().and_then(Option::as_ref) else { return ffi::SQLITE_CANTOPEN };
        let Some(inner_open) = (*registered.inner).xOpen else { return ffi::SQLITE_CANTOPEN };
        let rc = inner_open(registered.inner, name, this.inner, flags, out_flags);
        let methods = (*this.inner).pMethods;
        if methods.is_null() {
            // Nothing to close: SQLite calls no method of a file without methods.
            this.gathered = None;
            return rc;
        }
        if kind == Kind::MainDb && ((*methods).iVersion < 3 || (*methods).xShmMap.is_none()) {
            // A database file without shared memory (for WAL) or memory mapping: not wrapped by
            // this table, which says it has both (SQLite asks a database file only; the default
            // Unix VFS opens every other file without locks or shared memory).
            if let Some(close) = (*methods).xClose {
                close(this.inner);
            }
            this.gathered = None;
            return ffi::SQLITE_CANTOPEN;
        }
        this.base.pMethods = &METHODS;
        if kind == Kind::Wal && !name.is_null() {
            let db = ffi::sqlite3_database_file_object(name.cast::<c_char>());
            if !db.is_null() && ptr::eq((*db).pMethods, &METHODS) {
                let db = db.cast::<Wrapped>();
                (*db).wal = this;
                this.db = db;
            }
        }
        rc
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Calls the default VFS's method `$m` of the file, with `$args` after the file (an error when
/// it has none), after writing out what was gathered when `$flush` (an error there is returned).
macro_rules! forward {
    ($file:expr, $m:ident, $flush:expr $(, $arg:expr)*) => {{
        // SAFETY: called by SQLite for a file opened through this VFS.
        let this = unsafe { wrapped($file) };
        let rc = if $flush { this.write_out_before() } else { ffi::SQLITE_OK };
        if rc != ffi::SQLITE_OK {
            rc
        } else {
            // SAFETY: the default VFS's method of its own open file, with SQLite's arguments.
            this.methods().$m.map_or(ffi::SQLITE_IOERR, |m| unsafe { m(this.inner $(, $arg)*) })
        }
    }};
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: called by SQLite for a file opened through this VFS, which it closes.
    let this = unsafe { wrapped(file) };
    let written = this.write_out_before();
    // SAFETY: the default VFS's close of its own open file.
    let rc = this.methods().xClose.map_or(ffi::SQLITE_OK, |m| unsafe { m(this.inner) });
    // SAFETY: a linked database file is open while its WAL is (SQLite closes the WAL first), and
    // the other way round.
    unsafe {
        if !this.db.is_null() {
            (*this.db).wal = ptr::null_mut();
        }
        if !this.wal.is_null() {
            (*this.wal).db = ptr::null_mut();
        }
    }
    this.gathered = None;
    this.base.pMethods = ptr::null();
    if written != ffi::SQLITE_OK { written } else { rc }
}

unsafe extern "C" fn read(file: *mut ffi::sqlite3_file, buf: *mut c_void, amount: c_int, offset: i64) -> c_int {
    forward!(file, xRead, true, buf, amount, offset)
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, buf: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: called by SQLite for a file opened through this VFS.
    let this = unsafe { wrapped(file) };
    if this.gathered.is_none() || buf.is_null() || amount < 0 {
        // SAFETY: the default VFS's write of its own open file, with SQLite's arguments.
        return this.methods().xWrite.map_or(ffi::SQLITE_IOERR_WRITE, |m| unsafe { m(this.inner, buf, amount, offset) });
    }
    // SAFETY: SQLite passes `amount` readable bytes at `buf`.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), amount as usize) };
    this.write(data, offset)
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    forward!(file, xTruncate, true, size)
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    forward!(file, xSync, true, flags)
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    forward!(file, xFileSize, true, size)
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xLock, false, level)
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xUnlock, false, level)
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(file, xCheckReservedLock, false, out)
}

unsafe extern "C" fn file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    forward!(file, xFileControl, true, op, arg)
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xSectorSize, false)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xDeviceCharacteristics, false)
}

unsafe extern "C" fn shm_map(file: *mut ffi::sqlite3_file, page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int {
    forward!(file, xShmMap, false, page, size, extend, out)
}

unsafe extern "C" fn shm_lock(file: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    // SAFETY: called by SQLite for a file opened through this VFS.
    let this = unsafe { wrapped(file) };
    if flags & ffi::SQLITE_SHM_UNLOCK != 0
        && offset == WAL_WRITE_LOCK
        && n >= 1
        && let Some(gathered) = this.linked_wal().and_then(|wal| wal.gathered.as_deref_mut())
    {
        // The write transaction ends: what is still gathered is a rolled-back transaction's
        // (a commit's frames are written out before it is published), which is never read and
        // which the next transaction (of any connection) writes over. Written out later, it
        // would overwrite what another connection committed meanwhile.
        #[cfg(test)]
        if !gathered.bytes.is_empty() {
            gathered.stats.dropped += 1;
        }
        gathered.bytes.clear();
        gathered.commit_header = false;
        gathered.through = false;
        gathered.failed = false;
    }
    // SAFETY: the default VFS's method of its own open file, with SQLite's arguments.
    this.methods().xShmLock.map_or(ffi::SQLITE_IOERR, |m| unsafe { m(this.inner, offset, n, flags) })
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: called by SQLite for a file opened through this VFS.
    let this = unsafe { wrapped(file) };
    if let Some(wal) = this.linked_wal() {
        #[cfg(test)]
        if let Some(gathered) = wal.gathered.as_deref_mut()
            && !gathered.bytes.is_empty()
        {
            gathered.stats.late += 1;
        }
        // Nothing is gathered here unless the rules above missed a commit's last frame: SQLite
        // calls the barrier when it publishes a commit, and takes no error from it.
        if wal.write_out() != ffi::SQLITE_OK {
            // Ending the process before SQLite publishes frames that could not be written leaves
            // what a crash leaves: the commit was not answered, and recovery keeps only
            // complete commits.
            tracing::error!("could not write the WAL's gathered frames before a commit's publication; stopping");
            std::process::abort();
        }
        if let Some(gathered) = wal.gathered.as_deref_mut() {
            gathered.through = false;
        }
    }
    if let Some(m) = this.methods().xShmBarrier {
        // SAFETY: the default VFS's barrier of its own open file.
        unsafe { m(this.inner) }
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    forward!(file, xShmUnmap, false, delete)
}

unsafe extern "C" fn fetch(file: *mut ffi::sqlite3_file, offset: i64, amount: c_int, out: *mut *mut c_void) -> c_int {
    forward!(file, xFetch, true, offset, amount, out)
}

unsafe extern "C" fn unfetch(file: *mut ffi::sqlite3_file, offset: i64, page: *mut c_void) -> c_int {
    forward!(file, xUnfetch, false, offset, page)
}

/// What the writes to the WAL of `conn` (opened through this VFS) did.
#[cfg(test)]
pub(crate) fn stats(conn: &rusqlite::Connection) -> Stats {
    let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: the file control returns the connection's main database file object, which this
    // VFS opened; its WAL's object is linked while open; the connection is not in use meanwhile.
    unsafe {
        let rc =
            ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), ffi::SQLITE_FCNTL_FILE_POINTER, ptr::from_mut(&mut file).cast());
        assert_eq!(rc, ffi::SQLITE_OK);
        assert!(ptr::eq((*file).pMethods, &METHODS), "the connection was not opened through the gathering VFS");
        let db = wrapped(file);
        let wal = db.linked_wal().expect("the connection has its WAL open");
        wal.gathered.as_ref().map(|g| g.stats).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    fn open(path: &std::path::Path) -> Connection {
        let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), name().expect("registered")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
        conn
    }

    fn reader(path: &std::path::Path) -> Connection {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
    }

    fn rows(conn: &Connection) -> Vec<(i64, Vec<u8>)> {
        let mut statement = conn.prepare("SELECT id, body FROM t ORDER BY id").unwrap();
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    }

    /// The rows of `conn` are `expected` (compared without printing the bodies).
    fn assert_rows(conn: &Connection, expected: &[(i64, Vec<u8>)]) {
        let rows = rows(conn);
        let ids = |rows: &[(i64, Vec<u8>)]| rows.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(ids(&rows), ids(expected));
        for ((id, got), (_, want)) in rows.iter().zip(expected) {
            assert!(got == want, "row {id} is not as written");
        }
    }

    fn checked(conn: &Connection) {
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    fn body(id: i64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as i64 * 31 + id * 7) as u8).collect()
    }

    fn insert(conn: &Connection, ids: std::ops::Range<i64>, len: usize) -> rusqlite::Result<()> {
        for id in ids {
            conn.execute("INSERT OR REPLACE INTO t (id, body) VALUES (?1, ?2)", (id, body(id, len)))?;
        }
        Ok(())
    }

    #[test]
    fn a_commit_writes_its_frames_with_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        for round in 0..20 {
            let before = stats(&conn).writes;
            let tx = conn.unchecked_transaction().unwrap();
            // About ten pages a commit.
            insert(&tx, round * 10..round * 10 + 10, 3000).unwrap();
            tx.commit().unwrap();
            assert_eq!(stats(&conn).writes - before, 1, "commit {round}");
        }
        // Another connection, on the default VFS, reads every commit.
        let expected: Vec<_> = (0..200).map(|id| (id, body(id, 3000))).collect();
        assert_rows(&reader(&path), &expected);
        checked(&reader(&path));
        assert_eq!(stats(&conn).late, 0);
    }

    #[test]
    fn commits_of_any_size_are_written_before_they_are_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        let mut next = 0;
        // 1 to 70 pages a commit (a row a page): the commit frame falls at every place of the
        // gathered bytes, and past what is written with one call.
        for pages in 1..=70 {
            let before = stats(&conn).writes;
            let tx = conn.unchecked_transaction().unwrap();
            insert(&tx, next..next + pages, 3900).unwrap();
            tx.commit().unwrap();
            next += pages;
            let after = stats(&conn);
            assert_eq!(after.late, 0, "a commit of {pages} pages was published with frames not written");
            if pages >= 40 {
                assert!(after.writes - before >= 2, "a commit of {pages} pages written with one call");
            }
            assert_eq!(reader(&path).query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), next);
        }
        let stats = stats(&conn);
        assert!(stats.largest <= GATHERED_MAX, "{} bytes written with one call", stats.largest);
        let expected: Vec<_> = (0..next).map(|id| (id, body(id, 3900))).collect();
        assert_rows(&reader(&path), &expected);
        checked(&reader(&path));
    }

    #[test]
    fn every_commit_is_visible_to_another_connection_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        let reader = reader(&path);
        for id in 0..100 {
            insert(&conn, id..id + 1, 100 + id as usize * 50).unwrap();
            let seen: i64 = reader.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
            assert_eq!(seen, id + 1);
            let last: Vec<u8> = reader.query_row("SELECT body FROM t WHERE id = ?1", [id], |r| r.get(0)).unwrap();
            assert_eq!(last, body(id, 100 + id as usize * 50));
        }
    }

    #[test]
    fn a_transaction_larger_than_the_cache_rolls_back_and_commits_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        // A tiny cache: a transaction's pages spill into the WAL before its commit, and its
        // commit overwrites frames it wrote (SQLite then rewrites their checksums).
        conn.pragma_update(None, "cache_size", 10).unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        insert(&tx, 0..300, 2000).unwrap();
        tx.rollback().unwrap();
        assert!(rows(&conn).is_empty());
        let tx = conn.unchecked_transaction().unwrap();
        insert(&tx, 0..300, 2000).unwrap();
        for id in (0..300).step_by(3) {
            tx.execute("UPDATE t SET body = ?2 WHERE id = ?1", (id, body(id + 1, 2500))).unwrap();
        }
        tx.commit().unwrap();
        let expected: Vec<_> = (0..300).map(|id| (id, if id % 3 == 0 { body(id + 1, 2500) } else { body(id, 2000) })).collect();
        assert_rows(&reader(&path), &expected);
        let stats = stats(&conn);
        assert!(stats.largest <= GATHERED_MAX, "{} bytes written with one call", stats.largest);
        assert_eq!(stats.late, 0);
        // What the WAL holds is what a process that opens the database afresh recovers.
        let copy = dir.path().join("copy");
        for suffix in ["", "-wal"] {
            std::fs::copy(format!("{}{suffix}", path.display()), format!("{}{suffix}", copy.display())).unwrap();
        }
        let recovered = Connection::open(&copy).unwrap();
        assert_rows(&recovered, &expected);
        checked(&recovered);
    }

    #[test]
    fn a_rolled_back_spill_is_dropped_not_written_over_another_connections_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        conn.pragma_update(None, "cache_size", 10).unwrap();
        insert(&conn, 0..1, 10).unwrap();
        // The WAL emptied, so the rollback reads the pages it restores from the database file,
        // not from the WAL (a read of which writes out what was gathered first).
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        // A transaction a little larger than the cache: its spilled pages stay gathered.
        let tx = conn.unchecked_transaction().unwrap();
        insert(&tx, 100..130, 2000).unwrap();
        tx.rollback().unwrap();
        assert_eq!(stats(&conn).dropped, 1, "the spill was not left gathered: the test shows nothing");
        // Another connection commits over the same part of the WAL.
        let other = Connection::open(&path).unwrap();
        insert(&other, 200..230, 2000).unwrap();
        // This connection's next transaction, and what every connection reads.
        insert(&conn, 1..2, 10).unwrap();
        let expected: Vec<_> = [(0, body(0, 10)), (1, body(1, 10))].into_iter().chain((200..230).map(|id| (id, body(id, 2000)))).collect();
        for conn in [&conn, &other, &reader(&path)] {
            assert_rows(conn, &expected);
            checked(conn);
        }
    }

    #[test]
    fn a_failed_write_fails_the_commit_and_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        insert(&conn, 0..5, 3000).unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        insert(&tx, 5..10, 3000).unwrap();
        FAIL_WRITES.set(true);
        let committed = tx.commit();
        FAIL_WRITES.set(false);
        assert!(committed.is_err(), "a commit whose frames could not be written succeeded");
        let expected: Vec<_> = (0..5).map(|id| (id, body(id, 3000))).collect();
        assert_rows(&reader(&path), &expected);
        // The writer goes on.
        insert(&conn, 5..10, 3000).unwrap();
        let expected: Vec<_> = (0..10).map(|id| (id, body(id, 3000))).collect();
        assert_rows(&reader(&path), &expected);
        checked(&reader(&path));
    }

    /// After a transaction whose spilled pages could not all be written (as on a full disk),
    /// whatever it goes on to do, and whether or not it commits, what every connection then
    /// reads is a whole database: the first rows, and only rows as written.
    fn assert_whole_after_a_failed_spill(spill: impl FnOnce(&Connection) -> rusqlite::Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        conn.pragma_update(None, "cache_size", 10).unwrap();
        insert(&conn, 0..5, 3000).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let failed = spill(&conn);
        FAIL_WRITES.set(false);
        assert!(failed.is_err(), "no statement failed");
        let _ = insert(&conn, 400..410, 2000);
        let _ = conn.execute_batch("COMMIT");
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").unwrap();
        }
        insert(&conn, 5..6, 3000).unwrap();
        for conn in [&conn, &reader(&path)] {
            checked(conn);
            let rows = rows(conn);
            assert_eq!(rows[..6].iter().map(|(id, _)| *id).collect::<Vec<_>>(), (0..6).collect::<Vec<_>>());
            for (id, got) in rows {
                assert!(got == body(id, if id < 6 { 3000 } else { 2000 }), "row {id} is not as written");
            }
        }
    }

    #[test]
    fn a_spill_that_could_not_be_written_leaves_the_database_whole() {
        // The spill's own writes fail.
        assert_whole_after_a_failed_spill(|conn| {
            FAIL_WRITES.set(true);
            insert(conn, 100..400, 2000)
        });
    }

    #[test]
    fn a_spill_written_out_before_a_read_that_fails_leaves_the_database_whole() {
        // The spill is gathered; the statement that reads its pages again (writing them out
        // first) fails, and with a statement journal SQLite would roll back that statement only.
        assert_whole_after_a_failed_spill(|conn| {
            insert(conn, 100..130, 2000)?;
            FAIL_WRITES.set(true);
            conn.execute("UPDATE t SET body = body WHERE id >= 100", []).map(|_| ())
        });
    }
}
