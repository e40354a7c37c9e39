//! Process plumbing shared by the servers: binaries, ports, unprivileged users, clean-up.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

use crate::error::{Result, TestkitError};

/// Finds `binary` on `PATH`, then under `/usr/lib/postgresql/<version>/bin` (newest version first).
pub(crate) fn find_binary(binary: &'static str, package: &'static str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(binary);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin").join(binary)))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .into_iter()
        .map(|(_, path)| path)
        .find(|path| is_executable(path))
        .ok_or(TestkitError::MissingBinary { binary, package })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TestkitError::io("binding a probe socket on 127.0.0.1", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| TestkitError::io("reading the probe socket's address", e))?
        .port();
    Ok(port)
}

/// The unprivileged account that runs PostgreSQL when the tests run as root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    /// `None` when the current user is not root (run as ourselves); the `postgres` user (or
    /// `nobody`) otherwise, since PostgreSQL refuses to run as root.
    pub(crate) fn unprivileged() -> Result<Option<Self>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(user)) = User::from_name(name) {
                return Ok(Some(Self {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                }));
            }
        }
        Err(TestkitError::Usage(
            "running as root but neither a `postgres` nor a `nobody` user exists to run PostgreSQL; install the Debian package `postgresql` (it creates the user)".into(),
        ))
    }

    pub(crate) fn apply(self, command: &mut Command) {
        command.uid(self.uid).gid(self.gid);
    }

    pub(crate) fn chown(self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| TestkitError::io(format!("chown {}", path.display()), e))
    }
}

/// Runs a command to completion; a non-zero exit becomes [`TestkitError::Command`].
pub(crate) fn run(what: &str, command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::io(format!("spawning {what}"), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(TestkitError::Command {
            what: what.to_owned(),
            status: output.status,
            stderr: tail(&String::from_utf8_lossy(&output.stderr), 2000),
        })
    }
}

/// The last `max` bytes of `text` (on a character boundary).
pub(crate) fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].trim().to_owned()
}

/// The end of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => tail(&text, 2000),
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

/// Sends `signal` to a process; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, signal: Signal) -> Result<()> {
    let raw =
        i32::try_from(pid).map_err(|_| TestkitError::Usage(format!("pid {pid} out of range")))?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(TestkitError::io(
            format!("sending {signal} to {pid}"),
            e.into(),
        )),
    }
}

/// Stops a child: `first` signal, up to `grace` to exit, then SIGKILL; always reaps it.
pub(crate) fn stop_child(child: &mut Child, first: Signal, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = signal(child.id(), first);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts a shell that outlives nothing: when this test process exits (even by abort, when no
/// destructor runs, as for servers held in statics), it kills every process whose pid file lies
/// directly below `base` (`*/redis.pid`, `*/postmaster.pid`) and removes `base`.
pub(crate) fn spawn_watchdog(base: &Path) -> Result<()> {
    let script = r#"
parent="$1"; base="$2"
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
for f in "$base"/*/redis.pid "$base"/*/postmaster.pid; do
  [ -f "$f" ] || continue
  pid=$(head -n 1 "$f")
  [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null
done
sleep 1
for f in "$base"/*/redis.pid "$base"/*/postmaster.pid; do
  [ -f "$f" ] || continue
  pid=$(head -n 1 "$f")
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
done
rm -rf "$base"
"#;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg("stanchion-testkit-watchdog")
        .arg(std::process::id().to_string())
        .arg(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group, so a Ctrl-C aimed at the test run does not kill it before clean-up.
    command.process_group(0);
    let child = command
        .spawn()
        .map_err(|e| TestkitError::io("spawning the clean-up watchdog", e))?;
    // Reap it in the background so it never lingers as a zombie of ours.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

/// Polls `probe` until it returns `Ok`, or fails after `timeout` with its last error.
pub(crate) fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) if start.elapsed() >= timeout => {
                return Err(TestkitError::NotReady {
                    what: what.to_owned(),
                    waited: start.elapsed(),
                    detail: last,
                });
            }
            Err(_) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// A temporary base directory for one server or cluster, removed on drop and by the watchdog.
pub(crate) fn base_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| TestkitError::io("creating a temporary directory", e))?;
    spawn_watchdog(dir.path())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_debian_package() {
        let err = find_binary("stanchion-no-such-binary", "some-package").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("stanchion-no-such-binary"), "{text}");
        assert!(text.contains("apt-get install some-package"), "{text}");
    }

    #[test]
    fn finds_a_binary_on_path() {
        assert!(find_binary("sh", "dash").unwrap().ends_with("sh"));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }

    #[test]
    fn wait_until_reports_the_last_error() {
        let err = wait_until::<()>("thing", Duration::from_millis(30), || Err("nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
