//! Notices when the configuration file changes: written in place, replaced
//! by an editor's rename, or a symlink swapped to a new target. Watches the
//! directories rather than the file, because a rename or a swapped symlink
//! leaves a watch on the old inode blind.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::mpsc;
use tracing::warn;

/// Events closer together than this are one change: an editor's write,
/// rename and chmod arrive as a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("watching {path} for changes")]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

/// Keeps the watch alive; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Sends a unit on `changed` (at most one pending) whenever a change in
/// the directory of `path` or of the file it links to is complete. The
/// caller debounces and compares contents: a notice is a hint, not a
/// verdict.
pub fn watch(path: &Path, changed: mpsc::Sender<()>) -> Result<ConfigWatch, WatchError> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_complete_change(&event.kind) => {
                let _ = changed.try_send(());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "config watch"),
        })
        .map_err(|source| WatchError {
            path: path.to_owned(),
            source,
        })?;
    for dir in watched_dirs(path) {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError { path: dir, source })?;
    }
    Ok(ConfigWatch { _watcher: watcher })
}

/// Whether `kind` ends a change: a file closed after writing, or a name
/// created, renamed or removed. Writes still under way (truncate, then
/// data) are not: a file read between them may be a valid but truncated
/// configuration.
fn is_complete_change(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
}

/// The directory holding `path` and, when `path` is a symlink, the one
/// holding its final target.
fn watched_dirs(path: &Path) -> Vec<PathBuf> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut dirs: Vec<PathBuf> = absolute.parent().map(Path::to_owned).into_iter().collect();
    if let Some(target_dir) = std::fs::canonicalize(&absolute)
        .ok()
        .and_then(|t| t.parent().map(Path::to_owned))
        && !dirs.contains(&target_dir)
    {
        dirs.push(target_dir);
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn notified(rx: &mut mpsc::Receiver<()>) -> bool {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .is_ok()
    }

    fn drain(rx: &mut mpsc::Receiver<()>) {
        while rx.try_recv().is_ok() {}
    }

    #[test]
    fn writes_under_way_are_not_changes() {
        use notify::event::{DataChange, MetadataKind, RenameMode};
        assert!(!is_complete_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(!is_complete_change(&EventKind::Modify(
            ModifyKind::Metadata(MetadataKind::Any)
        )));
        assert!(!is_complete_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(is_complete_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_complete_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
    }

    #[tokio::test]
    async fn in_place_writes_renames_and_symlink_swaps_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("configs");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("a.yaml"), "a").unwrap();
        std::fs::write(real.join("b.yaml"), "b").unwrap();
        let link = dir.path().join("lobby.yaml");
        std::os::unix::fs::symlink(real.join("a.yaml"), &link).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _watch = watch(&link, tx).unwrap();

        std::fs::write(real.join("a.yaml"), "a2").unwrap();
        assert!(notified(&mut rx).await, "in-place write of the target");
        drain(&mut rx);

        // ln -sfn: a new link renamed over the old one.
        let tmp = dir.path().join(".lobby.yaml.tmp");
        std::os::unix::fs::symlink(real.join("b.yaml"), &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert!(notified(&mut rx).await, "symlink swap");
        drain(&mut rx);

        // An editor: write a new file, rename it over the old one.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, "c").unwrap();
        drain(&mut rx);
        let tmp = dir.path().join("lobby.yaml~");
        std::fs::write(&tmp, "d").unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert!(notified(&mut rx).await, "rename over");
    }
}
