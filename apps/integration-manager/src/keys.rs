//! Key files: random keys created on first run in the data directory, mode 0600, and reused.
//! Both the token key and the local secret store's key come from here.

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Reads the base64 key in `path`, or creates the file (mode 0600) with `len` new random bytes
/// when it does not exist. Two processes racing to create it end up with the same key.
///
/// # Errors
/// When the file cannot be read or created, or holds fewer than `len` bytes of base64.
pub fn load_or_create_key(path: &Path, len: usize) -> anyhow::Result<Vec<u8>> {
    if !path.exists() {
        let mut key = vec![0u8; len];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(STANDARD.encode(&key).as_bytes())?;
                file.sync_all()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => anyhow::bail!("cannot create key file {}: {e}", path.display()),
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", path.display()))?;
    let key = STANDARD.decode(text.trim()).map_err(|_| anyhow::anyhow!("key file {} does not hold base64", path.display()))?;
    anyhow::ensure!(key.len() >= len, "key file {} holds fewer than {len} bytes", path.display());
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/a.key");
        let first = load_or_create_key(&path, 32).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create_key(&path, 32).unwrap(), first, "reused, never replaced");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("short.key"), STANDARD.encode([1u8; 8])).unwrap();
        assert!(load_or_create_key(&dir.path().join("short.key"), 32).is_err(), "a short key is refused");
    }
}
