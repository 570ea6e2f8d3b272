//! `cargo xtask deb`: Lobby as a Debian package, target/debian/lobby_*.deb.
//!
//! Laid out here and packed with dpkg-deb rather than cargo-deb: nothing
//! more to install, and the place of every file is written below. The
//! binary, the unit and the example configuration go where `cargo xtask
//! install --prefix /usr` puts them (/usr/bin: `lobby check` needs no
//! privileges and is run by users, so not /usr/sbin); the configuration is
//! a conffile. The version is the newest entry of dist/debian/changelog,
//! whose upstream part must be the workspace version.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{build_lobby_release, cargo, checked, files_below, stdout, stdout_bytes, workspace_root},
    install::{Layout, install_tree, write},
};

/// Packaged from dist/debian.
const MAINTAINER_SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];
/// Made by `generate_docs`, and where they go; a name ending in .gz is
/// compressed.
const GENERATED: [(&str, &str); 6] = [
    ("lobby.1", "usr/share/man/man1/lobby.1.gz"),
    ("lobby-check.1", "usr/share/man/man1/lobby-check.1.gz"),
    ("lobby-stats.1", "usr/share/man/man1/lobby-stats.1.gz"),
    ("lobby.bash", "usr/share/bash-completion/completions/lobby"),
    ("_lobby", "usr/share/zsh/vendor-completions/_lobby"),
    (
        "lobby.fish",
        "usr/share/fish/vendor_completions.d/lobby.fish",
    ),
];
/// From dist/debian, likewise.
const WRITTEN: [(&str, &str); 2] = [
    ("copyright", "usr/share/doc/lobby/copyright"),
    ("changelog", "usr/share/doc/lobby/changelog.Debian.gz"),
];
/// Programs the daemon runs, and the library it loads at run time
/// (libnftables), beyond the libraries dpkg-shlibdeps finds.
const RUNS: &str = "nftables, libnftables1, iproute2";
const DESCRIPTION: &str = "\
layer-4 load balancer in the kernel: nftables DNAT, eBPF counters
 Lobby balances TCP connections over upstreams with nftables round-robin
 DNAT; conntrack carries each connection, so the data path is the kernel's.
 The daemon health-checks the upstreams, resolves their host names and
 keeps one nftables table equal to the configuration, one atomic
 transaction per change. eBPF tc programs count connections, packets and
 bytes per upstream, shown by `lobby stats` and on a Prometheus endpoint.";

pub fn run(binary: Option<PathBuf>) -> anyhow::Result<()> {
    let binary = binary.map_or_else(build_lobby_release, Ok)?;
    let deb = build(&binary, &workspace_root().join("target/debian"))?;
    eprintln!("deb: {}", deb.display());
    Ok(())
}

/// The newest entry of dist/debian/changelog.
pub struct Release {
    /// The Debian version: the workspace version and a Debian revision.
    pub version: String,
    pub maintainer: String,
}

impl Release {
    pub fn read(changelog: &Path) -> anyhow::Result<Self> {
        let field = |name: &str| -> anyhow::Result<String> {
            Ok(stdout(
                Command::new("dpkg-parsechangelog")
                    .arg("-l")
                    .arg(changelog)
                    .args(["-S", name]),
            )?
            .trim()
            .to_owned())
        };
        let release = Self {
            version: field("Version")?,
            maintainer: field("Maintainer")?,
        };
        let workspace = env!("CARGO_PKG_VERSION");
        if release
            .version
            .rsplit_once('-')
            .map(|(upstream, _)| upstream)
            != Some(workspace)
        {
            bail!(
                "{}: the newest entry is {}, the workspace version is {workspace}: add an entry {workspace}-1",
                changelog.display(),
                release.version
            );
        }
        Ok(release)
    }
}

