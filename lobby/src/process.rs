//! Running a helper program (nft, ip) with a script on its standard input.
use std::process::{Output, Stdio};

use tokio::{io::AsyncWriteExt as _, process::Command};

/// Runs `command` with `input` on stdin and collects its output. Input is
/// written while output is read: a program that reports as it reads would
/// otherwise fill its output pipe and stall both sides.
pub async fn run_with_input(command: &mut Command, input: String) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let writer = tokio::spawn(async move {
        // A write error means the program exited early; its status and
        // stderr say why.
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let output = child.wait_with_output().await;
    let _ = writer.await;
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_program_that_answers_while_reading_does_not_stall() {
        // cat echoes each chunk as it reads it: 4 MiB is far more than a
        // pipe holds.
        let input = "x".repeat(4 << 20);
        let output = run_with_input(&mut Command::new("cat"), input.clone())
            .await
            .unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout.len(), input.len());
    }
}
