//! A private nginx (Debian package `nginx`) in front of several rowcast instances, for one test:
//! a generated config in a temporary prefix, a free port, `daemon off`, killed when dropped.
//! The `location` block is the one the README's proxy section shows, with an `upstream` of the
//! instances; nothing else is tuned.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::process::{free_port, test_log};

/// Where Debian installs the binary.
const NGINX: &str = "/usr/sbin/nginx";

#[derive(Debug)]
pub struct Nginx {
    child: Child,
    /// `http://127.0.0.1:PORT`, the proxy's address.
    pub base: String,
    prefix: PathBuf,
}

impl Nginx {
    /// False (the test then skips) when nginx is not installed, unless
    /// `ROWCAST_NGINX_TEST=require` (set by `tests/run-all.sh`, which installs it): then a missing
    /// nginx fails the test instead of letting it pass without checking anything.
    pub fn available() -> bool {
        if Path::new(NGINX).exists() {
            return true;
        }
        let required = std::env::var("ROWCAST_NGINX_TEST").is_ok_and(|v| v == "require");
        assert!(
            !required,
            "ROWCAST_NGINX_TEST=require but {NGINX} is not installed"
        );
        eprintln!("skipped: {NGINX} not found (apt-get install nginx)");
        false
    }

    /// Starts nginx balancing over `upstreams` (ports of 127.0.0.1) and waits until it answers.
    pub async fn start(upstreams: &[u16]) -> Self {
        let prefix =
            std::env::temp_dir().join(format!("rowcast-nginx-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&prefix).unwrap();
        // Workers run as an unprivileged user when nginx starts as root: they must reach the
        // temporary directories under the prefix.
        set_mode(&prefix, 0o755);
        let port = free_port();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p};\n"))
            .collect();
        let dir = prefix.display();
        let config = format!(
            "worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream rowcast {{
{servers}    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://rowcast;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $http_connection;
            proxy_read_timeout 1h;
        }}
    }}
}}
"
        );
        let file = prefix.join("nginx.conf");
        std::fs::write(&file, config).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&file)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(test_log())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not answer on {base}: {}",
                std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            base,
            prefix,
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not only the SIGKILL of kill_on_drop: a master killed outright leaves its
        // worker running, holding the port.
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..100 {
                if self.child.try_wait().is_ok_and(|status| status.is_some()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}
