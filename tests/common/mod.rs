//! Test harness: the real `hsmgate` binary as a child process on a loopback
//! port, with its own config tree and data dir in a temp dir, and clients
//! that trust its generated certificate and can bind any 127.0.0.0/8 source.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

pub const ADMIN_PASSWORD: &str = "correct horse battery staple";
pub const CU_PASSWORD: &str = "app-user-password-1";

/// The networks of a test server's groups.
pub struct Opts {
    pub apps: Vec<&'static str>,
    pub admins: Vec<&'static str>,
    pub zeroize_after_failures: u32,
    pub lock_user_after_failures: u32,
    /// The login guard's reserve (0 turns it off).
    pub login_guard_reserve: u32,
    pub max_body_bytes: usize,
    /// `policies/rate-limits.toml`; `None` writes [`LOOSE_RATE_LIMITS`], so
    /// tests of other decisions are not cut short by the (strict) defaults.
    pub rate_limits: Option<String>,
    /// Appended to the main config file (e.g. `[[jwt_issuer]]` tables).
    pub extra_config: String,
    /// Extra files (path relative to the config dir, contents, mode) written
    /// before the server starts, e.g. TLS files `extra_config` points at.
    pub files: Vec<(String, String, u32)>,
    /// Extra lines inside `[engine]` (e.g. `min_password_length = 16`).
    pub engine_extra: String,
    /// The networks of group `proxies` (for `trusted_proxy_groups`).
    pub proxies: Vec<&'static str>,
    /// Extra keys for the `api` listener (e.g. `xff_hops = 1`).
    pub api_listener_extra: String,
    /// Extra keys for the `break-glass` listener (e.g. `client_ca`).
    pub break_glass_extra: String,
    /// Appended to `policies/security-groups.toml` (e.g. a `[group.cluster]`).
    pub extra_groups: String,
    /// The API listener's address (default `127.0.0.1:0`).
    pub api_address: String,
    /// Whether the config has a break-glass listener (default yes; a
    /// gateway with `[upstream]` has none).
    pub break_glass: bool,
}

/// Limits no other test reaches; tests/ratelimit.rs sets its own.
pub const LOOSE_RATE_LIMITS: &str = r#"[rate_limits]
source.transit = { rate = 100000, per = "second", burst = 100000 }
source.login = { rate = 100000, per = "second", burst = 100000 }
source.admin = { rate = 100000, per = "second", burst = 100000 }
source.health = { rate = 100000, per = "second", burst = 100000 }
login_user = { rate = 100000, per = "second", burst = 100000 }
principal = { rate = 100000, per = "second", burst = 100000 }
key = { rate = 100000, per = "second", burst = 100000 }
"#;

