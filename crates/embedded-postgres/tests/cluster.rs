//! Real clusters: these start PostgreSQL (the server binaries must be installed; as root the
//! crate runs them as the `postgres` user) and check what the crate promises: an ephemeral
//! cluster serves over its socket only and is gone after `stop`, a persistent one keeps its data
//! and refuses a second server, a dir holding other files is never used, and a cluster does not
//! outlive an owner killed with SIGKILL.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rowcast_embedded_postgres::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// A new, empty dir under the temp dir, traversable by the `postgres` user.
fn scratch_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Short: the socket path inside must fit in 107 bytes.
    let dir = std::env::temp_dir().join(format!(
        "ep-test-{name}-{}-{:x}",
        std::process::id(),
        nanos % (1 << 32)
    ));
    fs::create_dir(&dir).expect("test: create scratch dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("test: chmod");
    dir
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("test: connect through the cluster's URL");
    tokio::spawn(connection);
    client
}

/// The first column of the first row of `sql`.
async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.expect("test: query");
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .expect("test: a row")
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("test: stat").permissions().mode() & 0o777
}

#[tokio::test]
async fn ephemeral_cluster_serves_on_its_socket_and_is_removed_on_stop() {
    let parent = scratch_dir("ephemeral");
    let cluster = EmbeddedPostgres::start_ephemeral(&parent)
        .await
        .expect("start an ephemeral cluster");
    let dir = cluster.data_dir().to_path_buf();
    assert!(cluster.is_ephemeral());
    assert!(dir.starts_with(fs::canonicalize(&parent).expect("test: resolve")));
    assert_eq!(
        mode(&dir),
        0o700,
        "trust auth: only the owner may reach the socket"
    );
    assert!(dir.join(".s.PGSQL.5432").exists());
    assert!(cluster.log_file().starts_with(&dir));
    if nix::unistd::geteuid().is_root() {
        let postgres = nix::unistd::User::from_name("postgres")
            .expect("test: user lookup")
            .expect("test: a postgres user");
        let owner = fs::metadata(&dir).expect("test: stat").uid();
        assert_eq!(
            owner,
            postgres.uid.as_raw(),
            "as root the data dir goes to postgres"
        );
    }

    let client = connect(&cluster.url("postgres")).await;
    assert_eq!(scalar(&client, "SELECT current_user").await, "postgres");
    assert_eq!(scalar(&client, "SHOW listen_addresses").await, "");
    assert_eq!(scalar(&client, "SHOW fsync").await, "off");
    client
        .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1), (2)")
        .await
        .expect("test: write");
    assert_eq!(scalar(&client, "SELECT sum(n) FROM t").await, "3");
    drop(client);

    cluster.stop().await.expect("stop the cluster");
    assert!(
        !dir.exists(),
        "an ephemeral cluster's dir is removed by stop"
    );
    fs::remove_dir_all(&parent).expect("test: cleanup");
}

#[tokio::test]
async fn persistent_cluster_keeps_its_data_and_refuses_a_second_server() {
    let parent = scratch_dir("persistent");
    let data_dir = parent.join("data");
    let options = EmbeddedOptions::new().setting("application_name", "embedded-postgres-test");
    let cluster = EmbeddedPostgres::start_with(&data_dir, &options)
        .await
        .expect("start a persistent cluster");
    assert!(!cluster.is_ephemeral());
    let client = connect(&cluster.url("postgres")).await;
    assert_eq!(
        scalar(&client, "SHOW application_name").await,
        "embedded-postgres-test",
        "a caller's setting reaches the server"
    );
    client
        .batch_execute("CREATE DATABASE app")
        .await
        .expect("test: create database");
    drop(client);
    let app = connect(&cluster.url("app")).await;
    app.batch_execute("CREATE TABLE kept (s text); INSERT INTO kept VALUES ('still here')")
        .await
        .expect("test: write");
    drop(app);

    match EmbeddedPostgres::start(&data_dir).await {
        Err(EmbeddedError::AlreadyRunning { pid, .. }) => {
            assert_eq!(pid, cluster.postmaster_pid().to_string());
        }
        other => panic!("a second server on the same dir must be refused, got {other:?}"),
    }

    cluster.stop().await.expect("stop the cluster");
    assert!(data_dir.join("pgdata").join("PG_VERSION").is_file());

    let again = EmbeddedPostgres::start(&data_dir)
        .await
        .expect("restart the persistent cluster");
    let app = connect(&again.url("app")).await;
    assert_eq!(scalar(&app, "SELECT s FROM kept").await, "still here");
    drop(app);
    again.stop().await.expect("stop the cluster again");
    fs::remove_dir_all(&parent).expect("test: cleanup");
}

