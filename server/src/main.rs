use clap::Parser;
use kandle_server::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    kandle_server::cpus::size_thread_pools();
    kandle_server::heap::keep_freed_buffers();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("kandle-server: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            kandle_server::logging::init(args.log_format);
            match kandle_server::serve::serve(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "kandle-server failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pull(args) => {
            kandle_server::logging::init(args.log_format);
            let outcome =
                kandle_server::pull::pull(&args.model, &args.dest, &args.fetch.options()).await;
            if let Err(e) = &outcome {
                tracing::error!(error = %e, transient = e.is_transient(), "pull failed");
            }
            let (code, report) = kandle_server::pull::report(&outcome);
            if let Some(path) = &args.report_file
                && let Err(e) = kandle_server::pull::write_report(&report, path)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pull report");
            }
            ExitCode::from(code)
        }
        Command::Push(args) => {
            kandle_server::logging::init(args.log_format);
            let cache = args
                .cache_dir
                .clone()
                .unwrap_or_else(kandle_server::pull::default_cache_dir);
            match kandle_server::pull::push(
                &args.source,
                &args.target,
                &cache,
                &args.fetch.options(),
            )
            .await
            {
                Ok(pinned) => {
                    println!("{pinned}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, transient = e.is_transient(), "push failed");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
