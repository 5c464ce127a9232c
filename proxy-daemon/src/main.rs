//! proxy-daemon: thin main. Parsing, logging and exit codes here; wiring in `app`.
use std::process::ExitCode;

use clap::Parser;
use proxy_daemon::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("proxy-daemon {}", proxy_daemon::version::VERSION);
            ExitCode::SUCCESS
        }
        Command::Validate { paths } => proxy_daemon::validate::run(&paths),
        Command::Run(args) => proxy_daemon::app::main(args),
    }
}
