//! Who owns Lobby's table: the daemon that holds its lock. A table whose
//! owner died (crash, kill -9) is taken over; a table whose owner is alive
//! never is, so a second daemon started by mistake cannot wipe the first's
//! ruleset or delete it on its way out.
//!
//! The lock is an `flock` on a file named after the table and the network
//! namespace (tables are per namespace, /run is not), held for the
//! daemon's life: the kernel releases it when the process dies, however it
//! dies. The file records the owner's PID for the error message.
use std::{
    fs::File,
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::nft;

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error(
        "table {family} {table} belongs to a running lobby (pid {pid}, lock {path}); stop it first, or give this one another table"
    )]
    Taken {
        family: &'static str,
        table: String,
        pid: String,
        path: PathBuf,
    },
    #[error("{op} the table lock {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the locks live by default.
pub fn default_lock_dir() -> PathBuf {
    PathBuf::from("/run/lobby")
}

/// The lock on Lobby's table in this network namespace, held until dropped.
#[derive(Debug)]
pub struct TableLock {
    _file: File,
}

impl TableLock {
    /// Takes the lock of `table` in `dir`, or says which process holds it.
    pub fn claim(dir: &Path, table: &str) -> Result<Self, OwnershipError> {
        let io_error = |op, path: &Path| {
            let path = path.to_owned();
            move |source| OwnershipError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_error("creating the directory of", dir))?;
        let namespace = std::fs::metadata("/proc/self/ns/net")
            .map_err(io_error("finding the network namespace for", dir))?
            .ino();
        let path = dir.join(format!(
            "table-{}-{table}-netns-{namespace}.lock",
            nft::FAMILY
        ));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::WouldBlock {
                return Err(io_error("locking", &path)(error));
            }
            let mut pid = String::new();
            // The owner may be writing its PID this instant: unknown then.
            let _ = file.read_to_string(&mut pid);
            let pid = match pid.trim() {
                "" => "unknown".to_owned(),
                pid => pid.to_owned(),
            };
            return Err(OwnershipError::Taken {
                family: nft::FAMILY,
                table: table.to_owned(),
                pid,
                path,
            });
        }
        file.set_len(0).map_err(io_error("writing", &path))?;
        file.rewind().map_err(io_error("writing", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_error("writing", &path))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_table_is_refused_naming_its_owner_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = TableLock::claim(dir.path(), "lobby").expect("a free table");
        // Another table is another lock.
        let _other = TableLock::claim(dir.path(), "lb2").expect("another table");
        // flock locks belong to the open file: a second open in the same
        // process conflicts just as another process would.
        let error = TableLock::claim(dir.path(), "lobby").expect_err("a held table");
        let message = error.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        TableLock::claim(dir.path(), "lobby").expect("free again");
    }
}