#[tokio::test]
async fn a_dir_holding_other_files_is_refused_untouched() {
    let dir = scratch_dir("foreign");
    fs::write(dir.join("notes.txt"), "mine").expect("test: write");
    match EmbeddedPostgres::start(&dir).await {
        Err(EmbeddedError::DirNotDedicated { entry, .. }) => assert_eq!(entry, "notes.txt"),
        other => panic!("a dir with foreign files must be refused, got {other:?}"),
    }
    assert_eq!(mode(&dir), 0o755, "the refused dir keeps its permissions");
    assert_eq!(
        fs::read_to_string(dir.join("notes.txt")).expect("test: read"),
        "mine"
    );
    fs::remove_dir_all(&dir).expect("test: cleanup");
}

/// Set (to a dir) only in the child process of [`the_cluster_dies_with_its_owner`].
const OWNER_ENV: &str = "EMBEDDED_POSTGRES_TEST_OWNER_DIR";

/// Not a test of its own: the owner process that
/// [`the_cluster_dies_with_its_owner`] starts (this test binary, running only this test) and
/// kills. It starts an ephemeral cluster under the given dir, writes the cluster's data dir and
/// postmaster pid to `owner-ready` there, and waits forever. Without the variable it does nothing.
#[tokio::test]
async fn owner_process_for_the_kill_test() {
    let Some(parent) = std::env::var_os(OWNER_ENV) else {
        return;
    };
    let parent = PathBuf::from(parent);
    let cluster = EmbeddedPostgres::start_ephemeral(&parent)
        .await
        .expect("owner: start an ephemeral cluster");
    let report = format!(
        "{}\n{}\n",
        cluster.data_dir().display(),
        cluster.postmaster_pid()
    );
    fs::write(parent.join("owner-ready.tmp"), report).expect("owner: write report");
    fs::rename(parent.join("owner-ready.tmp"), parent.join("owner-ready"))
        .expect("owner: publish report");
    std::future::pending::<()>().await;
}

/// SIGKILL gives the owner no chance to run `stop` or `Drop`: the watchdog must notice the
/// closed pipe, stop the server and delete the ephemeral dir on its own.
#[tokio::test]
async fn the_cluster_dies_with_its_owner() {
    let parent = scratch_dir("killed-owner");
    let mut owner = std::process::Command::new(std::env::current_exe().expect("test: own path"))
        .args([
            "--exact",
            "owner_process_for_the_kill_test",
            "--test-threads=1",
        ])
        .env(OWNER_ENV, &parent)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("test: start the owner process");
    let ready = parent.join("owner-ready");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ready.exists() {
        if let Some(status) = owner.try_wait().expect("test: owner status") {
            let mut output = String::new();
            if let Some(mut stdout) = owner.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut stdout, &mut output);
            }
            panic!("the owner process exited before its cluster was ready ({status}): {output}");
        }
        assert!(
            Instant::now() < deadline,
            "the owner's cluster never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = fs::read_to_string(&ready).expect("test: read report");
    let mut lines = report.lines();
    let data_dir = PathBuf::from(lines.next().expect("test: data dir line"));
    let pid = lines.next().expect("test: pid line");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(data_dir.exists() && proc_dir.exists());

    owner.kill().expect("test: SIGKILL the owner");
    owner.wait().expect("test: reap the owner");

    // Ephemeral grace period (10 s) plus the removal, with room to spare.
    let deadline = Instant::now() + Duration::from_secs(40);
    while data_dir.exists() || proc_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "postmaster {pid} or {} outlived its owner",
            data_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fs::remove_dir_all(&parent).expect("test: cleanup");
}
