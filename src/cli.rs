//! The command line: `serve`, `check`, `audit verify`, `backup-keygen`,
//! `backup`, `restore`, `completions`, `man`, `version`. Parsing lives here; the
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
    /// Cluster set-up: `hsmgate cluster certs` issues the cluster CA and
    /// node certificates (docs/CLUSTER.md).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Generate the backup custodian key (X25519) and backup signing key
    /// (Ed25519) into a directory, and print the `[backup]` config lines.
    /// Keep custodian.key offline; give signer.key to the server.
    BackupKeygen {
        /// Created if missing; existing key files are never overwritten.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Write an encrypted backup of a stopped server's engine (auto seal
    /// mode; a running or sealed server: POST /v1/hsm/backup).
    Backup {
        #[arg(long, default_value = "config/hsmgate.toml")]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The backup file to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into a stopped server's fresh or zeroized engine
    /// (reads the init token from the data dir).
    Restore {
        /// The backup file.
        file: PathBuf,
        #[arg(long, default_value = "config/hsmgate.toml")]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The custodian's private key file (from backup-keygen, mode 0600).
        #[arg(long)]
        custodian_key: PathBuf,
        /// A file holding the new unseal passphrase (seal = "passphrase").
        #[arg(long)]
        unseal_passphrase_file: Option<PathBuf>,
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
pub enum ClusterCommand {
    /// Write a new cluster CA and a certificate per node (and gateway)
    /// into a directory; refuses to overwrite. Keep ca-key.pem offline.
    Certs {
        /// Created if missing.
        #[arg(long)]
        out_dir: PathBuf,
        /// Node ids, comma-separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Gateway names, comma-separated.
        #[arg(long, value_delimiter = ',')]
        gateways: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log and compare it with its stored
    /// heads: the sidecar `<log>.head` and, when the server is stopped and
    /// the store opens offline (auto mode), the head kept in the engine's
    /// store. Exit 0 when whole, 1 when broken or truncated, 2 on errors.
    Verify {
        /// The log; default: the configured one (`[audit] path`, or
        /// `<data dir>/audit.log`).
        path: Option<PathBuf>,
        /// Finds the log when PATH is not given (default
        /// `config/hsmgate.toml`), and the data dir whose store holds the
        /// second head witness (with PATH, only when given).
        #[arg(long)]
        config: Option<PathBuf>,
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
        } => audit_verify(path, config, head),
        Command::BackupKeygen { out_dir } => exit(backup_keygen(&out_dir)),
        Command::Cluster {
            command:
                ClusterCommand::Certs {
                    out_dir,
                    nodes,
                    gateways,
                },
        } => exit(cluster_certs(&out_dir, &nodes, &gateways)),
        Command::Backup {
            config,
            data_dir,
            out,
        } => exit(backup_offline(&config, data_dir, &out)),
        Command::Restore {
            file,
            config,
            data_dir,
            custodian_key,
            unseal_passphrase_file,
        } => exit(restore_offline(
            &file,
            &config,
            data_dir,
            &custodian_key,
            unseal_passphrase_file.as_deref(),
        )),
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
                println!("{}", crate::acl::describe(&cfg.acl));
                if let Some(addr) = cfg.dangerous_unfenced_listener {
                    println!(
                        "WARNING: {addr}: {}",
                        crate::gateway::dangerous_unfenced_bench::WARNING
                    );
                }
                ExitCode::SUCCESS
            }
            None => ExitCode::from(2),
        },
        Command::Serve { config, data_dir } => {
            let log_writer = init_tracing();
            let Some(mut cfg) = validate(&config) else {
                return ExitCode::from(2);
            };
            if let Some(dir) = &data_dir {
                cfg.data_dir = dir.clone();
            }
            harden_process();
            tracing::info!("{}", crate::acl::describe(&cfg.acl));
            let served = serve(cfg, data_dir);
            // Every line logged so far reaches stderr before the last word.
            drop(log_writer);
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hsmgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn exit(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cluster_certs(dir: &Path, nodes: &[u64], gateways: &[String]) -> Result<(), String> {
    if nodes.contains(&0) {
        return Err("node ids start at 1".into());
    }
    if gateways
        .iter()
        .any(|g| g.is_empty() || !g.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return Err("gateway names are letters, digits and '-'".into());
    }
    if dir.join("ca.pem").exists() {
        return Err(format!(
            "{} exists; refusing to overwrite a cluster CA",
            dir.join("ca.pem").display()
        ));
    }
    let out = crate::cluster::certs::generate(dir, nodes, gateways)?;
    for f in &out.files {
        println!("wrote {}", f.display());
    }
    println!("keep ca-key.pem offline: it issues every member's identity");
    Ok(())
}

fn backup_keygen(dir: &Path) -> Result<(), String> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let b64 = base64::engine::general_purpose::STANDARD;
    let keys = crate::engine::backup::keygen().map_err(|e| e.to_string())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let (custodian_pub, signer_pub) = (
        b64.encode(keys.custodian_public),
        b64.encode(keys.signer_public),
    );
    let files: [(&str, &[u8], u32); 4] = [
        ("custodian.key", &keys.custodian_private, 0o600),
        ("signer.key", &keys.signer_pkcs8, 0o600),
        ("custodian.pub", custodian_pub.as_bytes(), 0o644),
        ("signer.pub", signer_pub.as_bytes(), 0o644),
    ];
    for (name, _, _) in &files {
        if dir.join(name).exists() {
            return Err(format!(
                "{} exists; refusing to overwrite key files",
                dir.join(name).display()
            ));
        }
    }
    for (name, bytes, mode) in files {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes).and(f.sync_all()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!(
        "wrote {}/custodian.key (keep OFFLINE: it reads every backup)",
        dir.display()
    );
    println!(
        "wrote {}/signer.key (give to the server, mode 0600)",
        dir.display()
    );
    println!("[backup]");
    println!(
        "custodian_public_key = \"{}\"",
        b64.encode(keys.custodian_public)
    );
    println!(
        "signing_key_file = \"{}\"",
        dir.join("signer.key").display()
    );
    println!("trusted_signers = [\"{}\"]", b64.encode(keys.signer_public));
    Ok(())
}

fn open_engine(config: &Path, data_dir: Option<PathBuf>) -> Result<crate::engine::Engine, String> {
    let mut cfg = load(config).ok_or("config errors; nothing was changed")?;
    if let Some(dir) = data_dir {
        cfg.data_dir = dir;
    }
    crate::engine::Engine::open(&cfg.data_dir, cfg.engine.clone()).map_err(|e| {
        format!(
            "opening the engine in {}: {e} (is the server still running? stop it first)",
            cfg.data_dir.display()
        )
    })
}

fn backup_offline(config: &Path, data_dir: Option<PathBuf>, out: &Path) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let engine = open_engine(config, data_dir)?;
    if engine.state() != crate::engine::EngineState::Active {
        return Err(format!(
            "the engine is {}; back up a sealed engine through POST /v1/hsm/backup after unsealing",
            engine.state().as_str()
        ));
    }
    // Whoever can open the data dir and its key file already holds every key.
    let local = crate::engine::Principal {
        username: "local-cli".into(),
        role: crate::engine::Role::CryptoOfficer,
        issued_at: std::time::SystemTime::now(),
        expires_at: std::time::SystemTime::now(),
        app_policies: Vec::new(),
    };
    eprintln!("hsmgate: reading the store (one read transaction) ...");
    let (summary, bytes) = engine
        .backup_with_progress(&local, &mut percent_printer())
        .map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    f.write_all(&bytes)
        .and(f.sync_all())
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "backup written: {} ({} bytes, {} users, {} keys, sha256 {})",
        out.display(),
        bytes.len(),
        summary.users,
        summary.keys,
        hex::encode(crate::engine::crypto::sha256(&bytes))
    );
    Ok(())
}

/// Prints backup/restore progress to stderr as a percentage per stage: a
/// line at the start, at every 10 % step and at the end (so a log of a
/// million-record restore stays short, and a terminal shows it moving).
fn percent_printer() -> impl FnMut(&'static str, usize, usize) {
    let mut last: Option<(&'static str, usize)> = None;
    move |stage, done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let step = pct / 10;
        let shown = match last {
            Some((s, st)) if s == stage => st,
            _ => usize::MAX,
        };
        if step != shown {
            eprintln!("hsmgate: {stage}: {pct:>3}% ({done}/{total})");
            last = Some((stage, step));
        }
    }
}

fn restore_offline(
    file: &Path,
    config: &Path,
    data_dir: Option<PathBuf>,
    custodian_key: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), String> {
    use crate::engine::secret::SecretString;
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let custodian =
        crate::engine::backup::read_secret_file(custodian_key).map_err(|e| e.to_string())?;
    let passphrase = match passphrase_file {
        Some(p) => {
            let raw = crate::engine::backup::read_secret_file(p).map_err(|e| e.to_string())?;
            let text = String::from_utf8(raw.to_vec())
                .map_err(|_| format!("{} is not UTF-8", p.display()))?;
            Some(SecretString::new(
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
        None => None,
    };
    let engine = open_engine(config, data_dir)?;
    let token = std::fs::read_to_string(engine.init_token_path()).map_err(|e| {
        format!(
            "no init token at {} ({e}): restore needs a fresh or zeroized engine",
            engine.init_token_path().display()
        )
    })?;
    eprintln!(
        "hsmgate: checking {} ({} bytes) ...",
        file.display(),
        bytes.len()
    );
    let (summary, outcome) = engine
        .restore_with_progress(
            &bytes,
            &custodian,
            &SecretString::new(token),
            passphrase.as_ref(),
            &mut percent_printer(),
        )
        .map_err(|e| format!("{e}; nothing was changed"))?;
    println!(
        "restored: {} users, {} keys (backup of {}); seal {}",
        summary.users,
        summary.keys,
        crate::api::rfc3339(summary.created_at),
        outcome.seal_type
    );
    for (i, share) in outcome.shares.iter().enumerate() {
        println!("unseal share {}: {share}", i + 1);
    }
    Ok(())
}

fn audit_verify(path: Option<PathBuf>, config: Option<PathBuf>, head: Option<PathBuf>) -> ExitCode {
    // The config names the data dir, where the engine's store keeps the
    // second head witness. With PATH given the config is optional.
    let explicit = config.is_some();
    let config = config.unwrap_or_else(|| PathBuf::from("config/hsmgate.toml"));
    let (path, cfg) = match path {
        Some(p) if !explicit => (p, None),
        Some(p) => match load(&config) {
            Some(cfg) => (p, Some(cfg)),
            None => return ExitCode::from(2),
        },
        None => match load(&config) {
            Some(cfg) => (cfg.audit.log_path(&cfg.data_dir), Some(cfg)),
            None => return ExitCode::from(2),
        },
    };
    let head = head.unwrap_or_else(|| audit::head_path(&path));
    let head_present = head.exists();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("hsmgate: audit log {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let sidecar = if head_present {
        match audit::read_head(&head) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("hsmgate: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let mut report = audit::verify_bytes(&bytes, sidecar.as_ref());
    let sidecar_line = if report.head_checked {
        format!("sidecar head {}: matches", head.display())
    } else {
        format!("sidecar head {}: not present", head.display())
    };
    // The store's witness: compared when the chain and the sidecar agree
    // (a break already found is reported first).
    let store_line = match &cfg {
        None => "store head: not checked (give --config to compare the head kept in the \
                  engine's store)"
            .to_string(),
        Some(cfg) => {
            let store_path = cfg.data_dir.join("store.redb");
            match store_head(cfg) {
                Err(why) => format!("store head {}: not checked ({why})", store_path.display()),
                Ok(None) => format!(
                    "store head {}: none recorded (a store from before the witness, or restored)",
                    store_path.display()
                ),
                Ok(Some(stored)) => {
                    if report.broken.is_none() {
                        let by_store = audit::verify_bytes(&bytes, Some(&stored));
                        if let Some(mut b) = by_store.broken {
                            b.detail = format!(
                                "the engine's store head {} (seq {}): {}",
                                store_path.display(),
                                stored.seq,
                                b.detail
                            );
                            report.broken = Some(b);
                        }
                    }
                    format!(
                        "store head {}: seq {}{}",
                        store_path.display(),
                        stored.seq,
                        if report.broken.is_none() {
                            ", matches"
                        } else {
                            ""
                        }
                    )
                }
            }
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
                        "no stored head at {}: truncation at the end cannot be detected \
                         from the sidecar",
                        head.display()
                    )
                }
            );
            println!("{sidecar_line}");
            println!("{store_line}");
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
            println!("{store_line}");
            ExitCode::from(1)
        }
    }
}

/// The engine store's audit head, read offline without changing anything
/// (see [`crate::engine::store::read_audit_head_offline`]).
fn store_head(cfg: &Config) -> Result<Option<audit::Head>, String> {
    use crate::engine::store::{self, MasterKey};
    let store_path = cfg.data_dir.join("store.redb");
    if !store_path.exists() {
        return Err("no store: the engine is uninitialized or zeroized".into());
    }
    let key_path = cfg.data_dir.join("master.key");
    let kek = if key_path.exists() {
        Some(
            MasterKey::load(&key_path)
                .map_err(|e| e.to_string())?
                .into_secret(),
        )
    } else {
        None
    };
    store::read_audit_head_offline(&store_path, kek)
        .map(|h| {
            h.map(|h| audit::Head {
                seq: h.seq,
                hash: h.hash,
            })
        })
        .map_err(|e| e.to_string())
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
///
/// Lines go to stderr through one writer thread (`tracing-appender`), so a
/// request's access-log line costs a queue push, not a `write` under
/// stderr's lock on an async worker (measured: about a tenth of the
/// server's CPU at 5k req/s, docs/BENCHMARKS.md). The queue holds 128k
/// lines; when it is full a logging thread waits (`lossy(false)`): no line
/// is dropped. Lines still queued are written when the returned guard drops.
fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("hsmgate-log")
        // The thread writes whatever is queued, then flushes: one `write`
        // per batch of lines.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let filter = tracing_subscriber::EnvFilter::try_from_env("HSMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a person at a terminal, never in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    guard
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
        if let Some(addr) = server.cluster_addr() {
            // Mutual TLS, members only: see docs/CLUSTER.md.
            println!("hsmgate: cluster port {addr} (mutual TLS, node certificates only)");
        }
        if let Some(addr) = server.dangerous_unfenced_addr() {
            eprintln!(
                "hsmgate: {}",
                crate::gateway::dangerous_unfenced_bench::WARNING
            );
            println!("hsmgate: listening dangerous-unfenced-bench http://{addr}");
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