impl Default for Opts {
    fn default() -> Self {
        Opts {
            apps: vec!["127.0.0.1/32", "::1/128"],
            admins: vec!["127.0.0.1/32", "::1/128"],
            zeroize_after_failures: 3,
            lock_user_after_failures: 5,
            login_guard_reserve: 1,
            max_body_bytes: 1024 * 1024,
            rate_limits: None,
            extra_config: String::new(),
            files: Vec::new(),
            engine_extra: String::new(),
            proxies: vec![],
            api_listener_extra: String::new(),
            break_glass_extra: String::new(),
            extra_groups: String::new(),
            api_address: "127.0.0.1:0".into(),
            break_glass: true,
        }
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    /// The front-door API listener.
    pub addr: SocketAddr,
    /// The break-glass listener (group `break-glass`: 127.0.0.1 only).
    pub break_glass_addr: SocketAddr,
    child: Option<Child>,
    /// How many "listening" lines a start waits for.
    listeners: usize,
}

fn rules(nets: &[&str]) -> String {
    nets.iter()
        .map(|n| format!("  {{ source = \"{n}\", description = \"test\" }},\n"))
        .collect()
}

/// The harness's `policies/security-groups.toml` for these networks.
pub fn groups_file(apps: &[&str], admins: &[&str]) -> String {
    format!(
        "[group.apps]\ndescription = \"apps\"\nrules = [\n{}]\n\n[group.admins]\ndescription = \"admins\"\nrules = [\n{}]\n\n[group.break-glass]\nrules = [\n{}]\n",
        rules(apps),
        rules(admins),
        rules(&["127.0.0.1/32"])
    )
}

impl TestServer {
    pub fn start(opts: Opts) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("security-groups.toml"),
            format!(
                "{}\n[group.proxies]\nrules = [\n{}]\n{}\n",
                groups_file(&opts.apps, &opts.admins),
                rules(&opts.proxies),
                opts.extra_groups
            ),
        )
        .unwrap();
        std::fs::write(
            policies.join("rate-limits.toml"),
            opts.rate_limits.as_deref().unwrap_or(LOOSE_RATE_LIMITS),
        )
        .unwrap();
        for (rel, text, mode) in &opts.files {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        let config_path = dir.path().join("hsmgate.toml");
        std::fs::write(
            &config_path,
            format!(
                r#"policies_dir = "policies"
[engine]
data_dir = "{data}"
zeroize_after_failures = {z}
lock_user_after_failures = {l}
login_guard_reserve = {g}
session_ttl_seconds = 3600
{engine_extra}
[limits]
max_body_bytes = {b}
[[listener]]
name = "api"
address = "{api_address}"
security_groups = ["apps", "admins"]
admin_groups = ["admins"]
{api_extra}
{break_glass}
{extra}
"#,
                data = data_dir.display(),
                z = opts.zeroize_after_failures,
                l = opts.lock_user_after_failures,
                g = opts.login_guard_reserve,
                engine_extra = opts.engine_extra,
                b = opts.max_body_bytes,
                extra = opts.extra_config,
                api_extra = opts.api_listener_extra,
                api_address = opts.api_address,
                break_glass = if opts.break_glass {
                    format!(
                        "[[listener]]\nname = \"break-glass\"\naddress = \"127.0.0.1:0\"\n\
                         security_groups = [\"break-glass\"]\nadmin_groups = [\"break-glass\"]\n\
                         channel = \"break-glass\"\n{}",
                        opts.break_glass_extra
                    )
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        let mut server = TestServer {
            dir,
            data_dir,
            config_path,
            addr: "127.0.0.1:0".parse().unwrap(),
            break_glass_addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
            listeners: if opts.break_glass { 2 } else { 1 },
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("HSMGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn hsmgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("hsmgate: listening ") {
                    if let Some((name, url)) = rest.split_once(" https://") {
                        let _ = tx.send((name.to_string(), url.to_string()));
                    }
                }
            }
        });
        for _ in 0..self.listeners {
            let (name, addr) = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("server did not start; log:\n{}", self.log()));
            match name.as_str() {
                "api" => self.addr = addr.parse().unwrap(),
                "break-glass" => self.break_glass_addr = addr.parse().unwrap(),
                other => panic!("unexpected listener {other}"),
            }
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server log once `ready` holds for it (or after 10 s, for the
    /// caller's assertion to report). The server writes its log through a
    /// background thread, so a line can land a moment after the answer or
    /// the "listening" line that followed it.
    pub fn log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        for _ in 0..200 {
            let log = self.log();
            if ready(&log) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log()
    }

    /// SIGTERM, wait, start again (on a new port).
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        self.spawn();
    }

    /// SIGKILL: no shutdown path runs at all.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    pub fn break_glass_url(&self, path: &str) -> String {
        format!("https://{}{}", self.break_glass_addr, path)
    }

    /// `n` wrong-password logins as `username`, all in flight at once,
    /// through `url` (front door or break-glass); their status codes.
    pub async fn concurrent_wrong_logins(&self, url: String, username: &str, n: usize) -> Vec<u16> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (c, url) = (self.client(), url.clone());
            let body = json!({"username": username, "password": "wrong password"});
            set.spawn(async move {
                c.post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
        }
        set.join_all().await
    }

    /// Logs in through the break-glass listener.
    pub async fn login_break_glass(&self, username: &str, password: &str) -> (u16, Value) {
        let resp = self
            .client()
            .post(self.break_glass_url("/v1/hsm/login"))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .expect("request");
        into_parts(resp).await
    }

    fn cert(&self) -> reqwest::Certificate {
        let pem = std::fs::read(self.data_dir.join("tls/cert.pem")).unwrap();
        reqwest::Certificate::from_pem(&pem).unwrap()
    }

    /// A client on the trusted loopback address.
    pub fn client(&self) -> reqwest::Client {
        self.client_from("127.0.0.1".parse().unwrap())
    }

    /// A client whose connections come from `source`.
    pub fn client_from(&self, source: IpAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(self.cert())
            .local_address(source)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// A client from `source` presenting a client certificate (`identity`:
    /// PEM certificate followed by its PEM private key).
    pub fn client_with_identity(&self, source: IpAddr, identity: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(self.cert())
            .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
            .local_address(source)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// A raw connection from `source` to `addr` that first writes `prefix`
    /// (e.g. a PROXY protocol header), then does the TLS handshake.
    pub async fn tls_connect(
        &self,
        addr: SocketAddr,
        source: IpAddr,
        prefix: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use std::sync::Arc;
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut tcp = socket.connect(addr).await?;
        tcp.write_all(prefix).await?;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(self.data_dir.join("tls/cert.pem")).unwrap();
        for cert in rustls_pemfile_certs(&pem) {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
    }

    /// `GET path` over a raw connection (see [`Self::tls_connect`]): the
    /// response status, or the error when the server closes the connection
    /// instead.
    pub async fn raw_get(
        &self,
        addr: SocketAddr,
        source: IpAddr,
        prefix: &[u8],
        path: &str,
    ) -> std::io::Result<u16> {
        let mut tls = self.tls_connect(addr, source, prefix).await?;
        tokio::time::timeout(Duration::from_secs(30), keepalive_get(&mut tls, path))
            .await
            .map_err(|_| std::io::Error::other("timed out"))?
    }

    pub fn init_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("init-token")).expect("init token file")
    }

    pub async fn init(&self) {
        let (status, body) = self
            .post(
                &self.client(),
                "/v1/hsm/init",
                None,
                json!({"admin_password": ADMIN_PASSWORD, "init_token": self.init_token()}),
            )
            .await;
        assert_eq!(status, 200, "init: {body}");
    }

    pub async fn login(&self, username: &str, password: &str) -> (u16, Value) {
        self.post(
            &self.client(),
            "/v1/hsm/login",
            None,
            json!({"username": username, "password": password}),
        )
        .await
    }

    pub async fn token(&self, username: &str, password: &str) -> String {
        let (status, body) = self.login(username, password).await;
        assert_eq!(status, 200, "login {username}: {body}");
        body["auth"]["client_token"].as_str().unwrap().to_string()
    }

    /// Initializes, adds crypto user `app`, and returns (officer token, app token).
    pub async fn init_with_app_user(&self) -> (String, String) {
        self.init().await;
        let co = self.token("admin", ADMIN_PASSWORD).await;
        let (status, body) = self
            .post(
                &self.client(),
                "/v1/hsm/users",
                Some(&co),
                json!({"username": "app", "password": CU_PASSWORD, "role": "crypto-user"}),
            )
            .await;
        assert_eq!(status, 200, "create user: {body}");
        let app = self.token("app", CU_PASSWORD).await;
        (co, app)
    }

    pub async fn status(&self) -> Value {
        let (status, body) = self.get(&self.client(), "/v1/hsm/status", None).await;
        assert_eq!(status, 200, "status: {body}");
        body["data"].clone()
    }

    pub async fn failures(&self, username: &str) -> u64 {
        let status = self.status().await;
        status["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == username)
            .map(|u| u["consecutive_failures"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no user {username} in {status}"))
    }

    pub async fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut req = client.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        into_parts(req.send().await.expect("request")).await
    }

    pub async fn get(
        &self,
        client: &reqwest::Client,
        path: &str,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = client.get(self.url(path));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        into_parts(req.send().await.expect("request")).await
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.data_dir.join(rel)
    }

    /// The config tree's directory (config file, `policies/`).
    pub fn config_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces `rel` (relative to the config dir) the way deploy tools do:
    /// write a temporary file beside it, then rename it over the old one.
    pub fn replace_file(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        let tmp = path.with_extension("tmp-new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Sends SIGHUP: reload the config tree.
    pub fn sighup(&self) {
        let child = self.child.as_ref().expect("server running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// Every audit record with action `action`, in order.
    pub fn audit_records(&self, action: &str) -> Vec<Value> {
        std::fs::read_to_string(self.data_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["action"] == action)
            .collect()
    }

    /// Waits (polling the audit log, up to 30 s) for a `config.reload`
    /// record after the first `after` ones, from `trigger` (`sighup`,
    /// `file-change`) if given, and returns it.
    pub async fn wait_reload(&self, after: usize, trigger: Option<&str>) -> Value {
        for _ in 0..300 {
            let found = self
                .audit_records("config.reload")
                .into_iter()
                .skip(after)
                .find(|r| trigger.is_none_or(|t| r["detail"]["trigger"] == t));
            if let Some(r) = found {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no config.reload record (trigger {trigger:?}) after #{after}; log:\n{}",
            self.log()
        );
    }

    /// Rewrites the policy files, sends SIGHUP, and returns the record of
    /// the reload that signal caused.
    pub async fn reload_with(&self, files: &[(&str, &str)]) -> Value {
        let before = self.audit_records("config.reload").len();
        for (rel, text) in files {
            self.replace_file(rel, text);
        }
        self.sighup();
        self.wait_reload(before, Some("sighup")).await
    }
}

pub async fn into_parts(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A DER SubjectPublicKeyInfo as the PEM `PUBLIC KEY` block Vault's
/// `public_key` import takes (64-column base64 lines, as OpenSSL writes).
pub fn public_key_pem(spki_der: &[u8]) -> String {
    let body = b64(spki_der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Lifecycle helpers (tests/lifecycle.rs, tests/audit.rs).
impl TestServer {
    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait for the exit: the graceful shutdown path.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        child.wait().expect("wait for the server")
    }

    /// The audit records written so far, parsed (every line must be JSON).
    pub fn all_audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

/// One HTTP/1.1 `GET` on an open (keep-alive) connection; reads the whole
/// response (by Content-Length) and returns its status.
pub async fn keepalive_get<S>(stream: &mut S, path: &str) -> std::io::Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: hsmgate\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return head
                    .strip_prefix("http/1.1 ")
                    .and_then(|rest| rest.get(..3))
                    .and_then(|code| code.parse::<u16>().ok())
                    .ok_or_else(|| std::io::Error::other(format!("no HTTP status: {head:?}")));
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// POSTs JSON to a cluster port as a member would: TLS 1.3 with client
/// certificate `cert`/`key` (PEM files), trusting `ca`, checking the server
/// as `node-<node>.cluster.hsmgate`, HTTP/2. `None` when the connection,
/// handshake or request fails (refused); else (status, body as JSON or
/// as a string).
pub async fn cluster_post(
    addr: &str,
    node: u64,
    (ca, cert, key): (&Path, &Path, &Path),
    path: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    use http_body_util::BodyExt;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from(format!("node-{node}.cluster.hsmgate")).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("https://node-{node}.cluster.hsmgate{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(body).unwrap(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Some((status, value))
}

/// Options for a cluster node: its cluster port on 127.0.<net>.<id>:8201
/// (one `net` per test), advertised as `advertise`, certificates from
/// `certs` (written by `hsmgate::cluster::certs::generate`), a `cluster`
/// security group of 127.0.0.0/8, fast Raft timers.
pub fn cluster_node_opts(net: u8, id: u64, certs: &Path, advertise: &str) -> Opts {
    let cert = |name: &str| certs.join(name).display().to_string();
    Opts {
        extra_groups: "[group.cluster]\nrules = [ { source = \"127.0.0.0/8\", description = \"test cluster\" } ]\n".into(),
        extra_config: format!(
            r#"
[cluster]
node_id = {id}
address = "127.0.{net}.{id}:8201"
advertise = "{advertise}"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
security_groups = ["cluster"]
heartbeat_ms = 100
election_timeout_ms = [1000, 2000]
"#,
            ca = cert("ca.pem"),
            cert = cert(&format!("node-{id}.pem")),
            key = cert(&format!("node-{id}-key.pem")),
        ),
        ..Opts::default()
    }
}

/// A cluster of one (node 1 on 127.0.<net>.1:8201) with certificates for
/// `ids` in a temp dir (kept alive by the returned handle).
pub fn cluster_of_one(net: u8, ids: &[u64]) -> (TestServer, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    hsmgate::cluster::certs::generate(certs.path(), ids, &[]).unwrap();
    let opts = cluster_node_opts(net, 1, certs.path(), &format!("127.0.{net}.1:8201"));
    (TestServer::start(opts), certs)
}

/// Polls `f` every 200 ms until it answers true; panics naming `what`
/// after 30 s.
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..150 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Every metric name starting with `prefix` that the shipped dashboard
/// (`dashboards/hsmgate.json`) and alerts (`dashboards/alerts.yml`) use.
pub fn shipped_metric_names(prefix: &str) -> std::collections::BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut names = std::collections::BTreeSet::new();
    for file in ["hsmgate.json", "alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(pos) = rest.find(prefix) {
            let tail = &rest[pos..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// A Transit backup (`GET /v1/transit/backup/:name`'s base64) of a key with
/// one version, edited so that version was created `secs` earlier: how the
/// tests age a key for `auto_rotate_period` without a test-only knob.
pub fn aged_transit_backup(backup: &str, secs: u64) -> String {
    use base64::Engine as _;
    let b64e = base64::engine::general_purpose::STANDARD;
    let raw = b64e.decode(backup).unwrap();
    let split = raw.iter().position(|b| *b == b'\n').unwrap() + 1;
    let mut record: Value = serde_json::from_slice(&raw[split..]).unwrap();
    let created = record["versions"][0]["created"].as_u64().unwrap();
    record["versions"][0]["created"] = json!(created - secs);
    let mut aged = raw[..split].to_vec();
    aged.extend_from_slice(&serde_json::to_vec(&record).unwrap());
    b64e.encode(&aged)
}
