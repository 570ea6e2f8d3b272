//! Installs Lobby: the binary, the systemd unit and, when none is there
//! yet, an example configuration. Never overwrites an operator's config.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::cmd::{build_lobby_release, checked, workspace_root};

/// Where things go below DESTDIR.
pub struct Layout {
    pub binary: PathBuf,
    pub unit: PathBuf,
    pub config: PathBuf,
}

impl Layout {
    pub fn new(destdir: &Path, prefix: &Path) -> Self {
        let under = |path: &Path| destdir.join(path.strip_prefix("/").unwrap_or(path));
        Self {
            binary: under(&prefix.join("bin/lobby")),
            unit: under(Path::new("/lib/systemd/system/lobby.service")),
            config: under(Path::new("/etc/lobby/lobby.yaml")),
        }
    }
}

pub fn run(
    destdir: Option<PathBuf>,
    prefix: PathBuf,
    binary: Option<PathBuf>,
) -> anyhow::Result<()> {
    let root = workspace_root();
    let binary = binary.map_or_else(build_lobby_release, Ok)?;
    let layout = Layout::new(destdir.as_deref().unwrap_or(Path::new("/")), &prefix);
    install_tree(&layout, &binary, &prefix, &root.join("dist"))?;
    if destdir.is_none() && Path::new("/run/systemd/system").is_dir() {
        checked(Command::new("systemctl").arg("daemon-reload"))?;
        eprintln!("install: done; start with `systemctl enable --now lobby`");
    } else {
        eprintln!("install: done");
    }
    Ok(())
}

/// Copies the binary, the unit (pointing at the installed binary) and the
/// example config (only if no config exists).
pub fn install_tree(
    layout: &Layout,
    binary: &Path,
    prefix: &Path,
    dist: &Path,
) -> anyhow::Result<()> {
    copy(binary, &layout.binary, 0o755)?;
    let unit =
        fs::read_to_string(dist.join("lobby.service")).context("reading dist/lobby.service")?;
    let installed_binary = prefix.join("bin/lobby");
    write(
        &layout.unit,
        unit.replace("/usr/bin/lobby", &installed_binary.to_string_lossy()),
        0o644,
    )?;
    if layout.config.exists() {
        eprintln!("install: keeping the existing {}", layout.config.display());
    } else {
        copy(&dist.join("lobby.yaml"), &layout.config, 0o644)?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes, mode)
}

pub fn write(to: &Path, contents: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write beside and rename: a running binary or a read config is never
    // seen half written.
    let partial = to.with_extension("partial");
    fs::write(&partial, contents).with_context(|| format!("writing {}", partial.display()))?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(mode))?;
    fs::rename(&partial, to).with_context(|| format!("installing {}", to.display()))?;
    eprintln!("install: {}", to.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_the_tree_and_keeps_an_existing_config() {
        let dest = tempfile::tempdir().unwrap();
        let fake_binary = dest.path().join("built-lobby");
        fs::write(&fake_binary, b"binary").unwrap();
        let dist = workspace_root().join("dist");
        let prefix = Path::new("/usr/local");
        let layout = Layout::new(&dest.path().join("root"), prefix);
        install_tree(&layout, &fake_binary, prefix, &dist).unwrap();
        assert_eq!(layout.binary, dest.path().join("root/usr/local/bin/lobby"));
        assert_eq!(fs::read(&layout.binary).unwrap(), b"binary");
        let unit = fs::read_to_string(&layout.unit).unwrap();
        assert!(
            unit.contains("ExecStart=/usr/local/bin/lobby -c /etc/lobby/lobby.yaml"),
            "{unit}"
        );
        assert_eq!(
            fs::read(&layout.config).unwrap(),
            fs::read(dist.join("lobby.yaml")).unwrap()
        );

        fs::write(&layout.config, b"operator's own").unwrap();
        install_tree(&layout, &fake_binary, prefix, &dist).unwrap();
        assert_eq!(fs::read(&layout.config).unwrap(), b"operator's own");
    }
}
