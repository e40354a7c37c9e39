//! Tests that run parts of themselves as separate processes (to kill them with SIGKILL): the
//! test binary starts itself again with an environment that tells its `main` which part to
//! play. Such a binary runs without the libtest harness (`harness = false`).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// Runs the tests of a harness-less binary: `--list` lists `tests`' names, other arguments
/// that do not start with `-` are name filters (a test runs if its name contains one), and
/// each test chosen runs in order, reported as [`run_as_test`] does. A failure panics.
pub fn run_tests(tests: &[(&str, &dyn Fn())]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", chosen.len());
    for (name, test) in &chosen {
        println!("test {name} ...");
        test();
        println!("test {name} ... ok");
    }
    println!(
        "\ntest result: ok. {} passed; 0 failed; 0 ignored; 0 measured; {} filtered out\n",
        chosen.len(),
        tests.len() - chosen.len()
    );
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so that a test failing
/// before it exits leaves no process behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The runtime a harness-less test binary runs its tests and children on: multi-threaded, two
/// workers (as `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`), time and I/O on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Waits up to `within` for `child` to exit and returns its status (`None`: still running).
/// Unlike `Child::wait`, it leaves the child's stdin open: closing it makes a child that called
/// [`exit_with_parent`] exit at once, with success, whatever it was doing.
pub async fn exited(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if started.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
