//! The recipes' state: locks, elections, queues and services, read with
//! `recipes::inspect`, and the streams of an election's leaders and a service's instances.

use futures::StreamExt;
use kv_client::Client;
use recipes::discovery::{InstanceChange, Service};
use recipes::inspect::{Inspection, QueueItem};
use recipes::{Election, Observation};
use serde::Serialize;

use crate::cli::Output;
use crate::error::CtlError;
use crate::output::{Table, age, line, print};

async fn inspect(client: &Client, prefix: &str, max_keys: usize) -> Result<Inspection, CtlError> {
    let found = Inspection::read(client, prefix.as_bytes(), max_keys).await?;
    if found.truncated {
        eprintln!(
            "Warning: stopped after {max_keys} keys (--max-keys); narrow with --prefix to see all"
        );
    }
    Ok(found)
}

/// What to read: one recipe's keys when named, else everything under `prefix`.
fn scope(name: Option<&str>, prefix: &str) -> String {
    name.map_or(prefix.to_string(), |n| format!("{n}/"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `kvctl lock list`.
pub async fn locks(
    client: &Client,
    prefix: &str,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let found = inspect(client, prefix, max_keys).await?;
    print(out, &found.locks, || {
        let mut table = Table::new(&["LOCK", "KIND", "HOLDER", "LEASE", "FENCE", "WAITING"]);
        for lock in &found.locks {
            for (i, holder) in lock.holders.iter().enumerate() {
                table.row(vec![
                    if i == 0 {
                        lock.name.clone()
                    } else {
                        String::new()
                    },
                    if i == 0 {
                        lock.kind.to_string()
                    } else {
                        String::new()
                    },
                    holder.key.clone(),
                    holder.lease.clone(),
                    holder.revision.to_string(),
                    if i == 0 {
                        lock.waiting.len().to_string()
                    } else {
                        String::new()
                    },
                ]);
            }
        }
        table.render()
    });
    Ok(())
}

/// `kvctl election list`.
pub async fn elections(
    client: &Client,
    prefix: &str,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let found = inspect(client, prefix, max_keys).await?;
    print(out, &found.elections, || {
        let mut table = Table::new(&[
            "ELECTION",
            "LEADER",
            "VALUE",
            "LEASE",
            "FENCE",
            "CANDIDATES",
        ]);
        for e in &found.elections {
            table.row(vec![
                e.name.clone(),
                e.leader.key.clone(),
                e.value.clone(),
                e.leader.lease.clone(),
                e.leader.revision.to_string(),
                e.candidates.len().to_string(),
            ]);
        }
        table.render()
    });
    Ok(())
}

/// One line of `kvctl election observe`.
#[derive(Debug, Serialize)]
struct LeaderLine {
    election: String,
    /// `elected`, `proclaimed` or `vacant`.
    event: &'static str,
    key: Option<String>,
    value: Option<String>,
    lease: Option<String>,
    fence: Option<i64>,
}

/// `kvctl election observe`: the leader now, then every change, up to `count` lines.
pub async fn observe(
    client: &Client,
    name: &str,
    count: Option<usize>,
    out: Output,
) -> Result<(), CtlError> {
    let mut changes = Election::new(client, name).observe();
    let mut printed = 0;
    while count.is_none_or(|c| printed < c) {
        let Some(change) = changes.next().await else {
            break;
        };
        let line_of = |event, kv: Option<&kv_client::KeyValue>| LeaderLine {
            election: name.to_string(),
            event,
            key: kv.map(|kv| String::from_utf8_lossy(&kv.key).into_owned()),
            value: kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            lease: kv.map(|kv| format!("{:x}", kv.lease)),
            fence: kv.map(|kv| kv.create_revision),
        };
        let shown = match change? {
            Observation::Elected(kv) => line_of("elected", Some(&kv)),
            Observation::Proclaimed(kv) => line_of("proclaimed", Some(&kv)),
            Observation::Vacant => line_of("vacant", None),
        };
        line(out, &shown, || match (&shown.value, &shown.key) {
            (Some(value), Some(key)) => format!(
                "{}: {value} (key {key}, fence {})",
                shown.event,
                shown.fence.unwrap_or(0)
            ),
            _ => "vacant: no leader".to_string(),
        });
        printed += 1;
    }
    Ok(())
}

/// `kvctl queue stats`.
pub async fn queue_stats(
    client: &Client,
    name: Option<&str>,
    prefix: &str,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let scope = scope(name, prefix);
    let found = inspect(client, &scope, max_keys).await?;
    let queues: Vec<_> = match name {
        Some(n) => vec![found.queue_or_empty(n)],
        None => found.queues.clone(),
    };
    let now = now_ms();
    print(out, &queues, || {
        let mut table = Table::new(&["QUEUE", "READY", "DELAYED", "CLAIMED", "DEAD", "OLDEST"]);
        for q in &queues {
            table.row(vec![
                q.name.clone(),
                q.ready.to_string(),
                q.delayed.to_string(),
                q.claimed.to_string(),
                q.dead.to_string(),
                q.oldest_enqueued_ms.map_or("-".into(), |ms| age(ms, now)),
            ]);
        }
        table.render()
    });
    Ok(())
}

fn items_table(items: &[QueueItem]) -> String {
    let now = now_ms();
    let mut table = Table::new(&["ID", "PRIORITY", "AGE", "ATTEMPTS", "STATE", "PAYLOAD"]);
    for item in items {
        let state = if item.claimed {
            "claimed"
        } else if item.visible_at_ms > now {
            "delayed"
        } else if item.conditions > 0 {
            "gated"
        } else {
            "ready"
        };
        table.row(vec![
            item.id.clone(),
            item.priority.to_string(),
            age(item.enqueued_ms, now),
            item.attempts.to_string(),
            state.into(),
            item.payload.to_string(),
        ]);
    }
    table.render()
}

/// `kvctl queue peek`.
pub async fn queue_peek(
    client: &Client,
    name: &str,
    limit: usize,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let found = inspect(client, &format!("{name}/"), max_keys).await?;
    let items: Vec<QueueItem> = found.items(name).iter().take(limit).cloned().collect();
    print(out, &items, || items_table(&items));
    Ok(())
}

/// `kvctl queue dead-letter`.
pub async fn dead_letters(
    client: &Client,
    name: &str,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let found = inspect(client, &format!("{name}/"), max_keys).await?;
    let items = found.dead_letters(name).to_vec();
    print(out, &items, || items_table(&items));
    Ok(())
}

/// `kvctl services list`.
pub async fn services(
    client: &Client,
    name: Option<&str>,
    prefix: &str,
    max_keys: usize,
    out: Output,
) -> Result<(), CtlError> {
    let scope = scope(name, prefix);
    let found = inspect(client, &scope, max_keys).await?;
    let services: Vec<_> = found
        .services
        .into_iter()
        .filter(|s| name.is_none_or(|n| s.name == n))
        .collect();
    print(out, &services, || {
        let mut table = Table::new(&["SERVICE", "INSTANCE", "ENDPOINT", "LEASE", "METADATA"]);
        for s in &services {
            for i in &s.instances {
                let metadata: Vec<String> =
                    i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                table.row(vec![
                    s.name.clone(),
                    i.id.clone(),
                    i.endpoint.clone(),
                    i.lease.clone(),
                    metadata.join(","),
                ]);
            }
        }
        table.render()
    });
    Ok(())
}

/// One line of `kvctl services watch`.
#[derive(Debug, Serialize)]
struct InstanceLine {
    service: String,
    /// `added` (the instances listed at start come first, as added), `updated` or `removed`.
    event: &'static str,
    id: String,
    endpoint: String,
    lease: String,
}

/// `kvctl services watch`: the instances now, then every change, up to `count` lines.
pub async fn watch_service(
    client: &Client,
    name: &str,
    count: Option<usize>,
    out: Output,
) -> Result<(), CtlError> {
    let cache = Service::new(client, name).cache().await?;
    let mut changes = cache.changes();
    let show = |event: &'static str, instance: &recipes::discovery::Instance| {
        let shown = InstanceLine {
            service: name.to_string(),
            event,
            id: instance.id.clone(),
            endpoint: instance.endpoint.clone(),
            lease: format!("{:x}", instance.lease),
        };
        line(out, &shown, || {
            format!(
                "{event}: {} {} (lease {})",
                shown.id, shown.endpoint, shown.lease
            )
        });
    };
    // The changes start with the instances listed now, as added.
    let mut printed = 0;
    while count.is_none_or(|c| printed < c) {
        let Some(change) = changes.next().await else {
            break;
        };
        match change {
            InstanceChange::Added(i) => show("added", &i),
            InstanceChange::Updated(i) => show("updated", &i),
            InstanceChange::Removed(i) => show("removed", &i),
        }
        printed += 1;
    }
    Ok(())
}
