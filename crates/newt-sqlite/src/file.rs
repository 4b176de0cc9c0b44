//! A look at the file before SQLite opens it, so that a file that is not a
//! database, or is cut short, is refused with a typed error and never
//! touched.
//!
//! SQLite opens lazily and reads little: it would report a foreign file only
//! on the first query, and a truncated one only when a query reaches a
//! missing page. The 100-byte header tells both at once.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use newt_store::StoreError;

/// The magic string every SQLite 3 database starts with.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Size of the database header.
const HEADER_LEN: usize = 100;

/// What is at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileState {
    /// Nothing, or an empty file: a new store will be created.
    New,
    /// An SQLite database whose header is consistent with its size.
    Database,
}

/// Inspects the file at `path` without writing to it.
pub(crate) fn inspect(path: &Path) -> Result<FileState, StoreError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(FileState::New),
        Err(e) => return Err(StoreError::Backend(Box::new(e))),
    };
    let len = file.metadata().map_err(|e| StoreError::Backend(Box::new(e)))?.len();
    if len == 0 {
        return Ok(FileState::New);
    }
    let mut header = [0u8; HEADER_LEN];
    let mut read = 0;
    while read < HEADER_LEN {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::Backend(Box::new(e))),
        }
    }
    if read < HEADER_LEN || header[..16] != MAGIC[..] {
        return Err(StoreError::Corrupt(format!("{} is not an SQLite database", path.display())));
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        n => return Err(StoreError::Corrupt(format!("invalid page size {n}"))),
    };
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let pages = u64::from(be32(28));
    // The in-header size is valid only when "version-valid-for" matches the
    // change counter (always so for files written by SQLite >= 3.7.0).
    let size_valid = be32(92) == be32(24);
    // A checkpoint killed half-way can leave page 1 updated before the file
    // grew; the WAL still holds every page then and SQLite finishes the job.
    // Only without a WAL is a short file certainly truncated.
    if size_valid && pages * page_size > len && !has_wal(path) {
        return Err(StoreError::Corrupt(format!(
            "{} is truncated: its header says {} bytes, the file has {len}",
            path.display(),
            pages * page_size
        )));
    }
    Ok(FileState::Database)
}

fn has_wal(path: &Path) -> bool {
    let mut wal = PathBuf::from(path.as_os_str().to_owned());
    wal.as_mut_os_string().push("-wal");
    std::fs::metadata(wal).map(|m| m.len() > 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(inspect(&missing).unwrap(), FileState::New);

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(inspect(&empty).unwrap(), FileState::New);

        let text = dir.path().join("text");
        std::fs::write(&text, vec![b'x'; 4096]).unwrap();
        assert!(matches!(inspect(&text), Err(StoreError::Corrupt(_))));

        let short = dir.path().join("short");
        std::fs::write(&short, &MAGIC[..]).unwrap();
        assert!(matches!(inspect(&short), Err(StoreError::Corrupt(_))));

        let db = dir.path().join("db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(20000));")
            .unwrap();
        drop(conn);
        assert_eq!(inspect(&db).unwrap(), FileState::Database);
        let bytes = std::fs::read(&db).unwrap();
        std::fs::write(&db, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(inspect(&db), Err(StoreError::Corrupt(_))));
    }
}
