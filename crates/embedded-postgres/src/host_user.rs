//! The host user: who runs `initdb` and `postgres`. PostgreSQL refuses to run
//! as root, so when this process's effective uid is 0 they run as the
//! `postgres` OS user through `runuser`; otherwise as ourselves. Owns the
//! effective-uid check and the user lookup (both through `nix`: `geteuid`, and
//! `getpwnam_r`, which honours NSS), who may own the data dir, and finding
//! `runuser`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User, geteuid};
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
        uid: Uid,
        gid: Gid,
        runuser: PathBuf,
    },
}

impl RunAs {
    /// [`Self::CurrentUser`] unless this process runs as root.
    pub(crate) fn detect() -> Result<Self, EmbeddedError> {
        if !geteuid().is_root() {
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

    /// Whether `uid` may own the data dir and what is in it: this process's user (root, when
    /// it is root) and the user PostgreSQL runs as. Anyone else could have prepared it to make
    /// us write, chown or delete through it.
    pub(crate) fn may_own(&self, uid: u32) -> bool {
        uid == geteuid().as_raw()
            || matches!(self, Self::Postgres { uid: postgres, .. } if postgres.as_raw() == uid)
    }

    /// The users [`Self::may_own`] accepts, in words for an error message.
    pub(crate) fn owners(&self) -> String {
        match self {
            Self::CurrentUser => format!("this process's user (uid {})", geteuid()),
            Self::Postgres { uid, .. } => format!("root or the `{OS_USER}` user (uid {uid})"),
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

/// The uid and gid of an OS user, looked up through NSS (`getpwnam_r`), so
/// that users from LDAP, systemd-userdb and the like count as well as those in
/// `/etc/passwd`.
fn lookup_os_user(name: &str) -> Result<(Uid, Gid), EmbeddedError> {
    match User::from_name(name) {
        Ok(Some(user)) => Ok((user.uid, user.gid)),
        Ok(None) => Err(EmbeddedError::NoPostgresUser {
            reason: format!("there is no `{name}` user"),
        }),
        Err(e) => Err(EmbeddedError::NoPostgresUser {
            reason: format!("the `{name}` user could not be looked up ({e})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_by_name() {
        let (uid, gid) = lookup_os_user("root").expect("every system has root");
        assert!(uid.is_root());
        assert_eq!(gid.as_raw(), 0);
        assert!(matches!(
            lookup_os_user("rowcast-no-such-user"),
            Err(EmbeddedError::NoPostgresUser { reason }) if reason.contains("no `rowcast-no-such-user` user")
        ));
    }

    #[test]
    fn only_root_switches_users() {
        let run_as = RunAs::detect();
        if geteuid().is_root() {
            // Root needs the `postgres` user and runuser; either it has them or says so.
            match run_as {
                Ok(run_as) => assert!(run_as.is_other_user()),
                Err(e) => assert!(matches!(
                    e,
                    EmbeddedError::NoPostgresUser { .. } | EmbeddedError::RunuserNotFound
                )),
            }
        } else {
            assert!(matches!(run_as, Ok(RunAs::CurrentUser)));
        }
    }
}
