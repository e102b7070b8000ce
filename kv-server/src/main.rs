//! `kv-server`: an etcd-v3-compatible key-value store. With no flags it runs a one-member
//! cluster named `default` with data in `./default.kv`, serving clients on 127.0.0.1:2379.

use clap::Parser;
use kv_server::config::{Flags, LogFormat};
use kv_server::server;

/// mimalloc instead of glibc's malloc: the request path allocates and frees many small
/// buffers across threads, and glibc's malloc/free took 13-17 % of the server's CPU
/// (`kv_server::allocator` holds its tuning).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match kv_server::runtime::builder().build() {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("kv-server: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr, as etcd's do; colour only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match flags.log_format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        // Flattened, so a line reads {"timestamp":..,"level":..,"message":..,"address":..}:
        // the fields shippers index sit at the top level.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    tracing::debug!(
        "allocator: mimalloc, arena eager commit {}",
        kv_server::allocator::arena_eager_commit()
    );
    tracing::debug!(
        "runtime: woken tasks run in order (LIFO slot off): {}",
        kv_server::runtime::LIFO_SLOT_DISABLED
    );

    let running = match server::start(&flags).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("kv-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let stop = running.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("received shutdown signal; stopping");
        stop.cancel();
    });
    match running.wait().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
