//! The attack-and-fault harness (`benches/attack.sh`): floods a real hsmgate
//! server on loopback and measures what the attacks cost the server and its
//! allowed clients. Only 127.0.0.0/8 traffic.
//!
//! The server runs as a child process with its own config tree: 127.0.0.0/24
//! is the app network (127.0.0.1 is also the admin network), everything from
//! 127.1.0.0 up belongs to no group, so the listener must drop it at accept.
//! Scenarios (each "with" run is interleaved with a "without" run in the
//! same round; medians over ROUNDS):
//!
//! a. brute force from outside: ATTEMPTS admin logins (a real TLS client
//!    that would POST `/v1/hsm/login` if the handshake ever completed) from
//!    SOURCES distinct untrusted addresses; the engine's login counters are
//!    read from `/metrics` and `/v1/hsm/status` before and after; allowed
//!    clients' transit-encrypt throughput during the flood vs without it.
//! b. denied-connection flood: connect-and-wait-for-close from untrusted
//!    addresses against hsmgate and against a bare tokio accept-and-close
//!    loop (this binary, `bare-accept`), same client; allowed clients' p99
//!    during the flood against hsmgate.
//! c. slowloris: HALF_OPEN half-open connections from one allowed source
//!    (half stop inside the TLS ClientHello, half finish TLS and trickle
//!    request headers), reopened as the server closes them; others' p99.
//! d. memory: VmRSS / VmHWM of the server idle, with KEEPALIVE kept-alive
//!    connections open, and after MEM_FLOOD distinct untrusted sources.
//!
//! PIN=1 runs each flood (a, b, d) in a process of its own (`attack flood`)
//! pinned to other CPUs than this process (the allowed client), hsmgate and
//! the bare loop, in the runs with and without the flood alike: see
//! `Attacker` and `Pinning`, and docs/SECURITY.md for what it measures.
//!
//! The file lives in a subdirectory so Cargo does not infer a `[[bench]]`
//! target; it is built as `--example attack`. Knobs: see benches/attack.sh.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

struct Knobs {
    attempts: u64,
    sources: u64,
    rounds: u64,
    duration: Duration,
    conns: u64,
    flood_conc: u64,
    half_open: u64,
    keepalive: u64,
    mem_flood: u64,
    scenarios: String,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            attempts: env_num("ATTEMPTS", 1_000_000),
            sources: env_num("SOURCES", 10_000),
            rounds: env_num("ROUNDS", 3).max(1),
            duration: Duration::from_secs(env_num("DURATION", 10).max(1)),
            conns: env_num("CONNS", 16).max(1),
            flood_conc: env_num("FLOOD_CONC", 128).max(1),
            half_open: env_num("HALF_OPEN", 1000),
            keepalive: env_num("KEEPALIVE", 10_000),
            mem_flood: env_num("MEM_FLOOD", 1_000_000),
            scenarios: std::env::var("SCENARIOS").unwrap_or_else(|_| "a b c d".into()),
        }
    }
    fn wants(&self, s: &str) -> bool {
        self.scenarios.split_whitespace().any(|x| x == s)
    }
}

/// Untrusted source number `i`: 127.(1 + i/62500).(i/250 % 250).(i%250 + 1),
/// never in 127.0.0.0/24, never a .0 or .255 host.
fn untrusted(i: u64) -> IpAddr {
    let i = i % 15_000_000;
    IpAddr::V4(Ipv4Addr::new(
        127,
        (1 + i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// --- the server ------------------------------------------------------------

struct Server {
    _dir: tempfile::TempDir,
    child: Child,
    api: SocketAddr,
    metrics: SocketAddr,
    data_dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config the harness runs: shipped defaults everywhere except where a
/// figure would otherwise measure a limiter instead of the attack (written
/// down in docs/SECURITY.md next to the figures).
const GROUPS: &str = r#"[group.apps]
description = "the app network; 127.1.0.0 and up is in no group"
rules = [{ source = "127.0.0.0/24" }]

[group.admins]
rules = [{ source = "127.0.0.1/32" }]

[group.break-glass]
rules = [{ source = "127.0.0.1/32" }]
"#;

const RATE_LIMITS: &str = r#"[rate_limits]
# Above the offered load, so throughput measures the attack's cost, not a
# limiter; login and admin keep the shipped defaults.
principal = { rate = 1000000, per = "second", burst = 1000000 }
key = { rate = 1000000, per = "second", burst = 1000000 }
sweep_interval_seconds = 5

[rate_limits.source]
transit = { rate = 1000000, per = "second", burst = 1000000 }
health = { rate = 1000000, per = "second", burst = 1000000 }

[rate_limits.connections]
# Default per source (256); the total is raised from 8192 so that
# KEEPALIVE=10000 connections fit, and the idle timeout from 60 s so that
# they stay open while the harness opens the rest.
per_source = 256
total = 20000
idle_timeout_seconds = 600
"#;

fn start_server(bin: &Path) -> Res<Server> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("security-groups.toml"), GROUPS)?;
    std::fs::write(policies.join("rate-limits.toml"), RATE_LIMITS)?;
    let config = dir.path().join("hsmgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"policies_dir = "policies"
[engine]
data_dir = "{data}"

[[listener]]
name = "api"
address = "127.0.0.1:0"
security_groups = ["apps", "admins"]
admin_groups = ["admins"]

[[listener]]
name = "break-glass"
address = "127.0.0.1:0"
security_groups = ["break-glass"]
admin_groups = ["break-glass"]
channel = "break-glass"

[metrics]
enabled = true
address = "127.0.0.1:0"
security_groups = ["admins"]
"#,
            data = data_dir.display()
        ),
    )?;
    let check = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    if !check.status.success() {
        return Err(format!(
            "hsmgate check refused the harness config:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        )
        .into());
    }
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env(
            "HSMGATE_LOG",
            std::env::var("HSMGATE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("hsmgate: listening ") {
                if let Some((name, url)) = rest.split_once(' ') {
                    let addr = url.rsplit('/').next().unwrap_or("").to_string();
                    let _ = tx.send((name.to_string(), addr));
                }
            }
        }
    });
    let (mut api, mut metrics) = (None, None);
    while api.is_none() || metrics.is_none() {
        let (name, addr) = rx.recv_timeout(Duration::from_secs(120)).map_err(|_| {
            format!(
                "hsmgate did not start; log:\n{}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
            )
        })?;
        match name.as_str() {
            "api" => api = Some(addr.parse()?),
            "metrics" => metrics = Some(addr.parse()?),
            _ => {}
        }
    }
    Ok(Server {
        _dir: dir,
        child,
        api: api.unwrap(),
        metrics: metrics.unwrap(),
        data_dir,
    })
}

/// Open file descriptors of `pid` (sockets included).
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU seconds of process `pid` so far (`/proc/<pid>/stat`).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    // USER_HZ is 100 on every Linux architecture.
    (ticks(11) + ticks(12)) / 100.0
}

