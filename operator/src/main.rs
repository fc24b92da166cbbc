use clap::Parser;
use kandle_operator::cli::{
    Cli, CollectArgs, Command, GatewayArgs, LogFormat, NodeCacheCommand, RunArgs,
};
use kandle_operator::leader::{self, LeaseConfig};
use kandle_operator::metrics::Metrics;
use kube::CustomResourceExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", kandle_operator::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Reference => {
            print!("{}", kandle_operator::reference::markdown());
            ExitCode::SUCCESS
        }
        Command::Render(args) => {
            let input = if args.file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&args.file)
            };
            let input = match input {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {}: {e}", args.file.display());
                    return ExitCode::FAILURE;
                }
            };
            let observed = match args.observed.as_ref().map(std::fs::read_to_string) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    let path = args.observed.as_ref().expect("read from it").display();
                    eprintln!("error: {path}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match kandle_operator::render::render(
                &input,
                &args.children.settings(true),
                &args.namespace,
                observed.as_deref(),
            ) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", args.file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Gateway(args) => match gateway(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "kandle gateway failed");
                ExitCode::FAILURE
            }
        },
        Command::NodeCache(NodeCacheCommand::Prepare { root, owner }) => {
            match kandle_operator::nodecache::prepare(&root, owner) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot prepare {}: {e}", root.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::NodeCache(NodeCacheCommand::Collect(args)) => match collect(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "node cache collector failed");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "kandle-operator failed");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    // Coloured only on a terminal: a pod's logs get no escape codes.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
}

async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let client = kube::Client::try_default().await?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    kandle_operator::gateway::run(client, &args, listener, terminated()).await
}

async fn collect(args: CollectArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let max_bytes = kandle_operator::quantity::nanos(&args.max_size)
        .filter(|n| *n >= 0)
        .map(|n| u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX))
        .ok_or_else(|| anyhow::anyhow!("--max-size {:?} is not a size", args.max_size))?;
    let client = kube::Client::try_default().await?;
    tokio::select! {
        () = kandle_operator::nodecache::collect(
            client,
            args.watch_namespace.as_deref(),
            args.root,
            max_bytes,
            Duration::from_secs(args.interval_seconds.max(1)),
        ) => {}
        () = terminated() => {}
    }
    Ok(())
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(kandle_operator::http::serve(
        args.metrics_addr,
        metrics.clone(),
    ));
    let image_volumes = match client.apiserver_version().await {
        Ok(info) => kandle_operator::build::image_volumes_by_default(&info.major, &info.minor),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API server's version; oci:// models will be pulled, not mounted as image volumes");
            false
        }
    };
    let controller = kandle_operator::controller::run(
        client.clone(),
        args.children.settings(image_volumes),
        args.watch_namespace.clone(),
        metrics.clone(),
        Arc::new(args.autoscaling.autoscaler()),
    );
    tracing::info!(crd = %kandle_operator::crd::ModelDeployment::crd_name(), "starting");
    if args.leader_election {
        let identity = match args.identity {
            Some(id) => id,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| format!("kandle-operator-{}", std::process::id())),
        };
        let config = LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        leader::lead(client, config, &metrics, controller).await?;
    } else {
        metrics.set_leader(true);
        controller.await;
    }
    server.abort();
    Ok(())
}
