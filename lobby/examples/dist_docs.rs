//! Writes the man pages (lobby.1 and one per subcommand) and the bash, zsh
//! and fish completions, generated from the clap definitions in
//! `lobby::cli`, into the directory given as the only argument.
//! `cargo xtask deb` runs it and places the files where Debian expects them.
//!
//! An example rather than a dependency of xtask: xtask must build on a
//! machine without bpf-linker (it is what installs it), and the lobby crate
//! does not build there.
use std::path::PathBuf;

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .expect("usage: dist_docs OUT_DIR")
        .into();
    std::fs::create_dir_all(&out)?;
    let command = lobby::cli::Cli::command();
    clap_mangen::generate_to(command.clone(), &out)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command.clone(), "lobby", &out)?;
    }
    Ok(())
}
