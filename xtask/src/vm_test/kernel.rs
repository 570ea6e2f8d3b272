//! Debian's cloud kernels: which ones the configured archive offers, and one
//! of them downloaded (`apt-get download`) and unpacked (`dpkg-deb -x`) into
//! the cache, once.
use std::{
    cmp::Reverse,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{checked, find_file, stdout};

/// The kernel line CI must keep passing on: Debian 12's own kernel.
pub const OLDEST_SUPPORTED: &str = "6.1";

/// Package names are `linux-image-VERSION-cloud-amd64-unsigned`: the cloud
/// flavour is small and boots on QEMU's default machine.
const PACKAGE_PREFIX: &str = "linux-image-";
const PACKAGE_SUFFIX: &str = "-cloud-amd64-unsigned";

/// An unpacked kernel package.
pub struct Kernel {
    /// What `uname -r` says in the guest, e.g. 6.1.0-56-cloud-amd64.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/RELEASE, with a modules.dep made at unpack time (the
    /// package's postinst would run depmod; unpacking does not).
    pub modules: PathBuf,
}

/// The package versions (`6.1.0-56`, `6.12.117+deb12`) that the apt
/// archive offers, newest first.
pub fn available() -> anyhow::Result<Vec<String>> {
    let pattern = format!("^{PACKAGE_PREFIX}.*{PACKAGE_SUFFIX}$");
    let listing = stdout(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let mut versions: Vec<String> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            name.strip_prefix(PACKAGE_PREFIX)?
                .strip_suffix(PACKAGE_SUFFIX)
        })
        .map(str::to_owned)
        .collect();
    if versions.is_empty() {
        bail!("apt knows no {PACKAGE_PREFIX}*{PACKAGE_SUFFIX} package: run `apt-get update`");
    }
    versions.sort_by_key(|version| Reverse(numeric_key(version)));
    Ok(versions)
}

/// The versions to test: the newest of the `requested` line (`6.1`,
/// `6.12`, or a full version), or by default the newest 6.1 and the newest
/// of all.
pub fn select(available: &[String], requested: Option<&str>) -> anyhow::Result<Vec<String>> {
    let newest_of = |line: &str| {
        available
            .iter()
            .find(|version| in_line(version, line))
            .cloned()
            .with_context(|| {
                format!(
                    "no kernel {line} among the archive's {}",
                    available.join(", ")
                )
            })
    };
    match requested {
        Some(line) => Ok(vec![newest_of(line)?]),
        None => {
            let mut versions = vec![newest_of(OLDEST_SUPPORTED)?, available[0].clone()];
            versions.dedup();
            Ok(versions)
        }
    }
}

/// Whether `version` belongs to `line`: `6.1` holds 6.1.0-56, not 6.12.1.
fn in_line(version: &str, line: &str) -> bool {
    version
        .strip_prefix(line)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '-', '+']))
}

/// Orders versions by their numbers: 6.12.117+deb12 after 6.1.0-56.
fn numeric_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|number| number.parse().ok())
        .collect()
}

/// The kernel `version`, from the cache or downloaded and unpacked into it.
pub fn fetch(cache: &Path, version: &str) -> anyhow::Result<Kernel> {
    let package = format!("{PACKAGE_PREFIX}{version}{PACKAGE_SUFFIX}");
    let unpacked = cache.join(&package);
    if !unpacked.is_dir() {
        let deb = download(cache, &package)?;
        // Unpacked beside and renamed when complete, so that an interrupted
        // run leaves no half tree that a later run would take as cached.
        let partial = cache.join(format!("{package}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        eprintln!("vm-test: unpacking {}", deb.display());
        checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        let release = release_of(&partial)?;
        // busybox's depmod reads the compressed modules of newer kernels,
        // and needs no kmod on the host.
        checked(
            Command::new("busybox")
                .args(["depmod", "-b"])
                .arg(&partial)
                .arg(&release),
        )?;
        std::fs::rename(&partial, &unpacked)
            .with_context(|| format!("renaming {} to {}", partial.display(), unpacked.display()))?;
    }
    let release = release_of(&unpacked)?;
    Ok(Kernel {
        vmlinuz: unpacked.join(format!("boot/vmlinuz-{release}")),
        modules: unpacked.join("lib/modules").join(&release),
        release,
    })
}

/// The package's .deb in the cache, downloaded unless already there.
fn download(cache: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("{package}_");
    let cached = || {
        find_file(cache, |name| {
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
    };
    if let Some(deb) = cached()? {
        return Ok(deb);
    }
    eprintln!("vm-test: downloading {package}");
    checked(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(cache),
    )?;
    cached()?.with_context(|| format!("apt-get download left no {package}_*.deb"))
}

/// The one directory under lib/modules of an unpacked kernel package.
fn release_of(root: &Path) -> anyhow::Result<String> {
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    match releases.as_slice() {
        [_] => Ok(releases.remove(0)),
        _ => bail!(
            "expected one kernel release in {}, found {releases:?}",
            modules.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(list: &[&str]) -> Vec<String> {
        list.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn a_line_holds_its_own_versions_only() {
        assert!(in_line("6.1.0-56", "6.1"));
        assert!(in_line("6.1.0-56", "6.1.0-56"));
        assert!(!in_line("6.12.117+deb12", "6.1"));
        assert!(in_line("6.12.117+deb12", "6.12"));
    }

    #[test]
    fn default_is_the_newest_6_1_and_the_newest_of_all() {
        let mut available = versions(&["6.1.0-9", "6.12.9+deb12", "6.1.0-56", "6.12.117+deb12"]);
        available.sort_by_key(|version| Reverse(numeric_key(version)));
        assert_eq!(
            select(&available, None).unwrap(),
            versions(&["6.1.0-56", "6.12.117+deb12"])
        );
        assert_eq!(
            select(&available, Some("6.12")).unwrap(),
            versions(&["6.12.117+deb12"])
        );
        assert!(select(&available, Some("5.10")).is_err());
    }
}
