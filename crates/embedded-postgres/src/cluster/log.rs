//! The server log (`postgres.log` in the data dir): opening it for the
//! server's stderr (rotated past 10 MiB; never through a symlink) and reading
//! the lines of this start back for error messages.

use std::fs::{self, File};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use nix::libc::{ELOOP, O_NOFOLLOW};

use crate::error::EmbeddedError;

/// The previous log, kept once.
const OLD_LOG_FILE: &str = "postgres.log.old";
/// Size past which the log is rotated at start.
const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// How many log lines an error message carries.
pub(super) const LOG_TAIL_LINES: usize = 20;

/// Opens the log for appending (rotating a large one) and returns it with a
/// read handle and its current length, where this start's lines begin.
pub(super) fn open_log(dir: &Path, log_file: &Path) -> Result<(File, File, u64), EmbeddedError> {
    if fs::symlink_metadata(log_file).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let old = dir.join(OLD_LOG_FILE);
        if let Err(e) = fs::rename(log_file, &old) {
            tracing::warn!(error = %e, log = %log_file.display(), "could not rotate the PostgreSQL log");
        }
    }
    // O_NOFOLLOW: as root, appending through a planted link would write to any file.
    // `filesystem::check_existing` refuses such a link first; this holds if one appears later.
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(O_NOFOLLOW)
        .open(log_file)
        .map_err(|e| open_error("open the PostgreSQL log", log_file, e))?;
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(log_file)
        .map_err(|e| open_error("read the PostgreSQL log", log_file, e))?;
    let offset = file.metadata().map_or(0, |m| m.len());
    Ok((file, reader, offset))
}

/// A failed open; ELOOP is O_NOFOLLOW meeting a link.
fn open_error(action: &'static str, path: &Path, error: io::Error) -> EmbeddedError {
    if error.raw_os_error() == Some(ELOOP) {
        EmbeddedError::SymlinkInDataDir {
            path: path.to_path_buf(),
        }
    } else {
        EmbeddedError::io(action, path, error)
    }
}

/// The last lines written to the log since `offset`, joined into one line.
pub(super) fn log_tail(mut file: &File, offset: u64) -> String {
    let mut read = || -> io::Result<String> {
        let len = file.metadata()?.len();
        let start = offset.max(len.saturating_sub(64 * 1024)).min(len);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(the log is empty)".to_owned(),
        Ok(text) => last_lines(&text, LOG_TAIL_LINES),
        Err(e) => format!("(the log could not be read: {e})"),
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_joins_into_one_line() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(last_lines("", 2), "");
    }
}
