//! Hostile input ends in a clear error, quickly and in bounded memory, and
//! nothing makes the parser panic.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use lobby::config;
use proptest::{prelude::*, test_runner::FileFailurePersistence};

/// What the operator is promised for any input.
const PROMPT: Duration = Duration::from_secs(1);

/// The one error for `text`, and how long it took to say so.
fn rejected(text: &str) -> (String, Duration) {
    let start = Instant::now();
    let result = config::parse(text, Path::new("hostile.yaml"));
    let elapsed = start.elapsed();
    let errors = result.expect_err("hostile input must be rejected");
    assert_eq!(errors.errors().len(), 1, "{errors}");
    (errors.to_string(), elapsed)
}

#[test]
fn ten_megabytes_of_flow_nesting() {
    let (error, elapsed) = rejected(&"[".repeat(10 << 20));
    assert!(error.contains("nesting"), "{error}");
    assert!(elapsed < PROMPT, "took {elapsed:?}");
}

#[test]
fn ten_megabytes_of_block_nesting() {
    let (error, elapsed) = rejected(&"- ".repeat(5 << 20));
    assert_eq!(error, "hostile.yaml:1:67: nesting deeper than 32 levels");
    assert!(elapsed < PROMPT, "took {elapsed:?}");
}

#[test]
fn a_billion_laughs() {
    let mut text = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (previous, anchor) in ('a'..='i').zip('b'..='j') {
        let aliases = vec![format!("*{previous}"); 10].join(", ");
        text.push_str(&format!("{anchor}: &{anchor} [{aliases}]\n"));
    }
    let (error, elapsed) = rejected(&text);
    assert!(error.contains("document too large"), "{error}");
    assert!(elapsed < PROMPT, "took {elapsed:?}");
}

/// The one error of reading `path`, which must come at once.
fn unreadable(path: &Path) -> String {
    let start = Instant::now();
    let errors = config::load(path).expect_err("must be refused");
    let elapsed = start.elapsed();
    assert!(elapsed < PROMPT, "{} took {elapsed:?}", path.display());
    assert_eq!(errors.errors().len(), 1, "{errors}");
    errors.to_string()
}

/// Opening a FIFO for reading would wait for a writer forever: it is
/// refused without waiting.
#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.yaml");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    assert_eq!(
        unreadable(&path),
        format!(
            "{}: not a regular file but a FIFO (named pipe); the configuration must be a regular file",
            path.display()
        )
    );
}

/// /dev/zero never ends: it is refused before a byte is read, also behind
/// a symlink.
#[test]
fn a_device_behind_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.yaml");
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    assert!(unreadable(&path).ends_with(
        "not a regular file but a character device; the configuration must be a regular file"
    ),);
    assert!(unreadable(dir.path()).contains("not a regular file but a directory"));
}

/// A file beyond the cap is refused by its size, without reading it.
#[test]
fn a_file_beyond_the_size_cap_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.yaml");
    // Sparse: 100 MiB that costs no disk.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    assert!(unreadable(&path).ends_with(&format!(
        "too large (104857600 bytes); the configuration may be at most {} bytes",
        config::MAX_FILE_SIZE
    )));
    // At the cap exactly, the file is read (and found to be no YAML
    // mapping, since it holds only NUL bytes).
    std::fs::File::create(&path)
        .unwrap()
        .set_len(config::MAX_FILE_SIZE)
        .unwrap();
    assert!(!unreadable(&path).contains("too large"));
}

/// Documents built from YAML's punctuation and Lobby's keys, so that
/// generated input reaches validation as well as the parser.
fn yamlish() -> impl Strategy<Value = String> {
    const FRAGMENTS: &[&str] = &[
        "lb:",
        "targets:",
        "upstream_group:",
        "upstreams:",
        "health_check:",
        "probe:",
        "dns:",
        "name: a",
        "port: 80",
        "host: 1.2.3.4",
        "<<: *a",
        "&a",
    ];
    let token = prop_oneof![
        prop::sample::select(FRAGMENTS).prop_map(str::to_owned),
        "[-:{}\\[\\],&*!|>'\"#?%@` \t\n]{1,3}".prop_map(String::from),
        "[a-z0-9._]{1,8}".prop_map(String::from),
        (0usize..6).prop_map(|n| format!("\n{}", "  ".repeat(n))),
    ];
    proptest::collection::vec(token, 0..64).prop_map(|tokens| tokens.join(" "))
}

proptest! {
    // proptest's default file of failing cases belongs next to a crate's
    // lib.rs or main.rs, which a test under tests/ has not: it could not
    // write it, and a case that failed once (the NUL of stop 18) was not
    // replayed by the next run. Cargo runs tests in the package's folder.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/config_hostile.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = config::parse(&String::from_utf8_lossy(&bytes), Path::new("fuzz.yaml"));
    }

    #[test]
    fn yamlish_documents_never_panic(text in yamlish()) {
        let _ = config::parse(&text, Path::new("fuzz.yaml"));
    }

    /// A valid file with one character changed is accepted or rejected
    /// with located errors, never a panic.
    #[test]
    fn mutated_valid_files_never_panic(at in any::<prop::sample::Index>(), c in any::<char>()) {
        let original = include_str!("data/config/valid/original.yaml");
        let chars: Vec<char> = original.chars().collect();
        let at = at.index(chars.len());
        // Replace one character, and cut a few off the end.
        let text: String = chars[..chars.len() - at % 7]
            .iter()
            .enumerate()
            .map(|(i, o)| if i == at { c } else { *o })
            .collect();
        if let Err(errors) = config::parse(&text, Path::new("fuzz.yaml")) {
            prop_assert!(errors.errors().iter().all(|e| e.line >= 1 && e.column >= 1));
        }
    }
}
