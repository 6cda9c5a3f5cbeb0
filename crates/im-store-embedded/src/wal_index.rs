//! The first bytes of a database's WAL index (its `-shm` file), read where every connection to
//! the database reads them: in a shared mapping of the file.
//!
//! A read connection compares them with what it read before ([`crate::db`]'s `Reader`) at every
//! read, to tell whether anything was committed since (by any connection, in any process). Read
//! with `pread`, that was one system call a read: a sixteenth of the CPU time of a `GET` by id.
//! Mapped, it is a few loads from memory, where SQLite reads it too. This module holds `unsafe`
//! code (as do [`crate::gathered_wal`] and the binary's call to its allocator): those loads.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

/// The bytes read: the header twice (48 bytes each; every commit of any connection rewrites it:
/// its frame count, change counter and checksums), then `nBackfill` (a native-endian `u32`: the
/// frames of the WAL already copied into the database file), in SQLite's documented WAL-index
/// format.
pub(crate) const HEADERS: usize = 96;
pub(crate) const READ: usize = HEADERS + 4;

/// A database's WAL index, open for reading its first [`READ`] bytes.
pub(crate) struct WalIndex {
    /// Never closed ([`crate::kept_open`]).
    file: &'static File,
    /// Its first page, mapped shared, read and write (so that atomic loads of it are sound; it is
    /// never written through); `None` when it cannot be mapped (the file is not writable for
    /// this process, or shorter than what is read): then it is read with a system call.
    map: Option<memmap2::MmapRaw>,
}

/// The WAL indexes this process opened, by device and inode: one a file for the life of the
/// process, shared by every reader of it (as SQLite keeps one descriptor a file for all its
/// connections).
static OPENED: Mutex<Vec<((u64, u64), &'static WalIndex)>> = Mutex::new(Vec::new());

impl WalIndex {
    /// The WAL index at `path`, for a connection that has read the database (so SQLite has
    /// created and sized the file: 32 KiB at least) and that stays open while this is read: as
    /// long as any connection has the file open, none (of any process) shortens or removes it
    /// (SQLite does so only when opening it with no other connection on it, which it tells by a
    /// lock every process holds shared while any of its connections has the file open; no
    /// descriptor of it is ever closed here, which would drop that lock: [`crate::kept_open`]).
    pub(crate) fn open(path: &str) -> Option<&'static Self> {
        let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
        let (key, file) = crate::kept_open::open(path)?;
        if let Some((_, index)) = opened.iter().find(|(k, _)| *k == key) {
            return Some(index);
        }
        let len = file.metadata().ok()?.len();
        let map = (len >= READ as u64).then(|| memmap2::MmapOptions::new().len(READ).map_raw(file).ok()).flatten();
        let index: &'static Self = Box::leak(Box::new(Self { file, map }));
        opened.push((key, index));
        Some(index)
    }

    /// Whether the file is read in place (mapped) rather than with a system call a read.
    #[cfg(test)]
    pub(crate) fn mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Reads the first [`READ`] bytes into `into`; false when they could not be read. Another
    /// connection may be rewriting them meanwhile: what is read may then be torn (half the old
    /// header, half the new), which only makes the comparison with a header read earlier fail,
    /// as it should.
    pub(crate) fn read(&self, into: &mut [u8; READ]) -> bool {
        let Some(map) = &self.map else { return self.file.read_exact_at(into, 0).is_ok() };
        let words = map.as_mut_ptr().cast::<u32>();
        for (i, bytes) in into.chunks_exact_mut(4).enumerate() {
            // SAFETY: `words` is the start of a mapping (page-aligned) of at least `READ` bytes,
            // so `words.add(i)` (i < READ / 4) is in it and aligned for a `u32`; the mapping is
            // readable and writable, and lives for the rest of the process (never unmapped);
            // the file's page behind it stays (the file is never shortened while a connection
            // of this process has it open: `open`; SQLite itself shortens it to 3 bytes, which
            // keeps that page). Other connections rewrite these bytes at any time, in this
            // process and in others: SQLite's C code, with plain stores and memory barriers,
            // outside the language's memory model, as for any memory shared with another
            // process. Only aligned 32-bit atomic loads read them here (which do not tear); a
            // header read half before and half after a rewrite differs from both and only makes
            // the caller's comparison fail.
            let word = unsafe { AtomicU32::from_ptr(words.add(i)) }.load(Ordering::Acquire);
            bytes.copy_from_slice(&word.to_ne_bytes());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn the_mapping_reads_what_the_file_holds_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-shm");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(32 * 1024).unwrap();
        let index = WalIndex::open(path.to_str().unwrap()).unwrap();
        assert!(index.mapped());
        assert!(std::ptr::eq(index, WalIndex::open(path.to_str().unwrap()).unwrap()), "one a file");
        let mut read = [0u8; READ];
        assert!(index.read(&mut read));
        assert_eq!(read, [0u8; READ]);
        // Written through another descriptor (as another connection would): seen by the next read.
        let written: Vec<u8> = (0..READ as u8).collect();
        file.write_all_at(&written, 0).unwrap();
        assert!(index.read(&mut read));
        assert_eq!(read[..], written[..]);
    }

    #[test]
    fn a_file_too_short_to_map_is_read_with_system_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-shm");
        std::fs::write(&path, [7u8; 10]).unwrap();
        let index = WalIndex::open(path.to_str().unwrap()).unwrap();
        assert!(!index.mapped());
        let mut read = [0u8; READ];
        assert!(!index.read(&mut read), "a short file is not read as if it were long enough");
        assert!(WalIndex::open(dir.path().join("none").to_str().unwrap()).is_none());
    }
}