/// Builds the package from `binary` into `out_dir` and returns its path.
pub fn build(binary: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let dist = root.join("dist");
    let debian = dist.join("debian");
    let release = Release::read(&debian.join("changelog"))?;
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("lobby_{}_{}", release.version, arch.trim());
    let stage = out_dir.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    let prefix = Path::new("/usr");
    let layout = Layout::new(&stage, prefix);
    install_tree(&layout, binary, prefix, &dist)?;
    // What dh_strip does: the debug information stays in target/.
    checked(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(&layout.binary),
    )?;
    let docs = out_dir.join("docs");
    generate_docs(&docs)?;
    let generated = GENERATED.iter().map(|(file, to)| (docs.join(file), to));
    let written = WRITTEN.iter().map(|(file, to)| (debian.join(file), to));
    for (from, to) in generated.chain(written) {
        let contents = if to.ends_with(".gz") {
            stdout_bytes(Command::new("gzip").args(["-9", "-n", "-c"]).arg(&from))?
        } else {
            fs::read(&from).with_context(|| format!("reading {}", from.display()))?
        };
        write(&stage.join(to), contents, 0o644)?;
    }

    let control = stage.join("DEBIAN");
    for script in MAINTAINER_SCRIPTS {
        let from = debian.join(script);
        let text = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        write(&control.join(script), text, 0o755)?;
    }
    // The configuration is the one conffile.
    let conffile = Path::new("/").join(layout.config.strip_prefix(&stage)?);
    write(
        &control.join("conffiles"),
        format!("{}\n", conffile.display()),
        0o644,
    )?;
    let files = files_below(&stage, &control)?
        .into_iter()
        .map(|f| f.strip_prefix(&stage).map(Path::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    write(&control.join("md5sums"), md5sums(&stage, &files)?, 0o644)?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| Ok(fs::metadata(stage.join(f))?.len().div_ceil(1024)))
        .sum::<std::io::Result<u64>>()?;
    let control_text = format!(
        "Package: lobby\nVersion: {}\nArchitecture: {}\nMaintainer: {}\nInstalled-Size: {installed_kib}\nDepends: {}, {RUNS}\nSection: net\nPriority: optional\nDescription: {DESCRIPTION}\n",
        release.version,
        arch.trim(),
        release.maintainer,
        shared_library_depends(out_dir, &layout.binary)?,
    );
    write(&control.join("control"), control_text, 0o644)?;
    set_directory_modes(&stage)?;

    let deb = out_dir.join(format!("{name}.deb"));
    checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The man pages and completions, from lobby's clap definitions.
fn generate_docs(out: &Path) -> anyhow::Result<()> {
    checked(
        cargo()
            .current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "-p",
                "lobby",
                "--example",
                "dist_docs",
                "--",
            ])
            .arg(out),
    )
}

fn md5sums(stage: &Path, files: &[PathBuf]) -> anyhow::Result<String> {
    stdout(Command::new("md5sum").current_dir(stage).args(files))
}

/// `Depends` for the libraries `binary` links, as dpkg-shlibdeps works them
/// out (it wants a debian/control beside it).
fn shared_library_depends(out_dir: &Path, binary: &Path) -> anyhow::Result<String> {
    let work = out_dir.join("shlibdeps");
    write(
        &work.join("debian/control"),
        "Source: lobby\n\nPackage: lobby\nArchitecture: any\n",
        0o644,
    )?;
    let said = stdout(
        Command::new("dpkg-shlibdeps")
            .current_dir(&work)
            .arg("-O")
            .arg(binary),
    )?;
    said.trim()
        .strip_prefix("shlibs:Depends=")
        .map(str::to_owned)
        .with_context(|| format!("dpkg-shlibdeps said {said:?}"))
}

/// 0755 on every directory, whatever the umask was.
fn set_directory_modes(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            set_directory_modes(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changelog_names_the_workspace_version() {
        let release = Release::read(&workspace_root().join("dist/debian/changelog")).unwrap();
        assert!(release.maintainer.contains('@'), "{}", release.maintainer);
    }
}
