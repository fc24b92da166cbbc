use clap::Parser;
use kandle_server::cli::{Cli, Command};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
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
            match kandle_server::pull::pull(&args.model, &args.dest, &args.fetch.options()).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    let transient = e.is_transient();
                    tracing::error!(error = %e, transient, "pull failed");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
