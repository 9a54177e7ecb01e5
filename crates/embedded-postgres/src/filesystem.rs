//! The file system: creating the data dir (and an ephemeral cluster's
//! uniquely named one), its permissions and, as root, its ownership, and the
//! checks that keep this crate from touching a dir that is not its own: the
//! path is normalised lexically before anything is created and then resolved
//! through symlinks, and as root the `postgres` user must be able to reach it.
//!
//! An existing data dir is trusted only if no other local user could have
//! prepared it: the default `/var/tmp/rowcast` sits in a world-writable dir,
//! and as root this crate appends to `postgres.log`, removes a stale
//! `pgdata/postmaster.pid` and chowns the dir, so a planted symlink would make
//! root write or delete anywhere. [`check_existing`] therefore refuses a data
//! dir that is a symlink, is owned by anyone but us or the server's user, is
//! writable by others, or holds a symlink, a foreign-owned entry, or anything
//! this crate does not put there. A new dir is created 0700 at once, so
//! nobody can slip an entry in before its mode is set.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::error::EmbeddedError;
use crate::host_user::RunAs;
use crate::{HELPER_TIMEOUT, LOG_FILE, PGDATA_DIR};

/// Name prefix of an ephemeral cluster's dir.
const EPHEMERAL_PREFIX: &str = "rowcast-pg-";

/// Absolute and lexically normalised (`.` and `..` resolved), so that
/// [`create_dirs`] only ever touches dirs below the first existing ancestor.
pub(crate) fn absolute(path: &Path) -> Result<PathBuf, EmbeddedError> {
    let abs = std::path::absolute(path).map_err(|e| EmbeddedError::io("resolve", path, e))?;
    let mut normal = PathBuf::new();
    for component in abs.components() {
        match component {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    Ok(normal)
}

pub(crate) fn canonicalize(path: &Path) -> Result<PathBuf, EmbeddedError> {
    fs::canonicalize(path).map_err(|e| EmbeddedError::io("resolve", path, e))
}

/// Creates `path` and its missing parents; returns the dirs it created,
/// outermost first.
pub(crate) fn create_dirs(path: &Path) -> Result<Vec<PathBuf>, EmbeddedError> {
    let missing: Vec<&Path> = path.ancestors().take_while(|p| !p.exists()).collect();
    let mut created = Vec::new();
    for dir in missing.into_iter().rev() {
        // The data dir itself is private from birth; parents get the umask's mode and, as
        // root, 0755 in `prepare_dirs`.
        let mode = if dir == path { 0o700 } else { 0o777 };
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => created.push(dir.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(EmbeddedError::io("create dir", dir, e)),
        }
    }
    Ok(created)
}

pub(crate) fn create_unique_dir(parent: &Path) -> Result<PathBuf, EmbeddedError> {
    let mut last_error = None;
    for _ in 0..16 {
        let dir = parent.join(format!("{EPHEMERAL_PREFIX}{:016x}", rand::random::<u64>()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(EmbeddedError::io("create dir in", parent, e)),
        }
    }
    Err(EmbeddedError::io(
        "create a uniquely named dir in",
        parent,
        last_error.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
    ))
}

/// Refuses an existing data dir that another local user could have prepared
/// (see the module doc) or that holds anything but what this crate puts there,
/// so that a mistyped path (`/tmp`, `$HOME`) is never chowned or chmodded
/// either. `dir` is the path as given (absolute, not resolved): it must not
/// be a symlink itself.
pub(crate) fn check_existing(run_as: &RunAs, dir: &Path) -> Result<(), EmbeddedError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| EmbeddedError::io("inspect", dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(EmbeddedError::DataDirIsSymlink {
            dir: dir.to_path_buf(),
        });
    }
    check_owner(run_as, dir, &meta)?;
    // Group or world write: others could have added, renamed or replaced entries.
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(EmbeddedError::WritableByOthers {
            dir: dir.to_path_buf(),
            mode,
        });
    }
    let entries = fs::read_dir(dir).map_err(|e| EmbeddedError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EmbeddedError::io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with(PGDATA_DIR)
            || name.starts_with(LOG_FILE)
            || name.starts_with(".s.PGSQL.")
            || name == "lost+found";
        if !ours {
            return Err(EmbeddedError::DirNotDedicated {
                dir: dir.to_path_buf(),
                entry: name.into_owned(),
            });
        }
        let path = entry.path();
        // Not followed: the entry itself.
        let meta =
            fs::symlink_metadata(&path).map_err(|e| EmbeddedError::io("inspect", &path, e))?;
        if meta.file_type().is_symlink() {
            return Err(EmbeddedError::SymlinkInDataDir { path });
        }
        check_owner(run_as, &path, &meta)?;
    }
    Ok(())
}

fn check_owner(run_as: &RunAs, path: &Path, meta: &fs::Metadata) -> Result<(), EmbeddedError> {
    if run_as.may_own(meta.uid()) {
        Ok(())
    } else {
        Err(EmbeddedError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: run_as.owners(),
        })
    }
}

