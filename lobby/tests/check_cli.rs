//! `lobby check`: exit codes and what it prints.
use std::process::{Command, Output};

fn check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lobby"))
        .arg("check")
        .args(args)
        .output()
        .expect("running lobby check")
}

#[test]
fn a_valid_file_exits_0_with_a_summary() {
    let output = check(&["-c", "tests/data/config/valid/original.yaml"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "tests/data/config/valid/original.yaml: valid: 2 targets, 4 upstreams (2 health-checked, 2 FQDN)\n"
    );
}

#[test]
fn a_group_with_every_weight_0_is_valid_with_a_located_warning() {
    let output = check(&["-c", "tests/data/config/valid/selection.yaml"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "warning: tests/data/config/valid/selection.yaml:44:13: lb[0].targets[3].upstream_group.upstreams: \
         every upstream has weight 0: the target refuses every new connection\n"
    );
}

#[test]
fn an_invalid_file_exits_1_with_every_error() {
    let output = check(&["-c", "tests/data/config/invalid/42_many_errors.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    let expected = std::fs::read_to_string("tests/data/config/invalid/42_many_errors.expected")
        .expect("the expectation");
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected);
}

#[test]
fn without_a_file_it_says_where_it_looked() {
    if config_installed() {
        eprintln!("skipped: a configuration is installed under /etc/lobby");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let output = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .arg("check")
        .current_dir(dir)
        .output()
        .expect("running lobby check");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "no configuration file: -c not given and none of ./lobby.yaml, /etc/lobby/lobby.yaml, ./lobby.conf, /etc/lobby/lobby.conf exists\n"
    );
}

fn config_installed() -> bool {
    ["/etc/lobby/lobby.yaml", "/etc/lobby/lobby.conf"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}
