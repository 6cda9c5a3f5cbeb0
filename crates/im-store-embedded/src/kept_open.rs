//! Files of a database that this process opens beside SQLite and keeps open for the rest of its
//! life: one descriptor a file, shared by every user of it in the process.
//!
//! SQLite locks a database's files with POSIX `fcntl` locks, which belong to the process: closing
//! any descriptor of a file drops all of them, those of every connection of the process (the one
//! that tells other processes the WAL index is in use among them, without which the next process
//! to open the database would start it over under this one's connections). So a descriptor
//! opened here is never closed. An inode's number is not reused while a descriptor of it is
//! open, so a file found here by the numbers of the file at a path is that file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, PoisonError};

/// The files opened, by device and inode.
static OPENED: Mutex<Vec<((u64, u64), &'static File)>> = Mutex::new(Vec::new());

/// The file at `path` (opened for reading and writing, or for reading when it cannot be
/// written), with its device and inode; `None` when there is none.
pub(crate) fn open(path: &str) -> Option<((u64, u64), &'static File)> {
    let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
    let find = |opened: &[((u64, u64), &'static File)], key| opened.iter().find(|(k, _)| *k == key).copied();
    let at_path = std::fs::metadata(path).ok()?;
    if let Some(found) = find(&opened, (at_path.dev(), at_path.ino())) {
        return Some(found);
    }
    // Leaked: never closed (see the module's documentation), even when it is found to be a
    // file opened already (the path named another one when it was looked at).
    let file: &'static File = Box::leak(Box::new(OpenOptions::new().read(true).write(true).open(path).or_else(|_| File::open(path)).ok()?));
    let meta = file.metadata().ok()?;
    let key = (meta.dev(), meta.ino());
    if let Some(found) = find(&opened, key) {
        return Some(found);
    }
    opened.push((key, file));
    Some((key, file))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_file_is_opened_once_and_read_where_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b"first").unwrap();
        let (key, file) = super::open(path.to_str().unwrap()).unwrap();
        let (again_key, again) = super::open(path.to_str().unwrap()).unwrap();
        assert_eq!(key, again_key);
        assert!(std::ptr::eq(file, again), "one descriptor a file");
        std::fs::write(&path, b"again").unwrap();
        let mut read = [0u8; 5];
        file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read, b"again");
        assert!(super::open(dir.path().join("none").to_str().unwrap()).is_none());
    }
}
