//! [`EmbeddedOptions`]: the optional settings of a start (bin dir, start
//! timeout, extra server settings).

use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Optional settings for [`EmbeddedPostgres::start_with`] and
/// [`EmbeddedPostgres::start_ephemeral_with`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub(crate) bin_dir: Option<PathBuf>,
    pub(crate) start_timeout: Duration,
    pub(crate) settings: Vec<(String, String)>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            bin_dir: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            settings: Vec::new(),
        }
    }
}

impl EmbeddedOptions {
    /// The defaults: binaries found automatically, 30 s start timeout.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Use the `initdb` and `postgres` in `dir` instead of searching
    /// (the newest `/usr/lib/postgresql/*/bin`, then `PATH`).
    #[must_use]
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// How long to wait for the server to accept connections (default 30 s;
    /// crash recovery of a large persistent cluster may need more).
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// An extra server setting, passed as `-c name=value` (after ours, so it
    /// wins).
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }
}
