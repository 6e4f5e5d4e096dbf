//! File-system helpers of the tests.

#![allow(dead_code)]

use std::path::Path;

/// Copies the directory tree `from` to `to` (created if missing).
///
/// # Errors
/// The first I/O error.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}
