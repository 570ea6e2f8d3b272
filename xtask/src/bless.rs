//! Rewrites the expectation files of the golden tests from what the code
//! produces now; the diff is then reviewed like code.
use crate::cmd::{cargo, checked, workspace_root};

pub fn run() -> anyhow::Result<()> {
    for test in ["golden", "config_corpus"] {
        checked(
            cargo()
                .current_dir(workspace_root())
                .args(["test", "-p", "lobby", "--test", test])
                .env("LOBBY_BLESS", "1"),
        )?;
    }
    eprintln!("bless: expectations rewritten; review them with git diff");
    Ok(())
}
