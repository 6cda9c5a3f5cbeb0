//! The first bytes of a database's WAL index (its `-shm` file), read where every connection to
//! the database reads them: in a shared mapping of the file.
//!
//! A read connection compares them with what it read before ([`crate::db`]'s `Reader`) at every
//! read, to tell whether anything was committed since (by any connection, in any process). Read
//! with `pread`, that was one system call a read: a sixteenth of the CPU time of a `GET` by id.
//! Mapped, it is a few loads from memory, as in SQLite itself. This module holds the only
//! `unsafe` code of the workspace: those loads.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};

/// The bytes read: the header twice (48 bytes each; every commit of any connection rewrites it:
/// its frame count, change counter and checksums), then `nBackfill` (a native-endian `u32`: the
/// frames of the WAL already copied into the database file), in SQLite's documented WAL-index
/// format.
pub(crate) const HEADERS: usize = 96;
pub(crate) const READ: usize = HEADERS + 4;

/// A database's WAL index, open for reading its first [`READ`] bytes.
pub(crate) enum WalIndex {
    /// Its first page, mapped shared, read and write (so that atomic loads of it are sound; it
    /// is never written through).
    Mapped(memmap2::MmapRaw),
    /// Read with a system call each time: when the file cannot be opened for writing (then it
    /// cannot be mapped so) or is shorter than what is read.
    File(File),
}

impl WalIndex {
    /// Opens the WAL index at `path` for a connection that has read the database (so SQLite has
    /// sized the file: 32 KiB at least) and that stays open for as long as this is used: while
    /// any connection has the file open, none (of any process) shortens or removes it (SQLite
    /// does so only when opening it with no other connection on it, which it tells by a lock
    /// every connection holds shared for as long as it has the file open).
    pub(crate) fn open(path: &str) -> Option<Self> {
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(path)
            && file.metadata().is_ok_and(|m| m.len() >= READ as u64)
            && let Ok(map) = memmap2::MmapOptions::new().len(READ).map_raw(&file)
        {
            return Some(Self::Mapped(map));
        }
        File::open(path).ok().map(Self::File)
    }

    /// Reads the first [`READ`] bytes into `into`; false when they could not be read. Another
    /// connection may be rewriting them meanwhile: what is read may then be torn (half the old
    /// header, half the new), which only makes the comparison with a header read earlier fail,
    /// as it should.
    pub(crate) fn read(&self, into: &mut [u8; READ]) -> bool {
        match self {
            Self::Mapped(map) => {
                let words = map.as_mut_ptr().cast::<u32>();
                for (i, bytes) in into.chunks_exact_mut(4).enumerate() {
                    // SAFETY: `words` is the start of a mapping (page-aligned) of at least `READ`
                    // bytes, so `words.add(i)` (i < READ / 4) is in it and aligned for a `u32`;
                    // the mapping is readable and writable and lives as long as `map`, borrowed
                    // here; the file's pages behind it stay (the file is never shortened while
                    // the connection that opened this has it open: `open`). Other connections
                    // write these bytes concurrently, in this process and in others, as SQLite
                    // does for every reader of the file; only atomic loads read them here, and a
                    // torn result is handled by the caller.
                    let word = unsafe { AtomicU32::from_ptr(words.add(i)) }.load(Ordering::Acquire);
                    bytes.copy_from_slice(&word.to_ne_bytes());
                }
                true
            }
            Self::File(file) => file.read_exact_at(into, 0).is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_reads_what_the_file_holds_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-shm");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(32 * 1024).unwrap();
        let index = WalIndex::open(path.to_str().unwrap()).unwrap();
        assert!(matches!(index, WalIndex::Mapped(_)));
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
        assert!(matches!(index, WalIndex::File(_)));
        let mut read = [0u8; READ];
        assert!(!index.read(&mut read), "a short file is not read as if it were long enough");
        assert!(WalIndex::open(dir.path().join("none").to_str().unwrap()).is_none());
    }
}
