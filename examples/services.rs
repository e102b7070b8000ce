//! Microservices finding each other through the server: instances of a small gRPC service
//! register themselves with a lease that their process keeps alive, and a client calls them
//! through a channel balanced over whatever instances are registered right now.
//!
//! What it shows: an instance that dies (SIGKILL: no goodbye) stops renewing its lease, so
//! its registration runs out and the client stops routing to it about one TTL later; a
//! restarted instance registers again and is back in rotation at once.
//!
//! Run it (the server first, in another terminal):
//!
//! ```text
//! cargo run --release -p kv-server
//! cargo run --release --example services
//! ```
//!
//! The demo starts three instances (`a`, `b`, `c`, each a child process printing with its
//! label in front, e.g. `[b] registered b at http://127.0.0.1:40123`) and calls them ten
//! times a second. Watch for:
//!
//! - `live: [a, b, c]`: the registered set, printed whenever it changes;
//! - `answered: a=3 b=4 c=3`: who answered the last second's calls (and how many failed);
//! - `killed instance b`, then `live: [a, c]` and `dropped b after <ms> ms` (about the TTL,
//!   2 s); until then its lease still runs, so calls the balancer sends it fail (`between
//!   the kill and the drop: a=8 c=7 failed=4`): that window is what the TTL costs;
//! - `while b was out: ...`: no call reached b, and none failed, once it was dropped;
//! - `restarted instance b`, `live: [a, b, c]` and `b answered again ...`;
//! - a `summary:` line; the demo exits non-zero, saying why, if a promise did not hold.
//!
//! Or play the parts by hand, each in its own terminal, and kill instances yourself:
//!
//! ```text
//! cargo run --release --example services -- instance --id a
//! cargo run --release --example services -- instance --id b --ttl 5
//! cargo run --release --example services -- client
//! ```
//!
//! Every mode takes `--endpoints host:port[,host:port...]` (default 127.0.0.1:2379).

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::{FutureExt, StreamExt};
use kv_client::{Client, DeleteOptions};
use kv_examples::Process;
use kv_examples::hello::hello_client::HelloClient;
use kv_examples::hello::hello_server::{Hello, HelloServer};
use kv_examples::hello::{WhoReply, WhoRequest};
use recipes::discovery::{
    BalancedChannel, Changes, InstanceChange, InstanceInfo, RegisterOptions, RegistrationStatus,
    Service, ServiceCache,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

/// The service the hand-run modes use.
const DEFAULT_SERVICE: &str = "examples/hello";
/// Registration TTL in seconds. Short, so that a kill shows within moments; a real service
/// would keep the recipe's default (10 s) and renew less often.
const TTL: i64 = 2;
/// How often the client calls.
const CALL_EVERY: Duration = Duration::from_millis(100);
/// A call with no answer by then counts as failed (with no instance at all, calls wait).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the client prints who answered.
const TALLY_EVERY: Duration = Duration::from_secs(1);
/// How long an instance may take to get listed before it gives up.
const REGISTER_WITHIN: Duration = Duration::from_secs(10);

/// The demo's instances, and the one it kills.
const DEMO_IDS: [&str; 3] = ["a", "b", "c"];
const VICTIM: &str = "b";
/// How long the demo gives the instances to start and all answer.
const START_WITHIN: Duration = Duration::from_secs(20);
/// How long the demo calls all instances before the kill.
const STEADY_FOR: Duration = Duration::from_secs(1);
/// How long the demo keeps calling after the drop, to show that no call goes to the victim.
const WATCH_OUT_FOR: Duration = Duration::from_secs(2);
/// The slack the promise allows over the TTL between the kill and the drop: the server
/// checks expiries every 100 ms, and the deletion travels through Raft and a watch.
const DROP_SLACK: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(about = "Instances registering with lease heartbeats, called through a balanced channel")]
struct Cli {
    #[command(flatten)]
    server: kv_examples::ServerArgs,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve hello.Hello on a free loopback port and register it until killed (Ctrl-C
    /// deregisters first).
    Instance {
        /// This instance's id (no '/').
        #[arg(long)]
        id: String,
        /// The service to join: the instance's key is `<service>/<id>`.
        #[arg(long, default_value = DEFAULT_SERVICE)]
        service: String,
        /// Seconds a dead instance stays listed, at most.
        #[arg(long, default_value_t = TTL, value_parser = clap::value_parser!(i64).range(1..))]
        ttl: i64,
    },
    /// Call the service's live instances in a loop, printing the live set and who answered.
    Client {
        /// The service to call.
        #[arg(long, default_value = DEFAULT_SERVICE)]
        service: String,
    },
    /// Start three instances and a client, kill an instance, restart it (the default).
    Demo {
        /// The instances' registration TTL in seconds.
        #[arg(long, default_value_t = TTL, value_parser = clap::value_parser!(i64).range(1..))]
        ttl: i64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.mode.unwrap_or(Mode::Demo { ttl: TTL }) {
        Mode::Instance { id, service, ttl } => {
            instance(&cli.server.endpoints, &id, &service, ttl).await
        }
        Mode::Client { service } => client(&cli.server.endpoints, &service).await,
        Mode::Demo { ttl } => demo(&cli.server.endpoints, ttl).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// An instance.

/// The service an instance serves: it answers with its own id.
struct Greeter {
    id: String,
    served: AtomicU64,
}

#[tonic::async_trait]
impl Hello for Greeter {
    async fn who(
        &self,
        _request: tonic::Request<WhoRequest>,
    ) -> Result<tonic::Response<WhoReply>, tonic::Status> {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(tonic::Response::new(WhoReply {
            instance: self.id.clone(),
            served,
        }))
    }
}

async fn instance(
    endpoints: &str,
    id: &str,
    service: &str,
    ttl: i64,
) -> Result<(), Box<dyn Error>> {
    kv_examples::exit_with_parent();
    let client = kv_examples::connect(endpoints).await?;

    // Listen before registering: whoever sees the registration can connect at once. Port 0
    // lets the OS pick a free one, so any number of instances run side by side; the
    // registration is how clients learn which.
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|e| format!("cannot listen on a loopback port: {e}"))?;
    let endpoint = format!("http://{}", incoming.local_addr()?);
    let greeter = Greeter {
        id: id.to_string(),
        served: AtomicU64::new(0),
    };
    let mut server = tokio::spawn(
        Server::builder()
            .add_service(HelloServer::new(greeter))
            .serve_with_incoming(incoming),
    );

    // The registration keeps a lease alive from this process: if the process dies, the
    // renewals stop and the server deletes the key a TTL later. No one has to notice.
    let info = InstanceInfo::new(&endpoint).with_metadata("pid", std::process::id().to_string());
    let service = Service::new(&client, service);
    let registering = service.register_with(id, info, RegisterOptions::new().ttl(ttl));
    let registration = tokio::time::timeout(REGISTER_WITHIN, registering)
        .await
        .map_err(|_| format!("{id} was not listed within {REGISTER_WITHIN:?}"))?
        .map_err(|e| format!("cannot register {id}: {e}"))?;
    println!("registered {id} at {endpoint} (TTL {ttl} s)");

    // The registration re-registers by itself if its lease or key is lost (the server was
    // down longer than the TTL, say); say so when it happens.
    let mut status = registration.watch_status();
    let (reporter_id, reporter_endpoint) = (id.to_string(), endpoint.clone());
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let now = status.borrow_and_update().clone();
            match now {
                RegistrationStatus::Registered(_) => {
                    println!("re-registered {reporter_id} at {reporter_endpoint}");
                }
                RegistrationStatus::Registering { last_error: None } => {
                    println!("{reporter_id} is not listed; registering again");
                }
                RegistrationStatus::Registering {
                    last_error: Some(e),
                } => println!("{reporter_id} is not listed; registering again ({e})"),
                RegistrationStatus::Displaced { lease } => println!(
                    "another {reporter_id} (lease {lease:x}) took the id over; standing by"
                ),
                RegistrationStatus::Stopped | RegistrationStatus::Failed(_) => return,
            }
        }
    });

