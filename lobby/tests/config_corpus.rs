//! Every `NN_what.yaml` under tests/data/config/invalid/ must be rejected
//! with exactly the errors in `NN_what.expected` beside it (their Display,
//! one a line); every file under valid/ must load. A missing or differing
//! expectation fails.
//!
//! `LOBBY_BLESS=1 cargo test -p lobby --test config_corpus` rewrites the
//! expectations from what the parser says now: review the diff.
use std::{
    fs,
    path::{Path, PathBuf},
};

use lobby::config;

const INVALID: &str = "tests/data/config/invalid";
const VALID: &str = "tests/data/config/valid";

/// The `.yaml` files of a corpus folder, relative to the crate so that the
/// paths in the messages are the same on every machine.
fn corpus(folder: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(folder)
        .unwrap_or_else(|e| panic!("reading {folder}: {e}"))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn invalid_files_fail_with_the_expected_errors() {
    let bless = std::env::var_os("LOBBY_BLESS").is_some();
    let files = corpus(INVALID);
    assert!(files.len() >= 30, "only {} invalid files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let actual = match config::load(file) {
            Ok(config) => format!("(accepted) {config:?}"),
            Err(errors) => errors.to_string(),
        };
        let expected_path = file.with_extension("expected");
        if bless {
            fs::write(&expected_path, format!("{actual}\n")).expect("writing an expectation");
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(expected) if expected.trim_end() == actual => {}
            Ok(expected) => failures.push(format!(
                "{}:\n--- expected\n{}\n--- actual\n{actual}",
                file.display(),
                expected.trim_end()
            )),
            Err(e) => failures.push(format!("{}: {e}", expected_path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_expectation_has_its_file() {
    for entry in fs::read_dir(INVALID).expect("the invalid corpus") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|ext| ext == "expected") {
            assert!(
                path.with_extension("yaml").is_file(),
                "{} has no yaml file",
                path.display()
            );
        }
    }
}

#[test]
fn valid_files_load() {
    let files = corpus(VALID);
    assert!(!files.is_empty());
    for file in &files {
        if let Err(errors) = config::load(file) {
            panic!("{} should be valid:\n{errors}", file.display());
        }
    }
}

#[test]
fn an_unreadable_file_is_one_error_naming_it() {
    let path = Path::new("tests/data/config/no-such-file.yaml");
    let errors = config::load(path).expect_err("a missing file");
    assert_eq!(
        errors.to_string(),
        "tests/data/config/no-such-file.yaml: cannot read: No such file or directory (os error 2)"
    );
    assert_eq!(errors.errors().len(), 1);
    assert_eq!(errors.errors()[0].file, path);
}
