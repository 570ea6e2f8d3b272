//! The Debian package as an operator meets it: lintian, then a real
//! install, upgrade, removal and purge by dpkg into an empty root. `dpkg --root`
//! keeps its own database there; the maintainer scripts run without a
//! chroot (`--force-script-chrootless`) with DPKG_ROOT set, which
//! deb-systemd-helper honours, so enabling and purging the unit is real.
//! Dependencies are not installed there (`--force-depends`): the host has
//! them.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail, ensure};

use crate::{
    cmd::{checked, files_below, stdout, workspace_root},
    deb,
};

const UNIT: &str = "lib/systemd/system/lobby.service";
const CONFIG: &str = "etc/lobby/lobby.yaml";
const ENABLED: &str = "etc/systemd/system/multi-user.target.wants/lobby.service";
/// What `deb-systemd-helper mask` leaves while the package is removed.
const MASK: &str = "etc/systemd/system/lobby.service";

/// Packages `binary` (the build the tests used: any build packages the
/// same way) and checks the package.
pub fn run(binary: &Path) -> anyhow::Result<()> {
    let out = workspace_root().join("target/debian-test");
    let deb = deb::build(binary, &out)?;
    lintian(&deb)?;
    let root = out.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir))?;
    }
    fs::write(admin.join("status"), "")?;
    let dpkg = |args: &[&str]| {
        checked(
            Command::new("dpkg")
                .arg(format!("--root={}", root.display()))
                .arg(format!("--admindir={}", admin.display()))
                .args(["--force-script-chrootless", "--force-depends"])
                .arg(format!("--log={}", out.join("dpkg.log").display()))
                .args(args),
        )
    };

    dpkg(&["--install", &deb.to_string_lossy()])?;
    let version = stdout(Command::new(root.join("usr/bin/lobby")).arg("--version"))?;
    ensure!(
        version.trim() == format!("lobby {}", env!("CARGO_PKG_VERSION")),
        "the packaged lobby says {version:?}"
    );
    // The installed unit as systemd would load it, with its commands
    // pointing into the root and man looking there for `Documentation=`.
    let unit = fs::read_to_string(root.join(UNIT))?.replace(
        "/usr/bin/lobby",
        &root.join("usr/bin/lobby").to_string_lossy(),
    );
    let rooted_unit = out.join("lobby.service");
    fs::write(&rooted_unit, unit)?;
    let verify = Command::new("systemd-analyze")
        .env("MANPATH", root.join("usr/share/man"))
        .arg("verify")
        .arg(&rooted_unit)
        .output()
        .context("running systemd-analyze")?;
    let said = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    ensure!(
        fs::read_link(root.join(ENABLED))? == Path::new("/").join(UNIT),
        "postinst did not enable the unit"
    );
    let conffiles = stdout(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args(["--showformat=${Conffiles}", "--show", "lobby"]),
    )?;
    ensure!(
        conffiles.contains(&format!("/{CONFIG} ")),
        "conffiles: {conffiles}"
    );

    // An upgrade (the same package again runs the upgrade paths of the
    // maintainer scripts) keeps the operator's configuration and the unit.
    let edited = format!(
        "{}# edited by the operator\n",
        fs::read_to_string(root.join(CONFIG))?
    );
    fs::write(root.join(CONFIG), &edited)?;
    dpkg(&["--install", &deb.to_string_lossy()])?;
    ensure!(
        fs::read_to_string(root.join(CONFIG))? == edited,
        "the upgrade replaced the operator's configuration"
    );
    ensure!(
        fs::read_link(root.join(ENABLED))? == Path::new("/").join(UNIT),
        "the upgrade disabled the unit"
    );

    dpkg(&["--remove", "lobby"])?;
    ensure!(
        !root.join("usr/bin/lobby").exists(),
        "removal left the binary"
    );
    ensure!(
        root.join(CONFIG).is_file(),
        "removal took the configuration"
    );
    ensure!(
        fs::read_link(root.join(MASK))? == Path::new("/dev/null"),
        "postrm did not mask the removed unit"
    );

    dpkg(&["--purge", "lobby"])?;
    let left = files_below(&root, &admin)?;
    ensure!(
        left.is_empty() && !root.join("etc/lobby").exists(),
        "purge left {left:?}"
    );
    eprintln!(
        "deb-test: {} installs, upgrades, removes and purges",
        deb.display()
    );
    Ok(())
}

/// Runs lintian; fails on errors, shows everything it says.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let output = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let said = String::from_utf8_lossy(&output.stdout);
    eprint!("{said}{}", String::from_utf8_lossy(&output.stderr));
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E:")).collect();
    if !errors.is_empty() {
        bail!("lintian found errors:\n{}", errors.join("\n"));
    }
    Ok(())
}
