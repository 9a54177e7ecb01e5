//! Data dirs another local user prepared: the default one lives in world-writable `/var/tmp`,
//! and as root the crate appends to `postgres.log`, removes a stale `pgdata/postmaster.pid` and
//! chowns the dir. Each hostile shape — a symlinked log, a symlinked `pgdata`, a symlinked data
//! dir, a foreign owner, group or world write — must be refused with a message saying what to
//! fix, before anything outside the dir (or the dir itself) is touched. All are refused before a
//! server starts, so these tests are quick.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rowcast_embedded_postgres::{EmbeddedError, EmbeddedPostgres};

/// A new, empty dir (mode 0755, ours) under the temp dir.
fn scratch_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ep-hostile-{name}-{}-{:x}",
        std::process::id(),
        nanos % (1 << 32)
    ));
    fs::create_dir(&dir).expect("test: create scratch dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("test: chmod");
    dir
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("test: stat").mode() & 0o7777
}

/// Starts a cluster in `dir`, which must be refused; returns the error and its message.
async fn refused(dir: &Path) -> (EmbeddedError, String) {
    match EmbeddedPostgres::start(dir).await {
        Ok(cluster) => {
            let _ = cluster.stop().await;
            panic!("{} was accepted", dir.display());
        }
        Err(e) => {
            let message = e.to_string();
            (e, message)
        }
    }
}

#[tokio::test]
async fn a_symlinked_log_is_refused_and_its_target_untouched() {
    let dir = scratch_dir("log");
    let outside = scratch_dir("log-victim");
    let victim = outside.join("victim.conf");
    fs::write(&victim, "precious\n").expect("test: write victim");
    symlink(&victim, dir.join("postgres.log")).expect("test: symlink");

    let (error, message) = refused(&dir).await;
    assert!(
        matches!(&error, EmbeddedError::SymlinkInDataDir { path } if path.ends_with("postgres.log")),
        "{error:?}"
    );
    assert!(message.contains("symbolic link") && message.contains("remove the link"));
    assert_eq!(
        fs::read_to_string(&victim).expect("test: read"),
        "precious\n"
    );
    assert_eq!(mode(&dir), 0o755, "the refused dir is not chmodded");
    fs::remove_dir_all(&dir).expect("test: cleanup");
    fs::remove_dir_all(&outside).expect("test: cleanup");
}

#[tokio::test]
async fn a_symlinked_pgdata_is_refused_and_the_other_cluster_keeps_its_lock_file() {
    let dir = scratch_dir("pgdata");
    let outside = scratch_dir("pgdata-victim");
    // Looks like a cluster of the installed version (so the start would get as far as its lock
    // file) with a postmaster.pid naming a live non-postgres process (pid 1): exactly what the
    // crate removes as stale in its own dir.
    let other = outside.join("cluster");
    fs::create_dir(&other).expect("test: create cluster");
    let version = fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(Result::ok)
        .map_or_else(
            || "15".to_owned(),
            |e| e.file_name().to_string_lossy().into_owned(),
        );
    fs::write(other.join("PG_VERSION"), format!("{version}\n")).expect("test: write");
    fs::write(other.join("postmaster.pid"), "1\n").expect("test: write");
    symlink(&other, dir.join("pgdata")).expect("test: symlink");

    let (error, message) = refused(&dir).await;
    assert!(
        matches!(&error, EmbeddedError::SymlinkInDataDir { path } if path.ends_with("pgdata")),
        "{error:?}"
    );
    assert!(message.contains("symbolic link"), "{message}");
    assert!(
        other.join("postmaster.pid").is_file(),
        "the other cluster's lock file is still there"
    );
    assert!(!dir.join("postgres.log").exists(), "nothing was written");
    fs::remove_dir_all(&dir).expect("test: cleanup");
    fs::remove_dir_all(&outside).expect("test: cleanup");
}

#[tokio::test]
async fn a_symlinked_data_dir_is_refused_and_its_target_untouched() {
    let parent = scratch_dir("link");
    let target = parent.join("real");
    fs::create_dir(&target).expect("test: create");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).expect("test: chmod");
    let link = parent.join("data");
    symlink(&target, &link).expect("test: symlink");

    let (error, message) = refused(&link).await;
    assert!(
        matches!(&error, EmbeddedError::DataDirIsSymlink { .. }),
        "{error:?}"
    );
    assert!(message.contains("pass the real path"), "{message}");
    assert_eq!(mode(&target), 0o755);
    assert_eq!(fs::read_dir(&target).expect("test: list").count(), 0);
    fs::remove_dir_all(&parent).expect("test: cleanup");
}

#[tokio::test]
async fn a_dir_writable_by_others_is_refused_untouched() {
    for loose in [0o777, 0o770, 0o1777] {
        let dir = scratch_dir("loose");
        fs::set_permissions(&dir, fs::Permissions::from_mode(loose)).expect("test: chmod");
        let (error, message) = refused(&dir).await;
        assert!(
            matches!(&error, EmbeddedError::WritableByOthers { mode, .. } if *mode == loose),
            "{error:?}"
        );
        assert!(message.contains("chmod 700"), "{message}");
        assert_eq!(mode(&dir), loose, "not chmodded");
        assert_eq!(fs::read_dir(&dir).expect("test: list").count(), 0);
        fs::remove_dir_all(&dir).expect("test: cleanup");
    }
}

/// Needs root (to chown to `nobody`); skipped otherwise.
#[tokio::test]
async fn a_dir_or_an_entry_owned_by_another_user_is_refused_untouched() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: chowning to another user needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("test: user lookup")
        .expect("test: a nobody user");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());

    let dir = scratch_dir("foreign-owner");
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("test: chown");
    let (error, message) = refused(&dir).await;
    assert!(
        matches!(&error, EmbeddedError::ForeignOwner { owner, .. } if *owner == uid),
        "{error:?}"
    );
    assert!(message.contains("owned by uid"), "{message}");
    let meta = fs::metadata(&dir).expect("test: stat");
    assert_eq!(meta.uid(), uid, "not chowned to postgres");
    assert_eq!(mode(&dir), 0o755, "not chmodded");
    fs::remove_dir_all(&dir).expect("test: cleanup");

    // Our dir, but a log someone else made (as if it had been writable once).
    let dir = scratch_dir("foreign-entry");
    fs::write(dir.join("postgres.log"), "theirs\n").expect("test: write");
    std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid)).expect("test: chown");
    let (error, _) = refused(&dir).await;
    assert!(
        matches!(&error, EmbeddedError::ForeignOwner { path, .. } if path.ends_with("postgres.log")),
        "{error:?}"
    );
    assert_eq!(
        fs::read_to_string(dir.join("postgres.log")).expect("test: read"),
        "theirs\n"
    );
    fs::remove_dir_all(&dir).expect("test: cleanup");
}
