//! Tests that run parts of themselves as separate processes (to kill them with SIGKILL): the
//! test binary starts itself again with an environment that tells its `main` which part to
//! play. Such a binary runs without the libtest harness (`harness = false`).

use std::process::{Child, Command, Stdio};

use crate::error::{Result, TestkitError};

/// Starts this test binary again with `env` added, its stdin a pipe held by the returned
/// [`Child`] (see [`exit_with_parent`]), stdout discarded and stderr shared (a child's panic
/// shows in the test output).
pub fn spawn_self(env: &[(&str, &str)]) -> Result<Child> {
    let exe =
        std::env::current_exe().map_err(|e| TestkitError::io("finding the test binary", e))?;
    Command::new(exe)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| TestkitError::io("starting the test binary again", e))
}

/// In a child started by [`spawn_self`]: exits the process once the parent is gone (its end of
/// our stdin closes), so that a failed or killed test leaves no child behind.
pub fn exit_with_parent() {
    std::thread::spawn(|| {
        use std::io::Read;
        let mut buf = [0u8; 64];
        while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
}

/// Runs `test` and reports it in libtest's words (`test NAME ... ok`, `test result: ok. 1
/// passed`), so that tools counting test results count a harness-less test too. A failure
/// panics, which fails the binary.
pub fn run_as_test(name: &str, test: impl FnOnce()) {
    println!("\nrunning 1 test");
    test();
    println!(
        "test {name} ... ok\n\n\
         test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n"
    );
}
