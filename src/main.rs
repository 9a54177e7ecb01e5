//! The `rowcast` binary: parse the command line, set up logging, then serve, migrate or manage replication.

use std::process::ExitCode;

use clap::Parser;
use rowcast::config::{Cli, Command, ReplicationCommand};
use rowcast::shutdown::{self, Shutdown};
use rowcast::{App, app, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.config.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => app::migrate_only(&cli.config).await,
        Command::Replication(ReplicationCommand::Drop) => app::replication_drop(&cli.config).await,
        Command::Serve => {
            let shutdown = Shutdown::new();
            let app = App::build(cli.config, shutdown.clone()).await?;
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                shutdown::signal().await;
                tracing::info!("shutdown requested");
                on_signal.trigger();
            });
            app.run().await
        }
    }
}
