//! The `egressmon` binary: parses the command line and reports errors as one
//! clear line (with its causes) and a non-zero exit.

use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = egressmon::cli::Cli::parse();
    if let Err(err) = egressmon::cli::main_with(cli) {
        eprintln!("egressmon: {err:#}");
        std::process::exit(1);
    }
}
