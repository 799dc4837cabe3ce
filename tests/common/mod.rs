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
    /// Extra lines inside `[engine]` (e.g. `seal = "shamir"`).
    pub engine_extra: String,
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
            engine_extra: String::new(),
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
}

fn rules(nets: &[&str]) -> String {
    nets.iter()
        .map(|n| format!("  {{ source = \"{n}\", description = \"test\" }},\n"))
        .collect()
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
                "[group.apps]\ndescription = \"apps\"\nrules = [\n{}]\n\n[group.admins]\ndescription = \"admins\"\nrules = [\n{}]\n\n[group.break-glass]\nrules = [\n{}]\n",
                rules(&opts.apps),
                rules(&opts.admins),
                rules(&["127.0.0.1/32"])
            ),
        )
        .unwrap();
        std::fs::write(
            policies.join("rate-limits.toml"),
            opts.rate_limits.as_deref().unwrap_or(LOOSE_RATE_LIMITS),
        )
        .unwrap();
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
address = "127.0.0.1:0"
security_groups = ["apps", "admins"]
admin_groups = ["admins"]
[[listener]]
name = "break-glass"
address = "127.0.0.1:0"
security_groups = ["break-glass"]
admin_groups = ["break-glass"]
channel = "break-glass"
{extra}
"#,
                data = data_dir.display(),
                z = opts.zeroize_after_failures,
                l = opts.lock_user_after_failures,
                g = opts.login_guard_reserve,
                b = opts.max_body_bytes,
                extra = opts.extra_config,
                engine_extra = opts.engine_extra,
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
        for _ in 0..2 {
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

pub fn exists(p: &Path) -> bool {
    p.exists()
}