// --- a minimal HTTP/1.1 client over TLS -------------------------------------

/// A real TLS 1.3 ClientHello as rustls sends it to `to` (with the harness's
/// trust roots and key shares), for replay: the listener must close before
/// reading it, so what it holds does not change the verdict, and replaying
/// it spends the attacker's CPU on connections instead of key generation.
fn client_hello(cert_pem: &Path, to: SocketAddr) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        client_config(cert_pem),
        ServerName::IpAddress(to.ip().into()),
    )
    .expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ClientHello");
    }
    out
}

fn tls_connector(cert_pem: &Path) -> TlsConnector {
    TlsConnector::from(client_config(cert_pem))
}

fn client_config(cert_pem: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(cert_pem).expect("server certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("PEM")).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let s = socket.connect(to).await?;
    s.set_nodelay(true)?;
    // RST on close: no TIME_WAIT pile-up on the client side. (Deprecated
    // because a non-zero linger blocks in drop; a zero linger does not.)
    #[allow(deprecated)]
    s.set_linger(Some(Duration::ZERO))?;
    Ok(s)
}

struct Http {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(tls: &TlsConnector, source: IpAddr, to: SocketAddr) -> Res<Http> {
        let tcp = tcp_from(source, to).await?;
        let tls = tokio::time::timeout(
            Duration::from_secs(30),
            tls.connect(ServerName::IpAddress(to.ip().into()), tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out")??;
        Ok(Http {
            tls,
            buf: Vec::new(),
        })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Res<(u16, Vec<u8>)> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            req.push_str(&format!("X-Vault-Token: {t}\r\n"));
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        self.tls.write_all(&out).await?;
        read_response(&mut self.tls, &mut self.buf).await
    }
}

/// Reads one HTTP/1.1 response with a Content-Length (what hyper sends for
/// a full body) from `stream`, keeping any bytes after it in `buf`.
async fn read_response<S: AsyncReadExt + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Res<(u16, Vec<u8>)> {
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_string();
    let status: u16 = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or("response without Content-Length")?;
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed mid-body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Ok((status, body))
}

async fn call(
    tls: &TlsConnector,
    to: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Res<Value> {
    let mut c = Http::connect(tls, ip("127.0.0.1"), to).await?;
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&body)?
    };
    let (status, got) = c.request(method, path, token, &body).await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&got)
        )
        .into());
    }
    Ok(if got.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&got)?
    })
}

/// Plain-HTTP `GET /metrics` from 127.0.0.1: every sample as name{labels} → value.
async fn scrape(metrics: SocketAddr) -> Res<BTreeMap<String, f64>> {
    let mut s = tcp_from(ip("127.0.0.1"), metrics).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut s, &mut buf).await?;
    if status != 200 {
        return Err(format!("/metrics: {status}").into());
    }
    let mut out = BTreeMap::new();
    for line in String::from_utf8(body)?.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.rsplit_once(' ') {
            if let Ok(v) = v.parse() {
                out.insert(k.to_string(), v);
            }
        }
    }
    Ok(out)
}

