//! The `hsmgate` binary: parse the command line and hand over to the library.
use clap::Parser;

/// mimalloc instead of glibc malloc: freed memory goes back to the system
/// after connection churn, and allocation is cheaper on the request path
/// (docs/BENCHMARKS.md, "Memory under attack" and the allocator rows).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = hsmgate::cli::Cli::parse();
    hsmgate::cli::run(cli)
}
