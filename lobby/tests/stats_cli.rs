//! `lobby stats` against a control socket served in this process.
use std::process::{Command, Stdio};

use lobby::ctl::{self, Request, StatsReport, TargetStats};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_closed_stdout_ends_stats_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.sock");
    let listener = ctl::bind(&path).await.unwrap();
    let (requests, mut incoming) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    let server = tokio::spawn(ctl::serve(listener, path.clone(), requests, cancel.clone()));
    let answered = tokio::spawn(async move {
        let Some(Request::Stats(reply)) = incoming.recv().await else {
            panic!("no request")
        };
        let target = TargetStats {
            denied: Default::default(),
            name: "web".into(),
            protocol: "tcp".into(),
            port: 8081,
            upstream_group: "pool".into(),
            distribution: "round-robin".into(),
            upstreams: Vec::new(),
        };
        reply
            .send(StatsReport {
                targets: vec![target],
            })
            .unwrap();
    });
    // `lobby stats --json | head -0`: the reader is gone before lobby writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut stats = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["stats", "--json", "--socket"])
        .arg(&path)
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("running lobby stats");
    let stderr = stats.stderr.take().unwrap();
    let output = tokio::task::spawn_blocking(move || {
        let status = stats.wait().unwrap();
        (status, std::io::read_to_string(stderr).unwrap())
    })
    .await
    .unwrap();
    answered.await.unwrap();
    let (status, stderr) = output;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
    cancel.cancel();
    server.await.unwrap();
}