fn sum(m: &BTreeMap<String, f64>, prefix: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

// --- the allowed clients' load -----------------------------------------------

struct Setup {
    tls: TlsConnector,
    api: SocketAddr,
    officer: String,
    app: String,
    encrypt_body: Arc<Vec<u8>>,
}

#[derive(Clone, Copy, Default)]
struct LoadResult {
    ops_per_s: f64,
    p99_ms: f64,
    errors: u64,
}

/// CONNS keep-alive connections from 127.0.0.1, each encrypting 1 KiB in a
/// loop until `stop`; ops/s and p99 over the time it ran.
async fn load(
    setup: Arc<Setup>,
    conns: u64,
    stop: Arc<AtomicBool>,
    ready: Vec<std::sync::mpsc::Sender<()>>,
) -> LoadResult {
    // Connections first (their handshakes are not part of the figure).
    let mut opened = Vec::new();
    for _ in 0..conns {
        opened.push(
            Http::connect(&setup.tls, ip("127.0.0.1"), setup.api)
                .await
                .ok(),
        );
    }
    for r in ready {
        let _ = r.send(());
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for conn in opened {
        let setup = setup.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut conn: Option<Http> = conn;
            while !stop.load(Ordering::Relaxed) {
                if conn.is_none() {
                    match Http::connect(&setup.tls, ip("127.0.0.1"), setup.api).await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().unwrap();
                let t = Instant::now();
                match c
                    .request(
                        "POST",
                        "/v1/transit/encrypt/bench",
                        Some(&setup.app),
                        &setup.encrypt_body,
                    )
                    .await
                {
                    Ok((200, _)) => lat.push(t.elapsed().as_micros() as u64),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = None;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let p99 = if all.is_empty() {
        f64::NAN
    } else {
        all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    LoadResult {
        ops_per_s: all.len() as f64 / secs,
        p99_ms: p99,
        errors,
    }
}

/// Runs the load on its own runtime thread for `d` (or until `until` is set
/// when given), so a flood on the main runtime cannot starve its scheduling.
/// Returns once the load's connections are open.
fn load_thread(
    setup: Arc<Setup>,
    conns: u64,
    d: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<LoadResult> {
    let (ready, is_ready) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut notify = vec![ready];
            if let Some(d) = d {
                // The timer starts when the connections are open.
                let (tx, rx) = std::sync::mpsc::channel();
                notify.push(tx);
                let stop2 = stop.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = rx.recv();
                    std::thread::sleep(d);
                    stop2.store(true, Ordering::Relaxed);
                });
            }
            load(setup, conns, stop, notify).await
        })
    });
    let _ = is_ready.recv();
    h
}

fn load_for(setup: &Arc<Setup>, conns: u64, d: Duration) -> LoadResult {
    load_thread(
        setup.clone(),
        conns,
        Some(d),
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .unwrap()
}

// --- floods ------------------------------------------------------------------

#[derive(Default, Serialize, Deserialize)]
struct FloodCount {
    /// Connections whose close (EOF or reset) the client saw.
    closed: AtomicU64,
    /// TLS handshakes that completed (brute force: must stay 0).
    handshakes: AtomicU64,
    /// HTTP answers to a login (must stay 0).
    answered: AtomicU64,
    /// Connect errors (the client's own limits, not the server's verdict).
    connect_errors: AtomicU64,
    /// The server kept the connection open for 10 s without a byte.
    hung: AtomicU64,
}

/// One brute-force attempt from `source`: a TCP connection that opens with
/// a real ClientHello and, had the server answered it, would have gone on to
/// POST a wrong admin password. Any byte back counts in `handshakes`.
async fn login_attempt(hello: &[u8], source: IpAddr, to: SocketAddr, n: &FloodCount) {
    let mut tcp = match tcp_from(source, to).await {
        Ok(t) => t,
        Err(_) => {
            n.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    // The write may already meet the server's reset: that is the verdict.
    let _ = tcp.write_all(hello).await;
    let mut b = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut b)).await {
        Err(_) => {
            n.hung.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            n.closed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(_)) => {
            n.handshakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One denied connection: connect, wait for the server to close.
async fn connect_and_wait(source: IpAddr, to: SocketAddr, n: &FloodCount) {
    let mut tcp = match tcp_from(source, to).await {
        Ok(t) => t,
        Err(_) => {
            n.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut b = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut b)).await {
        Err(_) => {
            n.hung.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            n.closed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(_)) => {
            // A byte from a denied listener: counted like a handshake.
            n.handshakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy, Serialize, Deserialize)]
enum FloodKind {
    Login,
    Connect,
}

/// One flood: `conc` tasks share `total` attempts (or run for `duration`),
/// source `first + i % sources` for attempt i. Sent to the attacker process
/// as JSON under PIN=1.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct FloodSpec {
    kind: FloodKind,
    to: SocketAddr,
    first: u64,
    sources: u64,
    total: Option<u64>,
    duration: Option<Duration>,
    conc: u64,
}

async fn flood(spec: FloodSpec, hello: Arc<Vec<u8>>) -> (Arc<FloodCount>, Duration) {
    let FloodSpec {
        kind,
        to,
        first,
        sources,
        total,
        duration,
        conc,
    } = spec;
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let n = Arc::new(FloodCount::default());
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (n, next, hello) = (n.clone(), next.clone(), hello.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|t| i >= t) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let source = untrusted(first + i % sources);
                match kind {
                    FloodKind::Login => login_attempt(&hello, source, to, &n).await,
                    FloodKind::Connect => connect_and_wait(source, to, &n).await,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (n, started.elapsed())
}

/// A bare tokio accept-and-close loop: `attack bare-accept`.
fn bare_accept() -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", l.local_addr()?);
        // On a worker thread, like hsmgate's accept loops.
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            }
        })
        .await?;
        Ok(())
    })
}

fn spawn_bare() -> Res<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("bare-accept")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .ok_or("bare-accept did not start")?
        .parse()?;
    Ok((child, addr))
}

// --- the attacker's process (PIN=1) ------------------------------------------

/// Where the floods run: in this process beside the allowed client (the
/// default), or with PIN=1 in a process of their own (`attack flood`, one
/// per flood) pinned to CPUs that hsmgate and the allowed client do not get.
/// The slowloris connections of scenario c stay in this process either way.
struct Attacker {
    /// The ClientHello the login flood replays (see `client_hello`).
    hello: Arc<Vec<u8>>,
    pin: Option<Pinning>,
    /// The attacker process's `Cpus_allowed_list`, as it reported it.
    cpus_seen: std::sync::Mutex<String>,
}

/// What a flood sent and saw, and what it cost the attacker's process.
struct Flooded {
    n: Arc<FloodCount>,
    took: Duration,
    /// CPU seconds of the attacker process (PIN=1 only: otherwise the
    /// attacker is this process, which also runs the allowed client).
    attacker_cpu: Option<f64>,
}

/// `attack flood` reads one job as JSON on stdin ...
#[derive(Serialize, Deserialize)]
struct FloodJob {
    cpus: Vec<usize>,
    spec: FloodSpec,
    hello: Vec<u8>,
}

/// ... and answers one report as JSON on stdout.
#[derive(Serialize, Deserialize)]
struct FloodReport {
    count: FloodCount,
    took: Duration,
    cpu_seconds: f64,
    cpus_allowed: String,
}

impl Attacker {
    async fn flood(&self, spec: FloodSpec) -> Res<Flooded> {
        let Some(pin) = &self.pin else {
            let (n, took) = flood(spec, self.hello.clone()).await;
            return Ok(Flooded {
                n,
                took,
                attacker_cpu: None,
            });
        };
        let job = serde_json::to_vec(&FloodJob {
            cpus: pin.attacker.clone(),
            spec,
            hello: self.hello.to_vec(),
        })?;
        // Blocking on the child off the runtime: the allowed client runs on
        // a runtime of its own, this one only waits.
        let report = tokio::task::spawn_blocking(move || -> Res<FloodReport> {
            let mut child = Command::new(std::env::current_exe()?)
                .arg("flood")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            // Cannot fail: stdin is piped just above.
            let mut stdin = child.stdin.take().unwrap();
            std::io::Write::write_all(&mut stdin, &job)?;
            drop(stdin);
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(format!("attack flood exited with {}", out.status).into());
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        })
        .await??;
        *self.cpus_seen.lock().unwrap() = report.cpus_allowed;
        Ok(Flooded {
            n: Arc::new(report.count),
            took: report.took,
            attacker_cpu: Some(report.cpu_seconds),
        })
    }

