//! `kvctl snapshot save`: downloads a member's snapshot with progress, checks its SHA-256,
//! then moves it into place, so a failed download never leaves a file that looks whole.

use std::io::{IsTerminal, Write};
use std::path::Path;

use kv_client::Client;
use serde::Serialize;
use sha2::Digest;

use crate::cli::Output;
use crate::error::CtlError;
use crate::output::{bytes, print};

/// What was saved.
#[derive(Debug, Serialize)]
pub struct Saved {
    /// The file.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256 (of everything before the trailing 32-byte digest), hex.
    pub sha256: String,
}

/// Progress lines on stderr: redrawn in place on a terminal, else one line per tenth.
struct Progress {
    terminal: bool,
    shown_tenth: u64,
}

impl Progress {
    fn show(&mut self, got: u64, remaining: u64) {
        let total = got + remaining;
        let percent = (got * 100).checked_div(total).unwrap_or(100);
        let text = format!(
            "Downloading snapshot: {percent:3}% ({} of {})",
            bytes(got),
            bytes(total)
        );
        let mut err = std::io::stderr();
        if self.terminal {
            let _ = write!(err, "\r{text}");
            if remaining == 0 {
                let _ = writeln!(err);
            }
        } else if percent / 10 > self.shown_tenth || remaining == 0 {
            self.shown_tenth = percent / 10;
            let _ = writeln!(err, "{text}");
        }
    }
}

/// Saves a snapshot of the member the client talks to into `file`.
pub async fn save(client: &Client, file: &Path, out: Output) -> Result<(), CtlError> {
    // `<file>.part`, beside the target, so the rename into place stays on one file system.
    let mut part_name = file.as_os_str().to_owned();
    part_name.push(".part");
    let part = std::path::PathBuf::from(part_name);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CtlError::File { path, source }
    };
    let mut download = client.maintenance().snapshot().await?;
    let mut writer = std::fs::File::create(&part).map_err(io(&part))?;
    let mut progress = Progress {
        terminal: std::io::stderr().is_terminal(),
        shown_tenth: 0,
    };
    // etcd's format: the body, then its SHA-256. The last 32 bytes seen may be the digest,
    // so they are held back from the hash until more arrive.
    let mut hasher = sha2::Sha256::new();
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    let mut total = 0u64;
    let result = async {
        while let Some((chunk, remaining)) = download.next_chunk().await? {
            writer.write_all(&chunk).map_err(io(&part))?;
            total += chunk.len() as u64;
            tail.extend_from_slice(&chunk);
            if tail.len() > 32 {
                let body = tail.len() - 32;
                hasher.update(&tail[..body]);
                tail.drain(..body);
            }
            progress.show(total, remaining);
        }
        writer.sync_all().map_err(io(&part))?;
        if tail.len() < 32 {
            return Err(CtlError::Invalid(format!(
                "the snapshot is too short ({total} bytes)"
            )));
        }
        if hasher.finalize().as_slice() != tail.as_slice() {
            return Err(CtlError::Invalid(
                "the snapshot's SHA-256 does not match its contents".into(),
            ));
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, file).map_err(io(file))?;
    let saved = Saved {
        path: file.display().to_string(),
        bytes: total,
        sha256: tail.iter().map(|b| format!("{b:02x}")).collect(),
    };
    print(out, &saved, || {
        format!("Snapshot saved at {}\n", saved.path)
    });
    Ok(())
}
