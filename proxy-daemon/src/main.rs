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
        Command::Validate { paths, quiet } => proxy_daemon::validate::run(&paths, quiet),
        Command::Top {
            metrics_addr,
            interval_ms,
            iterations,
        } => proxy_daemon::top::run(
            metrics_addr,
            std::time::Duration::from_millis(interval_ms),
            iterations,
        ),
        Command::Run(args) => proxy_daemon::app::main(args),
        Command::Uninstall { bpf_pin_dir, stay } => {
            let code = uninstall(&bpf_pin_dir);
            if stay && code == ExitCode::SUCCESS {
                wait_for_termination();
            }
            code
        }
    }
}

fn uninstall(bpf_pin_dir: &std::path::Path) -> ExitCode {
    match proxy_daemon::capture::bpf::uninstall(bpf_pin_dir) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned in {}", bpf_pin_dir.display());
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for r in removed {
                println!("removed {r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("proxy-daemon uninstall: {e}");
            ExitCode::from(1)
        }
    }
}

/// Blocks until SIGTERM or SIGINT (a cleanup pod stays up until it is deleted).
fn wait_for_termination() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_ok() {
        println!("uninstalled; staying until stopped");
        let _ = set.wait();
    }
}