    /// The line above the table that says who ran where.
    fn placement(&self, server: u32, bare: u32) -> String {
        let (srv, bare, me) = (
            cpus_allowed(&server.to_string()),
            cpus_allowed(&bare.to_string()),
            cpus_allowed("self"),
        );
        match &self.pin {
            Some(_) => format!(
                "pinned (PIN=1): hsmgate on CPUs {srv}, the bare accept loop on {bare}, the allowed client (this harness) on {me}; \
                 the attacker in a process of its own (`attack flood`) on {} (slowloris, c, stays in the harness)",
                self.cpus_seen.lock().unwrap()
            ),
            None => format!(
                "not pinned (PIN unset): the attacker and the allowed client share the harness process; \
                 hsmgate on CPUs {srv}, the bare accept loop on {bare}, the harness on {me}"
            ),
        }
    }
}

/// PIN=1: the CPUs each side gets.
struct Pinning {
    /// This process (the allowed client) and so, by inheritance, hsmgate and
    /// the bare accept loop.
    server: Vec<usize>,
    /// The attacker's processes.
    attacker: Vec<usize>,
}

impl Pinning {
    /// PIN=1 with ATTACKER_CPUS (default: the last CPU this process may
    /// use) and SERVER_CPUS (default: the others); None without PIN.
    fn from_env() -> Res<Option<Pinning>> {
        if std::env::var("PIN").map_or(true, |v| v.is_empty() || v == "0") {
            return Ok(None);
        }
        let set = sched_getaffinity(Pid::from_raw(0))?;
        let mine: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        let cpus = |name: &str, default: Vec<usize>| match std::env::var(name) {
            Ok(v) => parse_cpus(&v).map_err(|e| format!("{name}={v}: {e}")),
            Err(_) => Ok(default),
        };
        let attacker = cpus("ATTACKER_CPUS", mine.last().copied().into_iter().collect())?;
        let others = mine.iter().copied().filter(|c| !attacker.contains(c));
        let server = cpus("SERVER_CPUS", others.collect())?;
        if attacker.is_empty() || server.is_empty() {
            return Err(format!(
                "PIN=1 needs two CPUs or more (one for the attacker, the rest for hsmgate and the allowed client); \
                 this process may use {mine:?}"
            )
            .into());
        }
        if server.iter().any(|c| attacker.contains(c)) {
            return Err(
                format!("SERVER_CPUS {server:?} and ATTACKER_CPUS {attacker:?} overlap").into(),
            );
        }
        Ok(Some(Pinning { server, attacker }))
    }
}

/// A CPU list as `taskset -c` and `Cpus_allowed_list` write it: "0-2,5".
fn parse_cpus(s: &str) -> Res<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
        if a > b {
            return Err(format!("{part}: not a range").into());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// Pins the calling thread, and so the threads and processes it starts
/// afterwards; called before any other thread exists.
fn pin_self(cpus: &[usize]) -> Res<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("cannot pin to CPUs {cpus:?}: {e}"))?;
    Ok(())
}

/// The kernel's `Cpus_allowed_list` of process `pid` ("self" for this one).
fn cpus_allowed(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map_or_else(|| "?".into(), |v| v.trim().to_string())
}

