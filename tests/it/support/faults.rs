//! Real faults between rowcast and PostgreSQL, no mocks: a TCP proxy that rowcast's connections
//! (its REST pool and its LISTEN connection) go through, which a test can cut, stall, slow
//! down or cut in the middle of a server message while traffic flows; and a private cluster
//! that a test can restart with `pg_ctl restart -m immediate` (a crash and recovery).
//!
//! The proxy listens on 127.0.0.1:0 and forwards every accepted connection to the real server
//! (the embedded test cluster's Unix socket, or the TCP address of `DATABASE_URL`). It reads
//! the first client packet of each connection (the startup message, sent in clear because the
//! URLs say `sslmode=disable`) to learn its `application_name`, so a test can aim at the LISTEN
//! connection (`rowcast-listener`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rowcast_embedded_postgres::{EmbeddedOptions, EmbeddedPostgres};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The application name of rowcast's LISTEN connection (src/listener.rs).
pub const LISTENER_APPLICATION: &str = "rowcast-listener";

/// Where the real server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A Unix socket file (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// The query parameters of a URL, percent-decoded, in order.
fn query_params(url: &str) -> Vec<(String, String)> {
    url.split_once('?')
        .map(|(_, query)| {
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("a UTF-8 URL")
}

/// (userinfo, host:port, path) of a `postgres://` URL; any part may be empty.
fn url_parts(url: &str) -> (&str, &str, &str) {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    let rest = base.split_once("://").map_or(base, |(_, rest)| rest);
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (userinfo, hostport, path),
        None => ("", authority, path),
    }
}

/// The server a database URL points at.
pub fn upstream_of(url: &str) -> Upstream {
    let params = query_params(url);
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let (_, hostport, _) = url_parts(url);
    if let Some(host) = param("host").filter(|host| host.starts_with('/')) {
        let port = param("port").unwrap_or_else(|| "5432".to_owned());
        return Upstream::Unix(Path::new(&host).join(format!(".s.PGSQL.{port}")));
    }
    assert!(
        !hostport.is_empty(),
        "no host in the database URL {url}: cannot put a proxy in front of it"
    );
    let hostport = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    {
        hostport.to_owned()
    } else {
        format!(
            "{hostport}:{}",
            param("port").unwrap_or_else(|| "5432".to_owned())
        )
    };
    Upstream::Tcp(hostport)
}

/// `url` rewritten to reach the same database through `proxy` (host and port replaced, the
/// Unix-socket `host`/`port` parameters dropped, everything else kept).
pub fn url_via(url: &str, proxy: SocketAddr) -> String {
    let (userinfo, _, path) = url_parts(url);
    let query: Vec<String> = url
        .split_once('?')
        .map(|(_, query)| {
            query
                .split('&')
                .filter(|pair| {
                    let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
                    !pair.is_empty() && key != "host" && key != "port"
                })
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let at = if userinfo.is_empty() { "" } else { "@" };
    let mut out = format!("postgres://{userinfo}{at}{proxy}{path}");
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
}

/// What a test can see of one proxied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Accept order, from 1.
    pub id: u64,
    /// From the startup message, if it had one.
    pub application_name: Option<String>,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    application_name: OnceLock<String>,
    cut: CancellationToken,
    stalled_until: Mutex<Option<Instant>>,
    cut_mid_message: AtomicBool,
    /// When the server last sent this connection bytes.
    last_from_server: Mutex<Instant>,
}

impl Connection {
    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id,
            application_name: self.application_name.get().cloned(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Trickle {
    bytes_per_sec: u64,
    until: Instant,
}

#[derive(Debug)]
struct Shared {
    upstream: Upstream,
    connections: Mutex<BTreeMap<u64, Arc<Connection>>>,
    accepted: AtomicU64,
    cut_mid_message: AtomicU64,
    trickle: Mutex<Option<Trickle>>,
}

/// The TCP fault proxy; stops accepting (and closes what it forwards) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

impl FaultProxy {
    /// Starts a proxy to the server `database_url` names.
    pub async fn start(database_url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: upstream_of(database_url),
            connections: Mutex::new(BTreeMap::new()),
            accepted: AtomicU64::new(0),
            cut_mid_message: AtomicU64::new(0),
            trickle: Mutex::new(None),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `database_url` rewritten to go through this proxy.
    pub fn url_for(&self, database_url: &str) -> String {
        url_via(database_url, self.addr)
    }

    /// The open connections, in accept order.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared
            .connections
            .lock()
            .unwrap()
            .values()
            .map(|connection| connection.info())
            .collect()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection at once, both directions (buffered bytes are dropped);
    /// new connections are accepted as before. Returns how many were closed.
    pub fn cut_all(&self) -> usize {
        let connections = self.shared.connections.lock().unwrap();
        for connection in connections.values() {
            connection.cut.cancel();
        }
        connections.len()
    }

    /// Stops forwarding one connection's bytes, both directions, for `duration`, then resumes
    /// (the bytes read meanwhile are forwarded then, nothing is lost). The connection chosen is
    /// the newest LISTEN connection (`rowcast-listener`) if there is one, otherwise the one that
    /// most recently received bytes from the server. Returns immediately with the one stalled.
    pub fn stall_one(&self, duration: Duration) -> Option<ConnectionInfo> {
        let connections = self.shared.connections.lock().unwrap();
        let chosen = connections
            .values()
            .rev()
            .find(|connection| {
                connection.application_name.get().map(String::as_str) == Some(LISTENER_APPLICATION)
            })
            .or_else(|| {
                connections
                    .values()
                    .max_by_key(|connection| *connection.last_from_server.lock().unwrap())
            })?;
        *chosen.stalled_until.lock().unwrap() = Some(Instant::now() + duration);
        Some(chosen.info())
    }

    /// For `duration`, forwards at most about `bytes_per_sec` per connection and direction
    /// (a tenth of it every 100 ms); open and new connections alike. Returns immediately.
    pub fn trickle(&self, bytes_per_sec: u64, duration: Duration) {
        *self.shared.trickle.lock().unwrap() = Some(Trickle {
            bytes_per_sec,
            until: Instant::now() + duration,
        });
    }

    /// Arms every open connection: the next time the server sends it bytes, only the first half
    /// of that chunk is forwarded (at least one byte, never all), and the connection is closed
    /// right after. Waits up to `within` for the armed connections to be cut, disarms the ones
    /// that saw no server bytes by then, and returns (armed, cut mid-message).
    pub async fn cut_mid_message(&self, within: Duration) -> (usize, u64) {
        let before = self.shared.cut_mid_message.load(Ordering::SeqCst);
        let armed: Vec<Arc<Connection>> = self
            .shared
            .connections
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for connection in &armed {
            connection.cut_mid_message.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && armed.iter().any(|c| !c.cut.is_cancelled()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for connection in &armed {
            connection.cut_mid_message.store(false, Ordering::SeqCst);
        }
        (
            armed.len(),
            self.shared.cut_mid_message.load(Ordering::SeqCst) - before,
        )
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(serve_connection(client, Arc::clone(&shared)));
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect_upstream(upstream: &Upstream) -> std::io::Result<Box<dyn Io>> {
    Ok(match upstream {
        Upstream::Unix(path) => Box::new(UnixStream::connect(path).await?),
        Upstream::Tcp(hostport) => {
            let stream = TcpStream::connect(hostport).await?;
            let _ = stream.set_nodelay(true);
            Box::new(stream)
        }
    })
}

async fn serve_connection(client: TcpStream, shared: Arc<Shared>) {
    let id = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
    // A server that is down (restarting) is a refused connection for the client too.
    let Ok(server) = connect_upstream(&shared.upstream).await else {
        return;
    };
    let connection = Arc::new(Connection {
        id,
        application_name: OnceLock::new(),
        cut: CancellationToken::new(),
        stalled_until: Mutex::new(None),
        cut_mid_message: AtomicBool::new(false),
        last_from_server: Mutex::new(Instant::now()),
    });
    shared
        .connections
        .lock()
        .unwrap()
        .insert(id, Arc::clone(&connection));
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    tokio::select! {
        () = connection.cut.cancelled() => {}
        () = pump(&shared, &connection, client_read, server_write, Direction::ToServer) => {}
        () = pump(&shared, &connection, server_read, client_write, Direction::ToClient) => {}
    }
    shared.connections.lock().unwrap().remove(&id);
    // Both halves of both sockets are dropped here: each side sees its connection close.
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Forwards one direction until end of file or an error.
async fn pump(
    shared: &Shared,
    connection: &Connection,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    direction: Direction,
) {
    let mut buffer = vec![0_u8; 16 * 1024];
    let mut first = true;
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        if first && direction == Direction::ToServer {
            if let Some(name) = startup_application_name(chunk) {
                let _ = connection.application_name.set(name);
            }
        }
        first = false;
        wait_while_stalled(connection).await;
        if direction == Direction::ToClient {
            *connection.last_from_server.lock().unwrap() = Instant::now();
            if read >= 2 && connection.cut_mid_message.swap(false, Ordering::SeqCst) {
                let _ = to.write_all(&chunk[..read / 2]).await;
                let _ = to.flush().await;
                shared.cut_mid_message.fetch_add(1, Ordering::SeqCst);
                connection.cut.cancel();
                return;
            }
        }
        if forward(shared, &mut to, chunk).await.is_err() {
            return;
        }
    }
}

async fn wait_while_stalled(connection: &Connection) {
    loop {
        let until = *connection.stalled_until.lock().unwrap();
        match until {
            Some(until) if Instant::now() < until => tokio::time::sleep_until(until).await,
            _ => return,
        }
    }
}

/// Writes `data`, a tenth of the trickle rate every 100 ms while a trickle is on.
async fn forward(
    shared: &Shared,
    to: &mut (impl AsyncWrite + Unpin),
    mut data: &[u8],
) -> std::io::Result<()> {
    while !data.is_empty() {
        let trickle = shared
            .trickle
            .lock()
            .unwrap()
            .filter(|trickle| Instant::now() < trickle.until);
        let Some(trickle) = trickle else {
            return to.write_all(data).await;
        };
        let piece = usize::try_from(trickle.bytes_per_sec / 10)
            .unwrap_or(usize::MAX)
            .clamp(1, data.len());
        to.write_all(&data[..piece]).await?;
        data = &data[piece..];
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The `application_name` of a PostgreSQL startup message (length, protocol 3.0, then
/// NUL-terminated key/value pairs), if `packet` is one and has it.
fn startup_application_name(packet: &[u8]) -> Option<String> {
    const PROTOCOL_3_0: [u8; 4] = [0, 3, 0, 0];
    if packet.len() < 8 || packet[4..8] != PROTOCOL_3_0 {
        return None;
    }
    let mut fields = packet[8..].split(|byte| *byte == 0);
    while let Some(key) = fields.next() {
        let value = fields.next()?;
        if key == b"application_name" {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        if key.is_empty() {
            return None;
        }
    }
    None
}

/// A PostgreSQL cluster of one test's own, which the test may crash and restart: in a fresh
/// dir under the temp dir, stopped (`pg_ctl stop -m immediate`) and deleted when dropped.
///
/// It runs with `synchronous_commit` on (unlike the shared ephemeral test cluster), so a commit
/// that was acknowledged and notified survives an immediate restart, as on a real server;
/// `fsync` is off only because a restart kills processes, not the machine.
#[derive(Debug)]
pub struct PrivateCluster {
    dir: PathBuf,
    url: String,
    pg_ctl: PathBuf,
    /// Holds the first server's watchdog; after a restart the server runs under `pg_ctl`.
    embedded: Option<EmbeddedPostgres>,
}

impl PrivateCluster {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A cluster with extra server settings (`-c name=value`, after ours), e.g. a TCP
    /// `listen_addresses` and `ssl=on` for the TLS tests.
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("rowcast-faults-{:016x}", rand::random::<u64>()));
        let mut options = EmbeddedOptions::new()
            .setting("fsync", "off")
            .setting("full_page_writes", "off")
            .setting("synchronous_commit", "on");
        for (name, value) in settings {
            options = options.setting(*name, *value);
        }
        let embedded = EmbeddedPostgres::start_with(&dir, &options)
            .await
            .expect("a private PostgreSQL cluster");
        let dir = embedded.data_dir().to_owned();
        let version = std::fs::read_to_string(dir.join("pgdata/PG_VERSION"))
            .expect("the cluster's PG_VERSION");
        let pg_ctl = Path::new("/usr/lib/postgresql")
            .join(version.trim())
            .join("bin/pg_ctl");
        assert!(pg_ctl.exists(), "{} not found", pg_ctl.display());
        Self {
            url: embedded.url("postgres"),
            dir,
            pg_ctl,
            embedded: Some(embedded),
        }
    }

    /// The URL of database `name` on this cluster (the same before and after a restart).
    pub fn url(&self, name: &str) -> String {
        super::url_for_database(&self.url, name)
    }

    /// `pg_ctl` as the user that owns the cluster (`postgres` when the tests run as root).
    fn pg_ctl(&self, args: &[&str]) -> std::process::Command {
        let pgdata = self.dir.join("pgdata");
        let mut command = if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            command
        } else {
            std::process::Command::new(&self.pg_ctl)
        };
        command.arg("-D").arg(pgdata).args(args);
        command
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    }

    /// `pg_ctl restart -m immediate`: every backend is killed without a checkpoint, the server
    /// starts again with the same options (`postmaster.opts`) and recovers from the WAL. Waits
    /// until it accepts connections; returns how long that took.
    pub async fn restart_immediate(&self) -> Duration {
        let started = Instant::now();
        let log = self.dir.join("restarted.log");
        let mut command = self.pg_ctl(&[
            "restart",
            "-m",
            "immediate",
            "-w",
            "-t",
            "60",
            "-l",
            log.to_str().expect("a UTF-8 path"),
        ]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .expect("run pg_ctl restart");
        assert!(
            output.status.success(),
            "pg_ctl restart -m immediate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        started.elapsed()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Whoever runs the server now (the watchdog or, after a restart, nobody): stop it.
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]).output();
        drop(self.embedded.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes `path` readable by the cluster's user only, as PostgreSQL demands of `ssl_key_file`
/// (the cluster runs as `postgres` when the tests run as root).
pub fn give_key_to_cluster_user(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        let status = std::process::Command::new("chown")
            .arg("postgres:")
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown postgres {}", path.display());
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_url_points_at_its_socket_and_is_rewritten_for_the_proxy() {
        let url = "postgres:///rowcast_test_1?host=/tmp/rowcast-pg-a%20b&port=5432&user=postgres&sslmode=disable";
        assert_eq!(
            upstream_of(url),
            Upstream::Unix(PathBuf::from("/tmp/rowcast-pg-a b/.s.PGSQL.5432"))
        );
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            url_via(url, proxy),
            "postgres://127.0.0.1:4000/rowcast_test_1?user=postgres&sslmode=disable"
        );
    }

    #[test]
    fn a_tcp_url_keeps_its_user_and_options() {
        let url = "postgres://me:secret@db.example:6432/app?sslmode=disable";
        assert_eq!(upstream_of(url), Upstream::Tcp("db.example:6432".into()));
        assert_eq!(
            upstream_of("postgres://me@db.example/app"),
            Upstream::Tcp("db.example:5432".into())
        );
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            url_via(url, proxy),
            "postgres://me:secret@127.0.0.1:4000/app?sslmode=disable"
        );
    }

    #[test]
    fn the_startup_message_names_the_application() {
        let mut packet = vec![0, 0, 0, 0, 0, 3, 0, 0];
        packet.extend_from_slice(b"user\0postgres\0application_name\0rowcast-listener\0\0");
        assert_eq!(
            startup_application_name(&packet).as_deref(),
            Some(LISTENER_APPLICATION)
        );
        assert_eq!(
            startup_application_name(b"\0\0\0\x08\x04\xd2\x16\x2f"),
            None
        );
    }
}
