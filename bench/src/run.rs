//! A run: connect the clients, then each chosen workload in turn, each under a key prefix of
//! its own, printing its result line as it finishes.

use kv_client::{Client, DeleteOptions};

use crate::error::{During, Error};
use crate::load::Measured;
use crate::report::{Latency, WorkloadResult};
use crate::settings::Settings;
use crate::workload::Workload;

/// What one workload sees: the settings, the connected clients, and its own key prefix.
pub(crate) struct Context<'a> {
    pub(crate) settings: &'a Settings,
    /// One per connection; client `i` starts on endpoint `i % endpoints`.
    pub(crate) clients: &'a [Client],
    /// Unique to this workload in this run (`bench/<workload>/<time>/`): runs against one
    /// server do not see each other's keys.
    pub(crate) prefix: String,
    pub(crate) workload: Workload,
}

impl Context<'_> {
    /// The client connection `i` (modulo the number of connections).
    pub(crate) fn client(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// Key `name` under the workload's prefix.
    pub(crate) fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    /// A value of the run's size: `head` padded with `fill`.
    pub(crate) fn value(&self, head: &[u8], fill: u8) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.settings.value_size.max(head.len()));
        v.extend_from_slice(head);
        v.resize(self.settings.value_size.max(head.len()), fill);
        v
    }

    /// A client of its own, on a connection no other workload request uses (the watch
    /// workloads' watchers).
    pub(crate) async fn dedicated_client(&self) -> Result<Client, Error> {
        Client::connect(&self.settings.endpoints, self.settings.client_options())
            .await
            .during("connect")
    }

    /// The result of this workload from what it measured.
    pub(crate) fn result(&self, m: Measured) -> WorkloadResult {
        let s = self.settings;
        let per_op = |cpu: f64| crate::meter::micros_per(cpu, m.ops);
        WorkloadResult {
            workload: self.workload.name().to_string(),
            unit: self.workload.unit().to_string(),
            endpoints: s.endpoints.clone(),
            connections: s.connections,
            in_flight: self.workload.in_flight(s),
            value_size: s.value_size,
            seconds: m.seconds,
            ops: m.ops,
            ops_per_sec: if m.seconds > 0.0 {
                m.ops as f64 / m.seconds
            } else {
                0.0
            },
            errors: m.errors,
            error_samples: m.error_samples,
            latency_ms: Latency::of(&m.latency),
            server_cpu_us_per_op: m.usage.server_cpu.and_then(per_op),
            server_rss_kib: m.usage.server_rss_kib,
            client_cpu_us_per_op: per_op(m.usage.client_cpu),
            passed: m.failures.is_empty(),
            failures: m.failures,
            details: m.details,
        }
    }
}

/// Connects `settings.connections` clients, client `i` with the endpoint list rotated by `i`
/// so that with several members the connections start spread over them.
pub(crate) async fn connect(settings: &Settings) -> Result<Vec<Client>, Error> {
    let n = settings.endpoints.len();
    let mut clients = Vec::with_capacity(settings.connections);
    for i in 0..settings.connections {
        let endpoints: Vec<&String> = settings
            .endpoints
            .iter()
            .cycle()
            .skip(i % n)
            .take(n)
            .collect();
        clients.push(
            Client::connect(endpoints, settings.client_options())
                .await
                .during("connect")?,
        );
    }
    Ok(clients)
}

/// What a run produced: the results of the workloads that ran, and why the others did not.
#[derive(Debug, Default)]
pub struct RunReport {
    /// One per workload that completed its window.
    pub results: Vec<WorkloadResult>,
    /// Workloads that could not run, and why.
    pub aborted: Vec<(Workload, String)>,
}

impl RunReport {
    /// True when every workload ran and every check held.
    pub fn passed(&self) -> bool {
        self.aborted.is_empty() && self.results.iter().all(|r| r.passed)
    }
}

/// Runs `workloads` in order against `settings.endpoints`, printing each result line on stdout
/// (progress goes to stderr). A workload that cannot run is reported and the next one runs.
pub async fn run(settings: &Settings, workloads: &[Workload]) -> Result<RunReport, Error> {
    settings.check()?;
    let clients = connect(settings).await?;
    let mut report = RunReport::default();
    for &workload in workloads {
        let ctx = Context {
            settings,
            clients: &clients,
            prefix: format!("{}/", kv_tests::bench::unique(workload.name())),
            workload,
        };
        let outcome = workload.run(&ctx).await;
        // Whatever happened, the workload's keys go (not timed), unless the deployment goes.
        let cleaned = if settings.keep_keys {
            Ok(())
        } else {
            clients[0]
                .kv()
                .delete(&ctx.prefix, DeleteOptions::new().prefix())
                .await
                .map(|_| ())
                .during("delete the workload's keys")
        };
        match outcome.and_then(|r| cleaned.map(|_| r)) {
            Ok(result) => {
                println!("{}", result.line());
                report.results.push(result);
            }
            Err(e) => {
                println!("{:<17} ABORTED: {e}", workload.name());
                report.aborted.push((workload, e.to_string()));
            }
        }
    }
    Ok(report)
}