/// `attack flood`: one flood from a process pinned to the CPUs the job
/// names, for PIN=1 (see `Attacker`).
fn flood_process() -> Res<()> {
    let job: FloodJob = serde_json::from_reader(std::io::stdin().lock())?;
    // Before the runtime starts its threads, so that they inherit it (and
    // tokio sizes the runtime to these CPUs).
    pin_self(&job.cpus)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (n, took) = rt.block_on(flood(job.spec, Arc::new(job.hello)));
    drop(rt);
    // The runtime is gone, so the flood's tasks and their counters' clones are too.
    let count = Arc::try_unwrap(n).map_err(|_| "flood counters still shared after the flood")?;
    let report = FloodReport {
        count,
        took,
        cpu_seconds: cpu_seconds("self"),
        cpus_allowed: cpus_allowed("self"),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

// --- slowloris ---------------------------------------------------------------

#[derive(Default)]
struct Slow {
    open: AtomicUsize,
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    /// Closed within a second of opening: refused by a cap.
    closed_at_once: AtomicU64,
}

/// Keeps one half-open connection from `source` until `stop`: stops inside
/// the ClientHello (`tls_done` false) or finishes TLS and trickles a header
/// line a second; reopens when the server closes it.
async fn half_open(
    tls: TlsConnector,
    source: IpAddr,
    to: SocketAddr,
    tls_done: bool,
    stop: Arc<AtomicBool>,
    s: Arc<Slow>,
    retry: Duration,
) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        // An attacker retries, but not in a tight loop (that is scenario b).
        if !first {
            tokio::time::sleep(retry).await;
        }
        first = false;
        let Ok(mut tcp) = tcp_from(source, to).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        s.opened.fetch_add(1, Ordering::Relaxed);
        if !tls_done {
            // A ClientHello record header announcing 512 bytes, then 5 of them.
            let _ = tcp
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
                .await;
            s.open.fetch_add(1, Ordering::Relaxed);
            let opened_at = Instant::now();
            let mut b = [0u8; 64];
            loop {
                tokio::select! {
                    r = tcp.read(&mut b) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            s.closed_by_server.fetch_add(1, Ordering::Relaxed);
                            if opened_at.elapsed() < Duration::from_secs(1) {
                                s.closed_at_once.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stop.load(Ordering::Relaxed) { break; }
                    }
                }
            }
            s.open.fetch_sub(1, Ordering::Relaxed);
        } else {
            let hs = tokio::time::timeout(
                Duration::from_secs(20),
                tls.connect(ServerName::IpAddress(to.ip().into()), tcp),
            )
            .await;
            let Ok(Ok(mut stream)) = hs else {
                s.closed_by_server.fetch_add(1, Ordering::Relaxed);
                s.closed_at_once.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            s.open.fetch_add(1, Ordering::Relaxed);
            let mut ok = stream
                .write_all(b"POST /v1/transit/encrypt/bench HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await
                .is_ok();
            let mut b = [0u8; 256];
            while ok && !stop.load(Ordering::Relaxed) {
                tokio::select! {
                    // EOF, an error, or an answer (a 408): the server ended it.
                    _ = stream.read(&mut b) => ok = false,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        ok = stream.write_all(b"X-Slow: a\r\n").await.is_ok();
                    }
                }
            }
            if !stop.load(Ordering::Relaxed) {
                s.closed_by_server.fetch_add(1, Ordering::Relaxed);
            }
            s.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

// --- report ------------------------------------------------------------------

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Table {
    rows: Vec<(String, Vec<f64>, bool)>,
}

impl Table {
    fn row(&mut self, label: &str, vals: Vec<f64>) {
        self.rows.push((label.to_string(), vals, true));
    }
    fn single(&mut self, label: &str, val: f64) {
        self.rows.push((label.to_string(), vec![val], false));
    }
    fn print(&self, rounds: u64) {
        print!("| | ");
        for r in 1..=rounds {
            print!("round {r} | ");
        }
        println!("median |");
        print!("|---|");
        for _ in 0..rounds {
            print!("---:|");
        }
        println!("---:|");
        for (label, vals, per_round) in &self.rows {
            let fmt = |x: f64| {
                if x.is_nan() {
                    "-".to_string()
                } else if x.abs() >= 100.0 || x.fract() == 0.0 {
                    format!("{x:.0}")
                } else if x.abs() >= 10.0 {
                    format!("{x:.1}")
                } else {
                    format!("{x:.3}")
                }
            };
            print!("| {label} | ");
            if *per_round {
                for v in vals {
                    print!("{} | ", fmt(*v));
                }
                println!("**{}** |", fmt(median(vals)));
            } else {
                for _ in 0..rounds {
                    print!(" | ");
                }
                println!("**{}** |", fmt(vals[0]));
            }
        }
    }
}

fn say(s: &str) {
    eprintln!("== {s}");
}

fn main() -> Res<()> {
    match std::env::args().nth(1).as_deref() {
        Some("bare-accept") => return bare_accept(),
        Some("flood") => return flood_process(),
        _ => {}
    }
    let bin = PathBuf::from(std::env::var("HSMGATE").map_err(|_| "set HSMGATE=<hsmgate binary>")?);
    let k = Knobs::from_env();
    let pin = Pinning::from_env()?;
    if let Some(p) = &pin {
        // No other thread exists yet: the runtimes below, hsmgate and the
        // bare accept loop all inherit these CPUs.
        pin_self(&p.server)?;
    }
    let server = start_server(&bin)?;
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(k, pin, server, pid))
}

async fn run(k: Knobs, pin: Option<Pinning>, server: Server, pid: u32) -> Res<()> {
    let cert = server.data_dir.join("tls/cert.pem");
    let tls = tls_connector(&cert);
    let api = server.api;
    let attacker = &Attacker {
        hello: Arc::new(client_hello(&cert, api)),
        pin,
        cpus_seen: Default::default(),
    };
    // Init, officer, crypto user, key.
    let init_token = std::fs::read_to_string(server.data_dir.join("init-token"))?;
    let admin_pw = format!("attack-admin-{}", std::process::id());
    call(
        &tls,
        api,
        "POST",
        "/v1/hsm/init",
        None,
        json!({"admin_password": admin_pw, "init_token": init_token.trim_end()}),
    )
    .await?;
    let officer = call(
        &tls,
        api,
        "POST",
        "/v1/hsm/login",
        None,
        json!({"username": "admin", "password": admin_pw}),
    )
    .await?["auth"]["client_token"]
        .as_str()
        .ok_or("no officer token")?
        .to_string();
    call(
        &tls,
        api,
        "POST",
        "/v1/hsm/users",
        Some(&officer),
        json!({"username": "bench", "password": "bench-password-1", "role": "crypto-user"}),
    )
    .await?;
    let app = call(
        &tls,
        api,
        "POST",
        "/v1/hsm/login",
        None,
        json!({"username": "bench", "password": "bench-password-1"}),
    )
    .await?["auth"]["client_token"]
        .as_str()
        .ok_or("no app token")?
        .to_string();
    call(
        &tls,
        api,
        "POST",
        "/v1/transit/keys/bench",
        Some(&app),
        json!({"type": "aes256-gcm96"}),
    )
    .await?;
    use base64::Engine as _;
    let plaintext = base64::engine::general_purpose::STANDARD.encode([0x5au8; 1024]);
    let setup = Arc::new(Setup {
        tls: tls.clone(),
        api,
        officer,
        app,
        encrypt_body: Arc::new(serde_json::to_vec(&json!({"plaintext": plaintext}))?),
    });
    let idle_mem = memory(pid);
    say(&format!(
        "server pid {pid} on {api}; idle VmRSS {} KiB",
        idle_mem.0
    ));
    // Warm-up.
    let w = load_for(&setup, k.conns, Duration::from_secs(2));
    say(&format!("warm-up: {:.0} encrypt/s", w.ops_per_s));

    let mut t = Table { rows: Vec::new() };

    // The bare accept-and-close loop: b's baseline, a's control.
    let (mut bare_child, bare) = spawn_bare()?;
    let bare_pid = bare_child.id();

    // (a) brute force from outside.
    if k.wants("a") {
        let before = scrape(server.metrics).await?;
        let status_before = admin_failures(&setup).await?;
        let per_round = k.attempts.div_ceil(k.rounds);
        let (mut with, mut without, mut ratio, mut rate) = (vec![], vec![], vec![], vec![]);
        let (mut p99w, mut p99o) = (vec![], vec![]);
        let (mut srv_cpu, mut att_cpu, mut srv_cpu_o) = (vec![], vec![], vec![]);
        let mut attacker_cpu = vec![];
        let (mut with_control, mut ratio_control) = (vec![], vec![]);
        let totals = FloodCount::default();
        let mut load_errors = 0u64;
        let mut done = 0;
        for r in 0..k.rounds {
            let n = per_round.min(k.attempts - done);
            done += n;
            let (conns, sources, conc) = (k.conns, k.sources, k.flood_conc);
            let login_flood = |to, total, duration| FloodSpec {
                kind: FloodKind::Login,
                to,
                first: 0,
                sources,
                total,
                duration,
                conc,
            };
            let run_flood = || {
                let setup = setup.clone();
                async move {
                    let stop = Arc::new(AtomicBool::new(false));
                    let l = load_thread(setup, conns, None, stop.clone());
                    let (srv0, me0) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
                    let f = attacker.flood(login_flood(api, Some(n), None)).await?;
                    let cpu = (
                        cpu_seconds(&pid.to_string()) - srv0,
                        cpu_seconds("self") - me0,
                        f.attacker_cpu,
                    );
                    stop.store(true, Ordering::Relaxed);
                    Res::Ok((f.n, f.took, l.join().unwrap(), cpu))
                }
            };
            let alone = |d| {
                let s0 = cpu_seconds(&pid.to_string());
                let t0 = Instant::now();
                let lo = load_for(&setup, k.conns, d);
                (
                    lo,
                    (cpu_seconds(&pid.to_string()) - s0) / t0.elapsed().as_secs_f64(),
                )
            };
            // The control: the same flood for as long, aimed at the bare
            // accept loop while the allowed load runs against hsmgate.
            let control = |d: Duration| {
                let setup = setup.clone();
                async move {
                    let stop = Arc::new(AtomicBool::new(false));
                    let l = load_thread(setup, conns, None, stop.clone());
                    attacker.flood(login_flood(bare, None, Some(d))).await?;
                    stop.store(true, Ordering::Relaxed);
                    Res::Ok(l.join().unwrap())
                }
            };
            let (c, took, lw, lo, lc, cpu, cpu_o);
            if r % 2 == 0 {
                (c, took, lw, cpu) = run_flood().await?;
                (lo, cpu_o) = alone(took.max(Duration::from_secs(2)));
                lc = control(took.max(Duration::from_secs(2))).await?;
            } else {
                lc = control(k.duration).await?;
                (lo, cpu_o) = alone(k.duration);
                (c, took, lw, cpu) = run_flood().await?;
            }
            with_control.push(lc.ops_per_s);
            ratio_control.push(lw.ops_per_s / lc.ops_per_s);
            srv_cpu_o.push(cpu_o);
            say(&format!(
                "a round {}: {n} attempts in {:.1} s; encrypt/s with {:.0} without {:.0}",
                r + 1,
                took.as_secs_f64(),
                lw.ops_per_s,
                lo.ops_per_s
            ));
            for (x, y) in [
                (&totals.closed, &c.closed),
                (&totals.handshakes, &c.handshakes),
                (&totals.answered, &c.answered),
                (&totals.connect_errors, &c.connect_errors),
                (&totals.hung, &c.hung),
            ] {
                x.fetch_add(y.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            load_errors += lw.errors + lo.errors;
            rate.push(n as f64 / took.as_secs_f64());
            srv_cpu.push(cpu.0 / took.as_secs_f64());
            att_cpu.push(cpu.1 / took.as_secs_f64());
            if let Some(a) = cpu.2 {
                attacker_cpu.push(a / took.as_secs_f64());
            }
            with.push(lw.ops_per_s);
            without.push(lo.ops_per_s);
            ratio.push(lw.ops_per_s / lo.ops_per_s);
            p99w.push(lw.p99_ms);
            p99o.push(lo.p99_ms);
        }
        let after = scrape(server.metrics).await?;
        let status_after = admin_failures(&setup).await?;
        let d = |name: &str, label: &str| sum(&after, name, label) - sum(&before, name, label);
        t.single(
            &format!(
                "**a. brute force from outside**: admin-login attempts sent (from {} untrusted sources)",
                k.sources
            ),
            done as f64,
        );
        t.row("a. attempts/s", rate);
        t.single(
            "a. closed by the server before any TLS byte (client count)",
            totals.closed.load(Ordering::Relaxed) as f64,
        );
        t.single(
            "a. TLS handshakes completed / login answers (client count)",
            (totals.handshakes.load(Ordering::Relaxed) + totals.answered.load(Ordering::Relaxed))
                as f64,
        );
        t.single(
            "a. client connect errors / hung 10 s",
            (totals.connect_errors.load(Ordering::Relaxed) + totals.hung.load(Ordering::Relaxed))
                as f64,
        );
        t.single(
            "a. `hsmgate_connections_total{listener=\"api\",result=\"denied\"}` increase",
            d("hsmgate_connections_total", "result=\"denied\""),
        );
        t.single(
            "a. `hsmgate_login_attempts_total` increase (all roles, outcomes): **engine login attempts consumed**",
            d("hsmgate_login_attempts_total", ""),
        );
        t.single(
            "a. admin `consecutive_failures` in `/v1/hsm/status` before → after",
            status_after - status_before,
        );
        t.single(
            "a. `hsmgate_zeroizations_total` increase",
            d("hsmgate_zeroizations_total", ""),
        );
        t.row(
            "a. server CPU during the flood (cores busy; includes serving the allowed load)",
            srv_cpu,
        );
        t.row("a. server CPU without the flood (cores busy)", srv_cpu_o);
        if attacker_cpu.is_empty() {
            t.row(
                "a. harness CPU during the flood (attacker + allowed client, cores busy)",
                att_cpu,
            );
        } else {
            t.row(
                "a. harness CPU during the flood (the allowed client alone, cores busy)",
                att_cpu,
            );
            t.row(
                "a. attacker process CPU during the flood (cores busy)",
                attacker_cpu,
            );
        }
        t.row("a. allowed encrypt/s during the flood", with);
        t.row("a. allowed encrypt/s without", without);
        t.row("a. ratio with / without (goal ≥ 0.8)", ratio);
        t.row(
            "a. control: allowed encrypt/s while the same flood hits the bare accept loop instead",
            with_control,
        );
        t.row(
            "a. ratio flood on hsmgate / same flood on the bare loop (hsmgate's own share)",
            ratio_control,
        );
        t.row("a. allowed p99 ms during the flood", p99w);
        t.row("a. allowed p99 ms without", p99o);
        t.single(
            "a. allowed requests that failed (non-200 or broken connection)",
            load_errors as f64,
        );
    }

    // (b) denied-connection flood vs a bare accept-and-close loop.
    if k.wants("b") {
        let (mut h_us, mut b_us) = (vec![], vec![]);
        let (mut hs, mut ba, mut ratio, mut p99w, mut p99o) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut hung = 0;
        let mut load_errors = 0u64;
        for r in 0..k.rounds {
            let first = 5_000_000 + r * 1_000_000;
            let (sources, conc, duration) = (k.sources, k.flood_conc, k.duration);
            let against = |to, target: u32| async move {
                let cpu0 = cpu_seconds(&target.to_string());
                let f = attacker
                    .flood(FloodSpec {
                        kind: FloodKind::Connect,
                        to,
                        first,
                        sources,
                        total: None,
                        duration: Some(duration),
                        conc,
                    })
                    .await?;
                let closed = f.n.closed.load(Ordering::Relaxed) as f64;
                let cpu = cpu_seconds(&target.to_string()) - cpu0;
                // Server CPU microseconds per closed connection.
                Res::Ok((
                    closed / f.took.as_secs_f64(),
                    f.n,
                    cpu * 1e6 / closed.max(1.0),
                ))
            };
            // Plain rate first (nothing else running), then the same flood
            // with the allowed load beside it, and the load alone.
            let (h, b, hc, hcpu, bcpu);
            if r % 2 == 0 {
                (h, hc, hcpu) = against(api, pid).await?;
                (b, _, bcpu) = against(bare, bare_pid).await?;
            } else {
                (b, _, bcpu) = against(bare, bare_pid).await?;
                (h, hc, hcpu) = against(api, pid).await?;
            }
            h_us.push(hcpu);
            b_us.push(bcpu);
            hung += hc.hung.load(Ordering::Relaxed) + hc.handshakes.load(Ordering::Relaxed);
            let stop = Arc::new(AtomicBool::new(false));
            let l = load_thread(setup.clone(), k.conns, None, stop.clone());
            against(api, pid).await?;
            stop.store(true, Ordering::Relaxed);
            let lw = l.join().unwrap();
            let lo = load_for(&setup, k.conns, k.duration);
            say(&format!(
                "b round {}: hsmgate {h:.0}/s bare {b:.0}/s; p99 with {:.2} ms without {:.2} ms",
                r + 1,
                lw.p99_ms,
                lo.p99_ms
            ));
            load_errors += lw.errors + lo.errors;
            hs.push(h);
            ba.push(b);
            ratio.push(h / b);
            p99w.push(lw.p99_ms);
            p99o.push(lo.p99_ms);
        }
        t.row(
            "**b. denied-connection flood**: hsmgate denied connections closed/s",
            hs,
        );
        t.row("b. bare tokio accept-and-close loop closed/s", ba);
        t.row("b. ratio hsmgate / bare (goal ≥ 0.8)", ratio);
        t.row("b. hsmgate CPU µs per denied connection", h_us);
        t.row("b. bare loop CPU µs per connection", b_us);
        t.single(
            "b. denied connections answered or left hanging",
            hung as f64,
        );
        t.row("b. allowed p99 ms during the flood", p99w);
        t.row("b. allowed p99 ms without", p99o);
        t.single(
            "b. allowed requests that failed (non-200 or broken connection)",
            load_errors as f64,
        );
    }

    // (c) slowloris from an allowed source.
    if k.wants("c") && k.half_open > 0 {
        let (mut p99w, mut p99o, mut held, mut opsw, mut opso) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut closed, mut at_once) = (0, 0);
        let slow_retry = Duration::from_millis(env_num("SLOW_RETRY_MS", 1000));
        let mut load_errors = 0u64;
        for r in 0..k.rounds {
            let run_with = || async {
                let stop = Arc::new(AtomicBool::new(false));
                let s = Arc::new(Slow::default());
                let mut tasks = Vec::new();
                for i in 0..k.half_open {
                    tasks.push(tokio::spawn(half_open(
                        tls.clone(),
                        ip("127.0.0.9"),
                        api,
                        i % 2 == 1,
                        stop.clone(),
                        s.clone(),
                        slow_retry,
                    )));
                }
                // Let them open (handshakes for half of them), then measure.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let h0 = s.open.load(Ordering::Relaxed);
                let lw = load_for(&setup, k.conns, k.duration);
                let h1 = s.open.load(Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
                for t in tasks {
                    let _ = t.await;
                }
                (lw, (h0 + h1) as f64 / 2.0, s)
            };
            let (lw, h, s, lo);
            if r % 2 == 0 {
                (lw, h, s) = run_with().await;
                lo = load_for(&setup, k.conns, k.duration);
            } else {
                lo = load_for(&setup, k.conns, k.duration);
                (lw, h, s) = run_with().await;
            }
            closed += s.closed_by_server.load(Ordering::Relaxed);
            at_once += s.closed_at_once.load(Ordering::Relaxed);
            say(&format!(
                "c round {}: held open {h:.0} (opened {}); p99 with {:.2} ms without {:.2} ms",
                r + 1,
                s.opened.load(Ordering::Relaxed),
                lw.p99_ms,
                lo.p99_ms
            ));
            load_errors += lw.errors + lo.errors;
            held.push(h);
            p99w.push(lw.p99_ms);
            p99o.push(lo.p99_ms);
            opsw.push(lw.ops_per_s);
            opso.push(lo.ops_per_s);
        }
        let ratio = p99w.iter().zip(&p99o).map(|(a, b)| a / b).collect();
        t.single(
"**c. slowloris**: half-open connections attempted from 127.0.0.9 (half in the ClientHello, half trickling headers)",
            k.half_open as f64,
        );
        t.row("c. held open by the server (mean of two samples)", held);
        t.single(
            "c. closed by the server (cap, handshake or header timeout), all rounds",
            closed as f64,
        );
        t.single(
            "c. of which within 1 s of opening (the per-source connection cap, 256)",
            at_once as f64,
        );
        t.row("c. others' p99 ms with", p99w);
        t.row("c. others' p99 ms without", p99o);
        t.row("c. p99 ratio with / without (goal ≤ 2)", ratio);
        t.row("c. others' encrypt/s with", opsw);
        t.row("c. others' encrypt/s without", opso);
        t.single(
            "c. others' requests that failed (non-200 or broken connection)",
            load_errors as f64,
        );
    }

    // (d) memory.
    if k.wants("d") {
        let before_ka = memory(pid);
        let fds_before = open_fds(pid);
        let conns = keepalive_conns(&tls, api, k.keepalive).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_ka = memory(pid);
        let held = conns.len();
        say(&format!(
            "d: {held} keep-alive connections open: VmRSS {} KiB; measuring the load beside them",
            with_ka.0
        ));
        // The idle flood: others' p99 with the idle connections open, then
        // without (one round each, not interleaved: reopening 10,000
        // connections per round would take longer than the measurement).
        let idle_with = load_for(&setup, k.conns, k.duration);
        drop(conns);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_without = load_for(&setup, k.conns, k.duration);
        let after_first = memory(pid);
        let fds_first = open_fds(pid);
        // Opened and closed again: is the freed memory reused or grown?
        let mut cycles = Vec::new();
        for _ in 1..env_num("KA_CYCLES", 3) {
            let again = keepalive_conns(&tls, api, k.keepalive).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let open = memory(pid);
            let n = again.len();
            drop(again);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let closed = memory(pid);
            let fds = open_fds(pid);
            say(&format!(
                "d: {n} opened again: VmRSS {} KiB, closed {} KiB ({fds} fds open)",
                open.0, closed.0
            ));
            cycles.push((n, open.0, closed.0, fds));
        }
        let Flooded { n: c, took, .. } = attacker
            .flood(FloodSpec {
                kind: FloodKind::Connect,
                to: api,
                first: 2_000_000,
                sources: k.mem_flood.max(1),
                total: Some(k.mem_flood),
                duration: None,
                conc: k.flood_conc,
            })
            .await?;
        let after_flood = memory(pid);
        say(&format!(
            "d: {} distinct sources in {:.1} s: VmRSS {} KiB; waiting for the sweep and the denial summary",
            k.mem_flood,
            took.as_secs_f64(),
            after_flood.0
        ));
        // The limiter sweep runs every 5 s here, denial summaries every 10 s.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let settled = memory(pid);
        let mib = |kib: u64| kib as f64 / 1024.0;
        t.single(
            "**d. memory** (VmRSS MiB): idle, after init",
            mib(idle_mem.0),
        );
        t.single(
            &format!("d. before the keep-alive connections (server fds open: {fds_before})"),
            mib(before_ka.0),
        );
        t.single(
            &format!(
                "d. with {held} kept-alive TLS connections open (from {} allowed sources)",
                held.div_ceil(200)
            ),
            mib(with_ka.0),
        );
        t.single(
            &format!(
                "d. after closing them and 10 s of the allowed load (server fds open: {fds_first})"
            ),
            mib(after_first.0),
        );
        for (i, (n, open, closed, fds)) in cycles.iter().enumerate() {
            t.single(
                &format!(
                    "d. cycle {}: {n} kept-alive connections opened again",
                    i + 2
                ),
                mib(*open),
            );
            t.single(
                &format!(
                    "d. cycle {}: 3 s after closing them (server fds open: {fds})",
                    i + 2
                ),
                mib(*closed),
            );
        }
        t.single(
            &format!(
                "d. right after {} connections from {} distinct untrusted sources ({} closed by the server)",
                k.mem_flood,
                k.mem_flood,
                c.closed.load(Ordering::Relaxed)
            ),
            mib(after_flood.0),
        );
        t.single("d. 15 s later (sweep, summary)", mib(settled.0));
        t.single("d. peak (VmHWM) over the whole run", mib(settled.1));
        t.single(
            &format!("**idle flood**: others' p99 ms with {held} idle kept-alive connections open"),
            idle_with.p99_ms,
        );
        t.single(
            "idle flood: others' p99 ms after closing them",
            idle_without.p99_ms,
        );
        t.single(
            "idle flood: p99 ratio with / without (goal ≤ 2; one round)",
            idle_with.p99_ms / idle_without.p99_ms,
        );
        t.single(
            "idle flood: others' encrypt/s with / without",
            idle_with.ops_per_s / idle_without.ops_per_s,
        );
        t.single(
            "idle flood: others' requests that failed",
            (idle_with.errors + idle_without.errors) as f64,
        );
    }

    let placement = attacker.placement(pid, bare_pid);
    let _ = bare_child.kill();
    let _ = bare_child.wait();
    println!();
    println!("{placement}");
    println!();
    t.print(k.rounds);
    drop(server);
    Ok(())
}

/// `n` TLS connections, 200 per source from 127.0.0.10 up (the per-source
/// cap is 256), each kept alive after one `GET /v1/sys/health`.
async fn keepalive_conns(tls: &TlsConnector, api: SocketAddr, n: u64) -> Vec<Http> {
    let mut conns = Vec::new();
    let mut i = 0u64;
    while (conns.len() as u64) < n && i < n * 2 {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (i / 200) as u8));
        i += 1;
        if let Ok(mut c) = Http::connect(tls, source, api).await {
            if c.request("GET", "/v1/sys/health", None, b"").await.is_ok() {
                conns.push(c);
            }
        }
    }
    conns
}

/// The admin's consecutive failed logins, from `/v1/hsm/status`.
async fn admin_failures(setup: &Setup) -> Res<f64> {
    let s = call(
        &setup.tls,
        setup.api,
        "GET",
        "/v1/hsm/status",
        Some(&setup.officer),
        Value::Null,
    )
    .await?;
    s["data"]["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["username"] == "admin"))
        .and_then(|u| u["consecutive_failures"].as_f64())
        .ok_or_else(|| format!("no admin in status: {s}").into())
}