/// Permissions: the data dir is 0700 (trust auth: whoever reaches the socket
/// is superuser) and, as root, owned by `postgres`; parents we created are
/// 0755 so that `postgres` can traverse them whatever the umask.
pub(crate) fn prepare_dirs(
    run_as: &RunAs,
    created: &[PathBuf],
    dir: &Path,
) -> Result<(), EmbeddedError> {
    if run_as.is_other_user() {
        for parent in created.iter().filter(|p| p.as_path() != dir) {
            set_mode(parent, 0o755)?;
        }
    }
    set_mode(dir, 0o700)?;
    if let RunAs::Postgres { uid, gid, .. } = run_as {
        // lchown: never through a link, whatever happened to the path since it was checked.
        std::os::unix::fs::lchown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(|e| EmbeddedError::io("give the postgres user the dir", dir, e))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| EmbeddedError::io("set permissions of", path, e))
}

/// As root: checks that `postgres` can write the data dir (and so traverse
/// all its parents).
pub(crate) async fn check_accessible(run_as: &RunAs, dir: &Path) -> Result<(), EmbeddedError> {
    let mut cmd = run_as.command(Path::new("/bin/sh"));
    cmd.args([
        "-c",
        r#"test -d "$1" && test -w "$1" && test -x "$1""#,
        "rowcast-pg-check",
    ])
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    match tokio::time::timeout(HELPER_TIMEOUT, cmd.status()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(_)) => Err(EmbeddedError::NotAccessible {
            dir: dir.to_path_buf(),
        }),
        Ok(Err(e)) => Err(EmbeddedError::io("run runuser to check", dir, e)),
        Err(_) => Err(EmbeddedError::io(
            "run runuser to check",
            dir,
            io::ErrorKind::TimedOut.into(),
        )),
    }
}

/// Removes a dir tree; a missing one is fine, other failures are logged.
pub(crate) fn remove_dir_if_exists(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "could not remove dir"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_lexically() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c/")).ok(),
            Some(PathBuf::from("/a/c"))
        );
        assert!(absolute(Path::new("rel")).is_ok_and(|p| p.is_absolute()));
    }

    #[test]
    fn only_a_dedicated_dir_is_accepted() {
        let parent = std::env::temp_dir();
        let dir = create_unique_dir(&parent).expect("test: create dir");
        assert!(dir.starts_with(&parent));
        let run_as = RunAs::CurrentUser;
        assert_eq!(mode_of(&dir), 0o700, "created private");
        check_existing(&run_as, &dir).expect("an empty dir is ours");
        fs::create_dir(dir.join(PGDATA_DIR)).expect("test: create pgdata");
        fs::write(dir.join(LOG_FILE), "").expect("test: write log");
        check_existing(&run_as, &dir).expect("a dir we used before is ours");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).expect("test: chmod");
        assert!(matches!(
            check_existing(&run_as, &dir),
            Err(EmbeddedError::WritableByOthers { mode: 0o770, .. })
        ));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("test: chmod");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("postgres.log.old"))
            .expect("test: symlink");
        assert!(matches!(
            check_existing(&run_as, &dir),
            Err(EmbeddedError::SymlinkInDataDir { path }) if path.ends_with("postgres.log.old")
        ));
        fs::remove_file(dir.join("postgres.log.old")).expect("test: unlink");
        fs::write(dir.join("notes.txt"), "").expect("test: write");
        assert!(matches!(
            check_existing(&run_as, &dir),
            Err(EmbeddedError::DirNotDedicated { entry, .. }) if entry == "notes.txt"
        ));
        remove_dir_if_exists(&dir);
        assert!(!dir.exists());
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).expect("test: stat").mode() & 0o7777
    }

    #[test]
    fn create_dirs_reports_what_it_created() {
        let root = create_unique_dir(&std::env::temp_dir()).expect("test: create dir");
        let deep = root.join("a").join("b");
        assert_eq!(
            create_dirs(&deep).expect("test: create"),
            vec![root.join("a"), deep.clone()]
        );
        assert_eq!(mode_of(&deep), 0o700, "the data dir is private from birth");
        assert!(create_dirs(&deep).expect("test: again").is_empty());
        remove_dir_if_exists(&root);
    }
}
