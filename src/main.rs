//! The `hsmgate` binary: parse the command line and hand over to the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hsmgate::cli::Cli::parse();
    hsmgate::cli::run(cli)
}