    tokio::select! {
        served = &mut server => {
            return Err(match served {
                Ok(Ok(())) => "the gRPC server stopped".into(),
                Ok(Err(e)) => format!("the gRPC server failed: {e}").into(),
                Err(e) => format!("the gRPC server task failed: {e}").into(),
            });
        }
        interrupted = tokio::signal::ctrl_c() => interrupted?,
    }
    // A clean exit deregisters at once rather than leaving clients to wait out the TTL.
    registration
        .deregister()
        .await
        .map_err(|e| format!("cannot deregister {id}: {e}"))?;
    println!("deregistered {id}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A client.

async fn client(endpoints: &str, service: &str) -> Result<(), Box<dyn Error>> {
    kv_examples::exit_with_parent();
    let client = kv_examples::connect(endpoints).await?;
    let cache = Service::new(&client, service).cache().await?;
    // The channel balances over the instances the cache lists; as they come and go, so do
    // the channel's connections. Calls need no knowledge of where instances are.
    let balanced = BalancedChannel::new(&cache);
    tokio::spawn(print_live(cache.changes()));
    call_forever(balanced.channel(), |_| {}).await;
    Ok(())
}

/// Prints the registered instance ids whenever they change.
async fn print_live(mut changes: Changes) {
    let mut live = BTreeSet::new();
    let mut printed = None;
    while let Some(change) = changes.next().await {
        apply(&mut live, change);
        // Changes often come in bursts (the first listing gives one per instance): take those
        // already here before printing.
        while let Some(Some(change)) = changes.next().now_or_never() {
            apply(&mut live, change);
        }
        let line = format!(
            "live: [{}]",
            Vec::from_iter(live.iter().cloned()).join(", ")
        );
        if printed.as_ref() != Some(&line) {
            println!("{line}");
            printed = Some(line);
        }
    }
}

fn apply(live: &mut BTreeSet<String>, change: InstanceChange) {
    match change {
        InstanceChange::Added(i) | InstanceChange::Updated(i) => live.insert(i.id),
        InstanceChange::Removed(i) => live.remove(&i.id),
    };
}

/// One call through the balanced channel: when it started, and who answered it or why it
/// failed.
struct Call {
    started: Instant,
    answer: Result<String, String>,
}

/// Calls `Who` every [`CALL_EVERY`], handing each call to `record` and printing who answered
/// every [`TALLY_EVERY`]. Never returns.
async fn call_forever(channel: Channel, mut record: impl FnMut(Call)) {
    let mut hello = HelloClient::new(channel);
    let caller = format!("client-{}", std::process::id());
    let mut ticks = tokio::time::interval(CALL_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tally = Tally::default();
    let mut tally_since = Instant::now();
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let request = WhoRequest {
            caller: caller.clone(),
        };
        let answer = match tokio::time::timeout(CALL_TIMEOUT, hello.who(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().instance),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        tally.add(&answer);
        record(Call { started, answer });
        if tally_since.elapsed() >= TALLY_EVERY {
            println!("answered: {tally}");
            tally = Tally::default();
            tally_since = Instant::now();
        }
    }
}

/// How many calls each instance answered and how many failed.
#[derive(Default)]
struct Tally {
    answered: BTreeMap<String, u64>,
    failed: u64,
    last_error: Option<String>,
}

impl Tally {
    fn add(&mut self, answer: &Result<String, String>) {
        match answer {
            Ok(id) => *self.answered.entry(id.clone()).or_default() += 1,
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(e.clone());
            }
        }
    }

    fn calls(&self) -> u64 {
        self.answered.values().sum::<u64>() + self.failed
    }
}

/// `a=3 c=4 failed=2 (last: <error>)`; `failed` only when some did.
impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .answered
            .iter()
            .map(|(id, n)| format!("{id}={n}"))
            .collect();
        if self.failed > 0 {
            parts.push(format!("failed={}", self.failed));
        }
        write!(f, "{}", parts.join(" "))?;
        if let Some(e) = &self.last_error {
            write!(f, " (last: {e})")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The demo.

/// Every call the demo's client made, for checking what reached whom and when.
#[derive(Clone, Default)]
struct CallLog(Arc<Mutex<Vec<Call>>>);

impl CallLog {
    fn record(&self, call: Call) {
        self.lock().push(call);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        // A panic elsewhere cannot leave a Vec half-pushed; keep reading it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `id` answered a call started at or after `since`.
    fn answered_since(&self, id: &str, since: Instant) -> bool {
        self.lock()
            .iter()
            .any(|c| c.started >= since && c.answer.as_deref() == Ok(id))
    }

    /// The calls started in `[from, to)`.
    fn tally(&self, from: Instant, to: Instant) -> Tally {
        let mut tally = Tally::default();
        for call in self.lock().iter() {
            if call.started >= from && call.started < to {
                tally.add(&call.answer);
            }
        }
        tally
    }
}

async fn demo(endpoints: &str, ttl: i64) -> Result<(), Box<dyn Error>> {
    let client = kv_examples::connect(endpoints).await?;
    // Run-unique, so demos run one after another against one server never see each
    // other's instances (a killed demo's keys outlive it by a TTL).
    let service = format!("examples/services-{}/hello", std::process::id());
    println!("service {service}: instances {DEMO_IDS:?} with a {ttl} s TTL; killing {VICTIM}");

    let cache = Service::new(&client, &service).cache().await?;
    let balanced = BalancedChannel::new(&cache);
    let calls = CallLog::default();
    let live_printer = tokio::spawn(print_live(cache.changes()));
    let caller = tokio::spawn({
        let calls = calls.clone();
        call_forever(balanced.channel(), move |call| calls.record(call))
    });
    let mut demo = Demo {
        endpoints: endpoints.to_string(),
        service: service.clone(),
        ttl,
        client: client.clone(),
        cache,
        balanced,
        calls,
        instances: BTreeMap::new(),
    };
    let outcome = demo.run().await;

    // Stop calling before the instances go, so the end of the output is the summary.
    caller.abort();
    live_printer.abort();
    drop(demo);
    // The killed instances' keys would go with their leases a TTL from now; go now.
    let cleanup = client
        .kv()
        .delete(format!("{service}/"), DeleteOptions::new().prefix())
        .await;
    let summary = outcome?;
    cleanup.map_err(|e| format!("cannot delete the demo's keys under {service}/: {e}"))?;
    println!("summary: {summary}");
    Ok(())
}

/// What the demo's steps share: the registry, the client's view of the service, the calls
/// it made, and the instance processes.
struct Demo {
    endpoints: String,
    service: String,
    ttl: i64,
    client: Client,
    cache: ServiceCache,
    balanced: BalancedChannel,
    calls: CallLog,
    /// The instance processes by id; dropping one SIGKILLs it.
    instances: BTreeMap<&'static str, Process>,
}

impl Demo {
    /// Starts (or restarts) instance `id` as a child process.
    fn start_instance(&mut self, id: &'static str) -> Result<(), String> {
        let args = [
            "--endpoints",
            &self.endpoints,
            "instance",
            "--id",
            id,
            "--service",
            &self.service,
            "--ttl",
            &self.ttl.to_string(),
        ]
        .map(String::from);
        let process =
            Process::start(id, &args).map_err(|e| format!("cannot start instance {id}: {e}"))?;
        self.instances.insert(id, process);
        Ok(())
    }

    /// The demo's story; returns the summary, or which promise did not hold.
    async fn run(&mut self) -> Result<String, Box<dyn Error>> {
        // 1. Every instance registers and answers calls.
        let begun = Instant::now();
        for id in DEMO_IDS {
            self.start_instance(id)?;
        }
        wait_until(START_WITHIN, "all instances answered", || {
            DEMO_IDS
                .iter()
                .all(|id| self.calls.answered_since(id, begun))
        })
        .await?;
        // A moment of steady state, so the output shows a second of calls spread over all.
        tokio::time::sleep(STEADY_FOR).await;
        println!(
            "all {} instances answered: {}",
            DEMO_IDS.len(),
            self.calls.tally(begun, Instant::now())
        );

        // 2. Kill one without warning. Its lease (as granted: the server raises a TTL below
        // its minimum) bounds how long it can stay listed.
        let lease = self
            .cache
            .get(VICTIM)
            .ok_or_else(|| format!("{VICTIM} answered but is not listed"))?
            .lease;
        let granted = self
            .client
            .lease()
            .time_to_live(lease, false)
            .await?
            .map_or(self.ttl, |t| t.granted_ttl);
        let victim = self
            .instances
            .get_mut(VICTIM)
            .ok_or_else(|| format!("no process for {VICTIM}"))?;
        victim.kill();
        let killed = Instant::now();
        println!("killed instance {VICTIM} (SIGKILL; its lease has a {granted} s TTL)");

        // 3. Its lease runs out and the server deletes its key; the cache sees the deletion
        // and the channel stops routing to it. Until then, calls the balancer sends it fail.
        let limit = Duration::from_secs(granted.max(0) as u64) + DROP_SLACK;
        let routed_out = self.balanced.wait_routed(|ids| !ids.contains(VICTIM));
        if tokio::time::timeout(limit + Duration::from_secs(5), routed_out)
            .await
            .is_err()
        {
            return Err(
                format!("{VICTIM} was still routed to {limit:?} + 5 s after its kill").into(),
            );
        }
        let dropped = Instant::now();
        let took = dropped - killed;
        println!("dropped {VICTIM} after {} ms", took.as_millis());
        println!(
            "between the kill and the drop: {}",
            self.calls.tally(killed, dropped)
        );
        if took > limit {
            return Err(format!(
                "{VICTIM} left rotation {} ms after its kill; the promise is TTL + {} ms = {} ms",
                took.as_millis(),
                DROP_SLACK.as_millis(),
                limit.as_millis()
            )
            .into());
        }

        // 4. From the drop on, no call goes to it: none fails, the others answer them all.
        tokio::time::sleep(WATCH_OUT_FOR).await;
        let restarted = Instant::now();
        let out = self.calls.tally(dropped, restarted);
        println!("while {VICTIM} was out: calls={} {out}", out.calls());
        if out.calls() == 0 {
            return Err(format!("no call completed while {VICTIM} was out").into());
        }
        if out.failed > 0 || out.answered.contains_key(VICTIM) {
            return Err(format!("calls reached {VICTIM} after it was dropped: {out}").into());
        }

        // 5. A new process with the same id registers again and gets calls.
        self.start_instance(VICTIM)?;
        println!("restarted instance {VICTIM}");
        wait_until(START_WITHIN, "the restarted instance answered", || {
            self.calls.answered_since(VICTIM, restarted)
        })
        .await?;
        let back = restarted.elapsed();
        println!(
            "{VICTIM} answered again {} ms after its restart",
            back.as_millis()
        );

        Ok(format!(
            "all {} instances answered; {VICTIM} left rotation {} ms after its SIGKILL \
             (TTL {granted} s, limit {} ms); none of {} calls after that reached it or failed; \
             it answered again {} ms after its restart",
            DEMO_IDS.len(),
            took.as_millis(),
            limit.as_millis(),
            out.calls(),
            back.as_millis()
        ))
    }
}

/// Polls `done` until it holds, or fails after `limit` saying `what` did not happen.
async fn wait_until(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let end = Instant::now() + limit;
    while !done() {
        if Instant::now() >= end {
            return Err(format!("not within {limit:?}: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
