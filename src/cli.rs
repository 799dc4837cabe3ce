//! The command line: `serve`, `check`, `audit verify`, `completions`, `man`,
//! `version`. Parsing lives here; the
//! work lives in the library.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::audit;
use crate::config::{self, Config};
use crate::gateway::{reload, Server};
use crate::netfilter::Netfilter;

#[derive(Parser, Debug)]
#[command(
    name = "hsmgate",
    version,
    about = "A network access-control gateway in front of HSMs, with a built-in software HSM engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the gateway with the built-in engine.
    Serve {
        /// The main config file.
        #[arg(long, default_value = "config/hsmgate.toml")]
        config: PathBuf,
        /// Overrides `engine.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config tree (config file and policies) without starting.
    Check {
        #[arg(long, default_value = "config/hsmgate.toml")]
        config: PathBuf,
    },
    /// Work with the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
    /// Print the version.
    Version,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log and compare it with its stored
    /// head (`<log>.head`). Exit 0 when whole, 1 when broken, 2 on errors.
    Verify {
        /// The log; default: the configured one (`[audit] path`, or
        /// `<data dir>/audit.log`).
        path: Option<PathBuf>,
        /// Used to find the log when PATH is not given.
        #[arg(long, default_value = "config/hsmgate.toml")]
        config: PathBuf,
        /// The head file to compare with; default `<log>.head`.
        #[arg(long)]
        head: Option<PathBuf>,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Version => {
            println!("hsmgate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "hsmgate", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hsmgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Audit {
            command: AuditCommand::Verify { path, config, head },
        } => audit_verify(path, &config, head),
        Command::Check { config } => match validate(&config) {
            Some(cfg) => {
                let filter = Netfilter::build(&cfg);
                let digest = reload::Tree::of(&cfg)
                    .digest()
                    .map_or_else(|e| format!("unavailable: {e}"), |d| d.short());
                println!(
                    "config OK: {} ({} listeners, {} security groups; sha256 {digest})",
                    config.display(),
                    filter.listeners().len(),
                    cfg.groups.len()
                );
                ExitCode::SUCCESS
            }
            None => ExitCode::from(2),
        },
        Command::Serve { config, data_dir } => {
            init_tracing();
            let Some(mut cfg) = validate(&config) else {
                return ExitCode::from(2);
            };
            if let Some(dir) = &data_dir {
                cfg.data_dir = dir.clone();
            }
            harden_process();
            match serve(cfg, data_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hsmgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn audit_verify(path: Option<PathBuf>, config: &Path, head: Option<PathBuf>) -> ExitCode {
    let path = match path {
        Some(p) => p,
        None => match load(config) {
            Some(cfg) => cfg.audit.log_path(&cfg.data_dir),
            None => return ExitCode::from(2),
        },
    };
    let head = head.unwrap_or_else(|| audit::head_path(&path));
    let head_present = head.exists();
    let report = match audit::verify_file(&path, head_present.then_some(head.as_path())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hsmgate: {e}");
            return ExitCode::from(2);
        }
    };
    match &report.broken {
        None => {
            let (seq, hash) = report
                .head
                .as_ref()
                .map_or((0, audit::GENESIS), |h| (h.seq, h.hash.as_str()));
            println!(
                "audit log OK: {} ({} records; head seq {seq} sha256 {hash}; {})",
                path.display(),
                report.records,
                if report.head_checked {
                    format!("matches the stored head {}", head.display())
                } else {
                    format!(
                        "no stored head at {}: truncation at the end cannot be detected",
                        head.display()
                    )
                }
            );
            ExitCode::SUCCESS
        }
        Some(b) => {
            println!(
                "audit log BROKEN: {} at record {} (line {}): {}",
                path.display(),
                b.seq,
                b.line,
                b.detail
            );
            println!(
                "records before it verify: {} (head seq {})",
                report.records,
                report.head.as_ref().map_or(0, |h| h.seq)
            );
            ExitCode::from(1)
        }
    }
}

fn load(path: &Path) -> Option<Config> {
    report(config::load(path))
}

/// What `check`, `serve` and every reload run (see [`reload::validate`]).
fn validate(path: &Path) -> Option<Config> {
    report(reload::validate(path).map(|v| v.config))
}

fn report(loaded: Result<Config, config::ConfigErrors>) -> Option<Config> {
    match loaded {
        Ok(cfg) => Some(cfg),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "hsmgate: {} error(s) in the config tree; nothing was changed",
                errors.0.len()
            );
            None
        }
    }
}

/// `HSMGATE_LOG` filters; `HSMGATE_LOG_FORMAT=json` writes one JSON object
/// per line (for log shippers), anything else the human format. The access
/// log's `request_id` is a field in both.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HSMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr cannot be written (its file's disk is full) the
        // subscriber would report that with `eprintln!`, which panics on
        // the same error: in the request handler that logged. A log line
        // is lost instead (the audit log has its own failure path).
        .log_internal_errors(false);
    if std::env::var("HSMGATE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// No core dumps: a dump of this process would hold the master key and
/// every loaded key in the clear.
fn harden_process() {
    use nix::sys::resource::{setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!(error = %e, "could not disable core dumps (RLIMIT_CORE)");
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
}

fn serve(cfg: Config, data_dir: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut server = Server::bind(cfg).await?;
        server.set_data_dir_override(data_dir);
        tracing::info!(sha256 = %server.config_digest(), "config loaded");
        let cert = server.certificate();
        tracing::info!(
            cert = %cert.cert_path.display(),
            sha256 = %cert.fingerprint,
            generated = cert.generated,
            "TLS certificate"
        );
        let engine = server.engine();
        tracing::info!(state = engine.state().as_str(), "engine open");
        for (name, addr) in server.local_addrs() {
            // A stable line on stdout that scripts and tests can wait for.
            println!("hsmgate: listening {name} https://{addr}");
        }
        if let Some(addr) = server.metrics_addr() {
            // Plain HTTP on purpose: see docs/OPERATIONS.md.
            println!("hsmgate: listening metrics http://{addr}");
        }
        ignore_file_size_signal();
        server.run(shutdown_signal()).await;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

/// A file-size limit (`ulimit -f`, systemd `LimitFSIZE=`) reached while
/// writing the audit log must fail that write (EFBIG: the audit-failure
/// path refuses admin requests and raises the metric), not kill the whole
/// server with SIGXFSZ's default action. Listening for the signal replaces
/// that action; the write then returns the error.
fn ignore_file_size_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGXFSZ as i32,
    )) {
        Ok(mut sig) => {
            tokio::spawn(async move {
                // Logged once: the log may be the file over the limit, and
                // each failed log write would raise the signal again.
                if sig.recv().await.is_some() {
                    tracing::warn!("file size limit reached (SIGXFSZ): writes past it fail");
                }
                while sig.recv().await.is_some() {}
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
