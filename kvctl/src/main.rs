//! `kvctl`: what etcdctl lacks, for operators of kv-server (or etcd): the recipes' state (who
//! holds which lock, who leads which election, queue depths, registered services), a cluster
//! status table, and snapshot downloads with progress. Tables by default, `-o json` for
//! scripts.

mod cli;
mod cluster;
mod connect;
mod error;
mod output;
mod recipes_view;
mod snapshot;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::CtlError;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    let out = cli.global.output;
    match cli.command {
        Command::Cluster(cli::ClusterCommand::Status) => {
            let client = connect::client(&cli.global).await?;
            cluster::status(&client, &cli.global, out).await
        }
        Command::Snapshot(cli::SnapshotCommand::Save { file }) => {
            let client = connect::client(&cli.global).await?;
            snapshot::save(&client, &file, out).await
        }
        Command::Lock(cli::LockCommand::List { prefix }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::locks(&client, &prefix, cli.global.max_keys, out).await
        }
        Command::Election(cli::ElectionCommand::List { prefix }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::elections(&client, &prefix, cli.global.max_keys, out).await
        }
        Command::Election(cli::ElectionCommand::Observe { name, count }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::observe(&client, &name, count, out).await
        }
        Command::Queue(cli::QueueCommand::Stats { name, prefix }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::queue_stats(&client, name.as_deref(), &prefix, cli.global.max_keys, out)
                .await
        }
        Command::Queue(cli::QueueCommand::Peek { name, limit }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::queue_peek(&client, &name, limit, cli.global.max_keys, out).await
        }
        Command::Queue(cli::QueueCommand::DeadLetter { name }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::dead_letters(&client, &name, cli.global.max_keys, out).await
        }
        Command::Services(cli::ServicesCommand::List { name, prefix }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::services(&client, name.as_deref(), &prefix, cli.global.max_keys, out)
                .await
        }
        Command::Services(cli::ServicesCommand::Watch { name, count }) => {
            let client = connect::client(&cli.global).await?;
            recipes_view::watch_service(&client, &name, count, out).await
        }
    }
}
