//! Running commands with their failure explained.
use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs `command` with inherited output; fails with the command line when
/// it cannot start or exits unsuccessfully.
pub fn checked(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Runs `command` and returns its standard output.
pub fn stdout(command: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&stdout_bytes(command)?).into_owned())
}

/// Runs `command` and returns its standard output as it is, for binary
/// output such as a decompressed file.
pub fn stdout_bytes(command: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `cargo` as the one running this xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Builds the lobby binary in the debug profile, the one the integration
/// tests run, and returns its path.
pub fn build_lobby() -> anyhow::Result<std::path::PathBuf> {
    checked(
        cargo()
            .current_dir(workspace_root())
            .args(["build", "-p", "lobby"]),
    )?;
    Ok(lobby_tests::lobby::binary())
}

/// Builds the lobby binary in the release profile, the one operators
/// install, and returns its path.
pub fn build_lobby_release() -> anyhow::Result<std::path::PathBuf> {
    let root = workspace_root();
    checked(
        cargo()
            .current_dir(&root)
            .args(["build", "--release", "-p", "lobby"]),
    )?;
    Ok(root.join("target/release/lobby"))
}

/// The first file in `dir` whose name `matches`.
pub fn find_file(
    dir: &std::path::Path,
    matches: impl Fn(&str) -> bool,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(&matches)
        }))
}

/// Every file and symbolic link below `dir`, sorted, except what is below
/// `skip`.
pub fn files_below(
    dir: &std::path::Path,
    skip: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    fn walk(
        dir: &std::path::Path,
        skip: &std::path::Path,
        found: &mut Vec<std::path::PathBuf>,
    ) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path == skip {
                continue;
            }
            if path.is_dir() && !path.is_symlink() {
                walk(&path, skip, found)?;
            } else {
                found.push(path);
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir, skip, &mut found)?;
    found.sort();
    Ok(found)
}

/// `cargo` of the nightly toolchain, for the eBPF crate; the outer cargo's
/// toolchain variables must not leak into it.
pub fn nightly_cargo() -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    command
}
