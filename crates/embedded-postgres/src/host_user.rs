//! The host user: who runs `initdb` and `postgres`. PostgreSQL refuses to run
//! as root, so when this process's effective uid is 0 they run as the
//! `postgres` OS user through `runuser`; otherwise as ourselves. Owns the
//! effective-uid check, the user lookup and finding `runuser`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::error::EmbeddedError;

/// OS user that runs the server when this process runs as root.
const OS_USER: &str = "postgres";

/// Who runs `initdb` and `postgres`.
#[derive(Debug, Clone)]
pub(crate) enum RunAs {
    /// This process's own user (not root).
    CurrentUser,
    /// The `postgres` user, via `runuser`, because we are root.
    Postgres {
        uid: u32,
        gid: u32,
        runuser: PathBuf,
    },
}

impl RunAs {
    /// [`Self::CurrentUser`] unless this process runs as root.
    pub(crate) fn detect() -> Result<Self, EmbeddedError> {
        if effective_uid()? != 0 {
            return Ok(Self::CurrentUser);
        }
        let (uid, gid) = lookup_os_user(OS_USER)?;
        let runuser = find_runuser().ok_or(EmbeddedError::RunuserNotFound)?;
        Ok(Self::Postgres { uid, gid, runuser })
    }

    /// A command that runs `program` as the right user, with a neutral
    /// working dir and locale.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut cmd = match self {
            Self::CurrentUser => Command::new(program),
            Self::Postgres { runuser, .. } => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", OS_USER, "--"]).arg(program);
                cmd
            }
        };
        cmd.current_dir("/").env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    /// What to put before a command so that it runs as the right user:
    /// nothing, or `runuser -u postgres --`.
    pub(crate) fn runuser_prefix(&self) -> Vec<OsString> {
        match self {
            Self::CurrentUser => Vec::new(),
            Self::Postgres { runuser, .. } => {
                vec![runuser.into(), "-u".into(), OS_USER.into(), "--".into()]
            }
        }
    }

    /// Whether PostgreSQL runs as another user than this process.
    pub(crate) fn is_other_user(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }
}

fn find_runuser() -> Option<PathBuf> {
    let fixed = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    fixed
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("runuser"))
        .find(|p| p.is_file())
}

/// Effective uid from `/proc/self/status` (no `unsafe` libc call), falling
/// back to `id -u`.
fn effective_uid() -> Result<u32, EmbeddedError> {
    if let Some(uid) = fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(parse_effective_uid)
    {
        return Ok(uid);
    }
    let output = std::process::Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EmbeddedError::io("run", Path::new("id"), e))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            EmbeddedError::io(
                "find the effective uid with",
                Path::new("id -u"),
                io::Error::new(io::ErrorKind::InvalidData, "unexpected output"),
            )
        })
}

/// The second field of the `Uid:` line (real, effective, saved, fs).
fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// uid and gid of an OS user, from `/etc/passwd`.
fn lookup_os_user(name: &str) -> Result<(u32, u32), EmbeddedError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| EmbeddedError::NoPostgresUser {
        reason: format!("/etc/passwd could not be read ({e})"),
    })?;
    parse_passwd(&passwd, name).ok_or_else(|| EmbeddedError::NoPostgresUser {
        reason: format!("there is no `{name}` user in /etc/passwd"),
    })
}

fn parse_passwd(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
        assert!(
            parse_effective_uid(&fs::read_to_string("/proc/self/status").unwrap_or_default())
                .is_some()
        );
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(parse_passwd(passwd, "postgres"), Some((101, 104)));
        assert_eq!(parse_passwd(passwd, "postgre"), None);
    }
}
