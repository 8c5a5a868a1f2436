//! The `wsbroker` command: run a node, check a configuration, or try the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wsbroker::config::{self, Config};
use wsbroker::{demo, logging, server};

#[derive(Parser)]
#[command(
    name = "wsbroker",
    version,
    about = "WebSocket session-broker reverse proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and print it with defaults filled in.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a demo upstream and one node in front of it; nothing else needed.
    Demo {
        /// Public listener of the demo node.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Serve only the demo application on `--listen` (an upstream for
        /// nodes started separately).
        #[arg(long)]
        app_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{}: invalid configuration:\n{errors}", config.display());
                    return ExitCode::from(1);
                }
            };
            logging::init(&cfg.log);
            report(runtime().and_then(|rt| rt.block_on(run(cfg))))
        }
        Command::Demo { listen, app_only } => {
            logging::init(&config::LogConfig {
                format: config::LogFormat::Text,
                level: "warn".into(),
            });
            if app_only {
                return report(runtime().and_then(|rt| rt.block_on(run_app(listen))));
            }
            report(runtime().and_then(|rt| rt.block_on(run_demo(listen))))
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            print!("{}", config::render_effective(&c));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: invalid configuration:\n{errors}", path.display());
            ExitCode::from(1)
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsbroker: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    wsbroker::runtime::build().context("starting the async runtime")
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the node runs until drained through the admin API.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let node = server::start(cfg).await.context("starting the node")?;
    node.run_until(stop_signal()).await;
    Ok(())
}

async fn run_demo(listen: SocketAddr) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let node = demo::start(listen, stop.clone())
        .await
        .context("starting the demo")?;
    println!("{}", demo::banner(&node));
    node.run_until(stop_signal()).await;
    stop.cancel();
    Ok(())
}

async fn run_app(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!("demo application on ws://{listen} (echo; /chat relays between clients)");
    let stop = CancellationToken::new();
    let app = tokio::spawn(demo::serve_app(listener, stop.clone()));
    stop_signal().await;
    stop.cancel();
    let _ = app.await;
    Ok(())
}
