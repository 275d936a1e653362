//! Advisory file locks on cache entries, shared by the download cache and
//! the prepared-model cache.
//!
//! An entry `<key>` has a lock file `<key>.lock` beside it. Whoever builds
//! the entry holds it exclusively; a process using a prepared entry holds it
//! shared, so eviction (which needs it exclusively) passes over entries in
//! use. A lock goes with its file handle, so a killed holder releases it.
//! Lock files are never removed: removing one while another process waits
//! on it would let two processes build the same entry.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Takes `path`'s exclusive lock, calling `waiting` first when another
/// handle holds it and then waiting for it.
pub(crate) fn exclusive(path: &Path, waiting: impl FnOnce()) -> io::Result<File> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(e)) => return Err(e),
    }
    waiting();
    file.lock()?;
    Ok(file)
}

/// `path`'s exclusive lock if nobody holds it now (`None`: in use).
pub(crate) fn try_exclusive(path: &Path) -> io::Result<Option<File>> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// `path`'s shared lock, waiting while an exclusive holder has it.
pub(crate) fn shared(path: &Path) -> io::Result<File> {
    let file = open(path)?;
    file.lock_shared()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_keep_exclusive_out_even_in_one_process() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("e.lock");
        let reader = shared(&p).unwrap();
        assert!(try_exclusive(&p).unwrap().is_none(), "in use");
        let second = shared(&p).unwrap();
        drop(reader);
        assert!(try_exclusive(&p).unwrap().is_none(), "still in use");
        drop(second);
        let ex = try_exclusive(&p).unwrap().expect("free");
        assert!(try_exclusive(&p).unwrap().is_none(), "held exclusively");
        drop(ex);
    }
}
