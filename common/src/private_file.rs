//! Reading secrets from files only their owner may read: the CLI's API token and the coordinator's token secret.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} may be read by other users (mode {mode:04o}); it holds a secret: run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
}

/// The file's content without surrounding whitespace, if only its owner may
/// read or write it (no permission bit for the group or others).
pub fn read(path: &Path) -> Result<String, PrivateFileError> {
    let err = |source| PrivateFileError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PrivateFileError::Exposed { path: path.to_path_buf(), mode });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(err)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(PrivateFileError::Empty { path: path.to_path_buf() });
    }
    Ok(text.to_string())
}

/// Writes `text` to a new file (or replaces one) that only its owner may
/// read, creating the parent folder if needed.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    // An existing file keeps its mode on open: tighten it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_may_read_is_refused_and_one_written_here_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret");
        write(&path, "s3cret").unwrap();
        assert_eq!(read(&path).unwrap(), "s3cret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
            write(&path, "again").unwrap();
            assert_eq!(read(&path).unwrap(), "again", "rewriting tightens the mode");
        }
        std::fs::write(dir.path().join("empty"), " \n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path().join("empty"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(read(&dir.path().join("empty")), Err(PrivateFileError::Empty { .. })));
        assert!(matches!(read(&dir.path().join("missing")), Err(PrivateFileError::Read { .. })));
    }
}
