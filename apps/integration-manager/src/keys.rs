//! Key files: random keys created on first run in the data directory, mode 0600, and reused.
//! Both the token key and the local secret store's key come from here.
//!
//! A key file is created atomically: the key is written to a temporary file (mode 0600) in the
//! same directory, synced, then linked to its name, which fails when another process got there
//! first (that process's key is then used). A reader therefore never sees a half-written key.
//! An existing key file that group or others may read, or one that holds too short a key, stops
//! start-up with a message naming the file and the fix.

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Reads the base64 key in `path`, or creates the file (mode 0600) with `len` new random bytes
/// when it does not exist. Two processes racing to create it end up with the same key.
///
/// # Errors
/// When the file cannot be read or created, is readable by group or others, or holds fewer than
/// `len` bytes of base64.
pub fn load_or_create_key(path: &Path, len: usize) -> anyhow::Result<Vec<u8>> {
    if !path.exists() {
        create_key_file(path, len)?;
    }
    check_permissions(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", path.display()))?;
    let fix = "delete it to have a new key created (tokens or secrets made with the old key stop working), or restore the original file";
    let key = STANDARD.decode(text.trim()).map_err(|_| anyhow::anyhow!("key file {} does not hold base64; {fix}", path.display()))?;
    anyhow::ensure!(key.len() >= len, "key file {} holds {} bytes, fewer than the {len} required; {fix}", path.display(), key.len());
    Ok(key)
}

/// Writes a new random key to a temporary file beside `path`, then links it into place unless
/// another process created `path` meanwhile.
fn create_key_file(path: &Path, len: usize) -> anyhow::Result<()> {
    let mut key = vec![0u8; len];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the directory of key file {}: {e}", path.display()))?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", u64::from_le_bytes(suffix)));
    let created = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp)?;
        file.write_all(STANDARD.encode(&key).as_bytes())?;
        file.sync_all()?;
        drop(file);
        match std::fs::hard_link(&temp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&temp);
    created.map_err(|e| anyhow::anyhow!("cannot create key file {}: {e}", path.display()))
}

/// Refuses a key file that group or others may read or write.
fn check_permissions(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", path.display()))?.permissions().mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "key file {} is accessible by group or others (mode {:o}); restrict it with `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn key_files_are_created_once_with_mode_0600_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/a.key");
        let first = load_or_create_key(&path, 32).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create_key(&path, 32).unwrap(), first, "reused, never replaced");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("keys")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.key")], "no temporary file left behind");
    }

    #[test]
    fn racing_creators_end_up_with_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.key");
        let keys: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| load_or_create_key(&path, 32).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "every creator reads the key that won");
    }

    #[test]
    fn short_or_empty_key_files_stop_start_up_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [("short.key", STANDARD.encode([1u8; 8])), ("empty.key", String::new())] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            #[cfg(unix)]
            set_mode(&path, 0o600);
            let error = load_or_create_key(&path, 32).unwrap_err().to_string();
            assert!(error.contains(&path.display().to_string()) && error.contains("fewer than the 32 required"), "{name}: {error}");
            assert!(error.contains("delete it"), "the message names the fix: {error}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn key_files_readable_by_others_stop_start_up_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.key");
        load_or_create_key(&path, 32).unwrap();
        for open in [0o644, 0o640, 0o604, 0o660] {
            set_mode(&path, open);
            let error = load_or_create_key(&path, 32).unwrap_err().to_string();
            assert!(error.contains(&format!("chmod 600 {}", path.display())), "{open:o}: {error}");
        }
        set_mode(&path, 0o400);
        assert!(load_or_create_key(&path, 32).is_ok(), "owner-only read is fine");
    }
}
