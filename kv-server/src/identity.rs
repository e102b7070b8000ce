//! The data dir and the member's identity: which cluster and member a data dir belongs to,
//! decided once at bootstrap and checked at every start so a foreign or damaged data dir is
//! refused instead of overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File, inside the data dir, that says whose data this is.
pub const MEMBER_FILE: &str = "member.json";
/// The MVCC state file.
pub const STATE_FILE: &str = "state.redb";
/// The on-disk layout version written into [`MEMBER_FILE`].
pub const LAYOUT_VERSION: u32 = 1;

/// Who this member is, persisted in the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Layout version of the data dir.
    pub layout: u32,
    /// `--name` at bootstrap.
    pub name: String,
    /// `--initial-cluster-token` at bootstrap.
    pub cluster_token: String,
    /// This member's id (also its Raft node id).
    pub member_id: u64,
    /// The cluster's id.
    pub cluster_id: u64,
    /// Peer URLs advertised at bootstrap.
    pub peer_urls: Vec<String>,
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory holds files that are not ours.
    #[error("data dir {dir} is not a kv-server data dir (it holds {found}); refusing to use it")]
    Foreign {
        /// The data dir.
        dir: PathBuf,
        /// What was found there.
        found: String,
    },
    /// The directory belongs to another cluster.
    #[error(
        "data dir {dir} belongs to cluster token {stored:?}, not {given:?} (--initial-cluster-token); refusing to use it"
    )]
    OtherCluster {
        /// The data dir.
        dir: PathBuf,
        /// Token in the data dir.
        stored: String,
        /// Token from the flags.
        given: String,
    },
    /// The member file is unreadable.
    #[error("data dir {dir}: {MEMBER_FILE} is damaged ({reason}); refusing to use it")]
    Damaged {
        /// The data dir.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// File system error.
    #[error("data dir {dir}: {source}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// True when `dir` already holds a member's identity.
pub fn exists(dir: &Path) -> bool {
    dir.join(MEMBER_FILE).exists()
}

/// FNV-1a, 64-bit: a stable hash for ids (ids must not change across builds or platforms).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A member id from its peer URLs and the cluster token, as etcd derives it (different hash).
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let joined = urls.concat();
    fnv1a(&[joined.as_bytes(), token.as_bytes()]).max(1)
}

/// A cluster id from its members' ids.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_be_bytes()).collect();
    fnv1a(&[&bytes]).max(1)
}

/// The members of `--initial-cluster` as (member id, name, peer URLs): entries with the same
/// name are one member with several peer URLs, as in etcd. Every member computes the same ids.
pub fn initial_members(
    initial_cluster: &[(String, String)],
    token: &str,
) -> Vec<(u64, String, Vec<String>)> {
    let mut by_name: Vec<(String, Vec<String>)> = Vec::new();
    for (name, url) in initial_cluster {
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.clone()),
            None => by_name.push((name.clone(), vec![url.clone()])),
        }
    }
    by_name
        .into_iter()
        .map(|(name, urls)| (member_id(&urls, token), name, urls))
        .collect()
}

fn io_err(dir: &Path) -> impl Fn(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Opens `dir` for this member: loads the identity of an existing data dir (checking it is
/// ours and of the same cluster), or creates the dir and writes a fresh identity durably.
pub fn prepare(
    dir: &Path,
    name: &str,
    token: &str,
    initial_cluster: &[(String, String)],
    known_cluster_id: Option<u64>,
) -> Result<Identity, DataDirError> {
    let member_file = dir.join(MEMBER_FILE);
    if dir.exists() {
        if member_file.exists() {
            let text = fs::read_to_string(&member_file).map_err(io_err(dir))?;
            let id: Identity = serde_json::from_str(&text).map_err(|e| DataDirError::Damaged {
                dir: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
            if id.layout != LAYOUT_VERSION {
                return Err(DataDirError::Damaged {
                    dir: dir.to_path_buf(),
                    reason: format!("unknown layout version {}", id.layout),
                });
            }
            if id.cluster_token != token {
                return Err(DataDirError::OtherCluster {
                    dir: dir.to_path_buf(),
                    stored: id.cluster_token,
                    given: token.to_string(),
                });
            }
            return Ok(id);
        }
        let found: Vec<String> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !found.is_empty() {
            let mut found = found;
            found.sort();
            return Err(DataDirError::Foreign {
                dir: dir.to_path_buf(),
                found: found.join(", "),
            });
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let members = initial_members(initial_cluster, token);
    let ids: Vec<u64> = members.iter().map(|m| m.0).collect();
    let peer_urls: Vec<String> = members
        .iter()
        .find(|m| m.1 == name)
        .map(|m| m.2.clone())
        .unwrap_or_default();
    let id = Identity {
        layout: LAYOUT_VERSION,
        name: name.to_string(),
        cluster_token: token.to_string(),
        member_id: member_id(&peer_urls, token),
        cluster_id: known_cluster_id.unwrap_or_else(|| cluster_id(&ids)),
        peer_urls,
    };
    let bytes =
        serde_json::to_vec_pretty(&id).map_err(|e| io_err(dir)(std::io::Error::other(e)))?;
    write_durably(dir, &member_file, &bytes).map_err(io_err(dir))?;
    Ok(id)
}

/// Writes a file so that after a crash it is either absent or whole: temp file, fsync,
/// rename, fsync of the directory.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<(String, String)> {
        vec![("default".into(), "http://127.0.0.1:2380".into())]
    }

    #[test]
    fn fresh_then_reopen_then_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d.kv");
        let a = prepare(&dir, "default", "tok", &cluster(), None).unwrap();
        let b = prepare(&dir, "default", "tok", &cluster(), None).unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            prepare(&dir, "default", "other", &cluster(), None),
            Err(DataDirError::OtherCluster { .. })
        ));
        let etcd_dir = tmp.path().join("etcd");
        fs::create_dir_all(etcd_dir.join("member/wal")).unwrap();
        assert!(matches!(
            prepare(&etcd_dir, "default", "tok", &cluster(), None),
            Err(DataDirError::Foreign { .. })
        ));
        assert!(etcd_dir.join("member/wal").exists());
        fs::write(dir.join(MEMBER_FILE), b"{not json").unwrap();
        assert!(matches!(
            prepare(&dir, "default", "tok", &cluster(), None),
            Err(DataDirError::Damaged { .. })
        ));
    }

    #[test]
    fn ids_depend_on_token_and_urls() {
        let u = vec!["http://127.0.0.1:2380".to_string()];
        assert_ne!(member_id(&u, "a"), member_id(&u, "b"));
        assert_eq!(cluster_id(&[1, 2]), cluster_id(&[2, 1]));
    }
}
