//! Finding the PostgreSQL server binaries (`initdb`, `postgres`): a given bin
//! dir, the one matching an existing cluster's version, the newest under
//! `/usr/lib/postgresql`, or `PATH`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::EmbeddedError;

/// A PostgreSQL bin dir and the two server programs in it.
#[derive(Debug, Clone)]
pub(super) struct Bins {
    pub(super) dir: PathBuf,
    pub(super) initdb: PathBuf,
    pub(super) postgres: PathBuf,
}

/// The bin dir `dir` if it has both `initdb` and `postgres`.
fn bins_in(dir: &Path) -> Option<Bins> {
    let initdb = dir.join("initdb");
    let postgres = dir.join("postgres");
    (initdb.is_file() && postgres.is_file()).then(|| Bins {
        dir: dir.to_path_buf(),
        initdb,
        postgres,
    })
}

/// The override if given; else the bin dir matching an existing cluster's
/// version; else the newest `/usr/lib/postgresql/*/bin`; else `PATH`.
pub(super) fn locate_bins(
    override_dir: Option<&Path>,
    want_version: Option<&str>,
) -> Result<Bins, EmbeddedError> {
    if let Some(dir) = override_dir {
        return bins_in(dir).ok_or_else(|| EmbeddedError::BinDirInvalid {
            dir: dir.to_path_buf(),
        });
    }
    let root = Path::new("/usr/lib/postgresql");
    if let Some(bins) = want_version.and_then(|v| bins_in(&root.join(v).join("bin"))) {
        return Ok(bins);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let key: Option<Vec<u32>> = name.to_str()?.split('.').map(|p| p.parse().ok()).collect();
            Some((key?, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some(bins) = versions.iter().rev().find_map(|(_, dir)| bins_in(dir)) {
        return Ok(bins);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if !initdb.is_file() {
            continue;
        }
        // /usr/local/bin/initdb may be a symlink into the real bin dir.
        let real_dir = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(bins) = real_dir
            .as_deref()
            .and_then(bins_in)
            .or_else(|| bins_in(&dir))
        {
            return Ok(bins);
        }
    }
    Err(EmbeddedError::BinariesNotFound)
}
