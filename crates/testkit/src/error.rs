//! Errors raised while starting or driving test servers.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in the testkit.
///
/// Messages never contain passwords: URLs are not part of any variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// A server or client binary is not installed.
    #[error(
        "`{binary}` was not found on PATH or under /usr/lib/postgresql/*/bin; install the Debian package `{package}` (apt-get install {package})"
    )]
    MissingBinary {
        /// The executable that was looked for.
        binary: &'static str,
        /// The Debian package that ships it.
        package: &'static str,
    },
    /// An I/O operation of the testkit itself failed.
    #[error("{what}")]
    Io {
        /// What the testkit was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper command exited unsuccessfully.
    #[error("{what} failed with {status}: {stderr}")]
    Command {
        /// The command that failed (program name and role, no secrets).
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its standard error.
        stderr: String,
    },
    /// A server did not become ready in time.
    #[error("{what} was not ready after {waited:?}: {detail}")]
    NotReady {
        /// The server or condition waited for.
        what: String,
        /// How long the testkit waited.
        waited: Duration,
        /// The last observation (a log excerpt or the last error).
        detail: String,
    },
    /// A Redis command issued by the testkit failed.
    #[error("redis command for {what} failed")]
    Redis {
        /// What the testkit was doing.
        what: String,
        /// The client error.
        #[source]
        source: redis::RedisError,
    },
    /// An index or state that does not exist was asked for.
    #[error("{0}")]
    Usage(String),
    /// A log file could not be read while reporting another failure.
    #[error("could not read log {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias for the testkit.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;
