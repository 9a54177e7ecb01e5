//! The connection URL: socket dir and database name, percent-encoded so that
//! sqlx, tokio-postgres and libpq all read it as the Unix socket and nothing
//! else.

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use crate::{PORT, SUPERUSER};

/// The URL of database `dbname` on the cluster whose socket is in `dir`;
/// see [`EmbeddedPostgres::url`](super::EmbeddedPostgres::url).
pub(super) fn url_for(dir: &Path, dbname: &str) -> String {
    format!(
        "postgres:///{}?host={}&port={PORT}&user={SUPERUSER}&sslmode=disable",
        percent_encode(dbname.as_bytes(), false),
        percent_encode(dir.as_os_str().as_bytes(), true),
    )
}

/// Percent-encodes all but unreserved bytes (and `/` when `keep_slash`).
/// Never emits `+`, which sqlx's query parser would read as a space.
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn url_encodes_the_socket_dir_and_db_name() {
        let url = url_for(Path::new("/tmp/a b+c,d&e"), "my db/x");
        assert_eq!(
            url,
            "postgres:///my%20db%2Fx?host=/tmp/a%20b%2Bc%2Cd%26e&port=5432&user=postgres&sslmode=disable"
        );
    }

    #[test]
    fn url_parses_in_tokio_postgres_as_only_the_socket() {
        let url = url_for(Path::new("/tmp/a b+c"), "app");
        let config: tokio_postgres::Config = url.parse().expect("test: url parses");
        assert_eq!(
            config.get_hosts(),
            &[tokio_postgres::config::Host::Unix(PathBuf::from(
                "/tmp/a b+c"
            ))]
        );
        assert_eq!(config.get_ports(), &[5432]);
        assert_eq!(config.get_user(), Some("postgres"));
        assert_eq!(config.get_dbname(), Some("app"));
    }
}
