//! `kvctl cluster status`: every member asked for its own status.

use kv_client::Client;
use serde::Serialize;

use crate::cli::{Global, Output};
use crate::connect;
use crate::error::CtlError;
use crate::output::{Table, bytes, print};

/// One member's row.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    /// Its name.
    pub name: String,
    /// Its id, in hex as etcdctl prints it.
    pub id: String,
    /// The client URL it was asked on.
    pub endpoint: String,
    /// It leads.
    pub leader: bool,
    /// It is a learner.
    pub learner: bool,
    /// Its Raft term.
    pub raft_term: u64,
    /// Its last Raft log index.
    pub raft_index: u64,
    /// Its last applied index.
    pub raft_applied_index: u64,
    /// Entries behind the leader's log (`null` when unknown).
    pub lag: Option<u64>,
    /// Its store revision.
    pub revision: i64,
    /// Its database size in bytes.
    pub db_size: i64,
    /// Its database bytes in use.
    pub db_size_in_use: i64,
    /// The etcd API version it speaks.
    pub version: String,
    /// Alarms it reports, or why it could not be asked.
    pub errors: Vec<String>,
}

/// Prints the status of every member.
pub async fn status(client: &Client, global: &Global, out: Output) -> Result<(), CtlError> {
    let members = client.cluster().members().await?;
    let mut rows = Vec::new();
    for member in members {
        let endpoint = member.client_urls.first().cloned().unwrap_or_default();
        let mut row = MemberStatus {
            name: member.name.clone(),
            id: format!("{:x}", member.id),
            endpoint: endpoint.clone(),
            leader: false,
            learner: member.is_learner,
            raft_term: 0,
            raft_index: 0,
            raft_applied_index: 0,
            lag: None,
            revision: 0,
            db_size: 0,
            db_size_in_use: 0,
            version: String::new(),
            errors: Vec::new(),
        };
        let asked = match endpoint.as_str() {
            "" => Err(CtlError::Invalid("not started yet (no client URL)".into())),
            url => match connect::member(global, url).await {
                Ok(member) => member.maintenance().status().await.map_err(CtlError::from),
                Err(e) => Err(e),
            },
        };
        match asked {
            Ok(s) => {
                row.leader = s.leader == member.id;
                row.raft_term = s.raft_term;
                row.raft_index = s.raft_index;
                row.raft_applied_index = s.raft_applied_index;
                row.revision = s.revision;
                row.db_size = s.db_size;
                row.db_size_in_use = s.db_size_in_use;
                row.version = s.version;
                row.errors = s.errors;
            }
            Err(e) => row.errors.push(e.to_string()),
        }
        rows.push(row);
    }
    let leader_index = rows.iter().find(|r| r.leader).map(|r| r.raft_index);
    for row in &mut rows {
        if row.version.is_empty() {
            continue;
        }
        row.lag = leader_index.map(|at| at.saturating_sub(row.raft_index));
    }
    print(out, &rows, || {
        let mut table = Table::new(&[
            "NAME",
            "ID",
            "ENDPOINT",
            "LEADER",
            "TERM",
            "RAFT INDEX",
            "APPLIED",
            "LAG",
            "REVISION",
            "DB SIZE",
            "VERSION",
            "ERRORS",
        ]);
        for r in &rows {
            let role = match (r.leader, r.learner) {
                (true, _) => "*",
                (false, true) => "learner",
                _ => "",
            };
            table.row(vec![
                r.name.clone(),
                r.id.clone(),
                r.endpoint.clone(),
                role.into(),
                r.raft_term.to_string(),
                r.raft_index.to_string(),
                r.raft_applied_index.to_string(),
                r.lag.map_or("?".into(), |l| l.to_string()),
                r.revision.to_string(),
                bytes(r.db_size.max(0) as u64),
                r.version.clone(),
                r.errors.join("; "),
            ]);
        }
        table.render()
    });
    Ok(())
}
