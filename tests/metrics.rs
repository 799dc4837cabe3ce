//! Metrics over real sockets: the metrics listener and its security group,
//! Vault's token-protected `sys/metrics`, bounded labels, and `promtool
//! check metrics` on a live scrape (and `promtool check rules` on the
//! shipped alert rules).
//!
//! promtool comes from Debian's `prometheus` package. These tests install
//! nothing: without promtool they skip loudly, unless HSMGATE_REQUIRE_ALL=1,
//! when they fail.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

const ADMIN_PASSWORD: &str = "correct horse battery staple";

struct Server {
    dir: tempfile::TempDir,
    api: SocketAddr,
    metrics: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server whose metrics listener admits 127.0.0.1 only, and whose API
/// listener admits 127.0.0.1 only (so 127.0.0.2 is a denied source).
fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/groups.toml"),
        r#"[group.apps]
rules = [{ source = "127.0.0.1/32" }]
[group.break-glass]
rules = [{ source = "127.0.0.1/32" }]
[group.monitoring]
rules = [{ source = "127.0.0.1/32" }]
"#,
    )
    .unwrap();
    let config = dir.path().join("hsmgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"policies_dir = "policies"
[engine]
data_dir = "{}"
[[listener]]
name = "api"
address = "127.0.0.1:0"
security_groups = ["apps"]
admin_groups = ["apps"]
[[listener]]
name = "break-glass"
address = "127.0.0.1:0"
security_groups = ["break-glass"]
admin_groups = ["break-glass"]
channel = "break-glass"
[metrics]
address = "127.0.0.1:0"
"#,
            data.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("hsmgate: listening ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let (mut api, mut metrics) = (None, None);
    for _ in 0..3 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not start");
        if let Some(a) = line.strip_prefix("api https://") {
            api = Some(a.parse().unwrap());
        } else if let Some(a) = line.strip_prefix("metrics http://") {
            metrics = Some(a.parse().unwrap());
        }
    }
    Server {
        api: api.expect("api listener"),
        metrics: metrics.expect("metrics listener"),
        dir,
        child,
    }
}

impl Server {
    fn client(&self, source: &str) -> reqwest::Client {
        let pem = std::fs::read(self.dir.path().join("data/tls/cert.pem")).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .local_address(source.parse::<std::net::IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .client("127.0.0.1")
            .request(method, format!("https://{}{path}", self.api))
            .json(&body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Initializes; returns the officer token and an app token.
    async fn init(&self) -> (String, String) {
        let token = std::fs::read_to_string(self.dir.path().join("data/init-token")).unwrap();
        let (s, b) = self
            .call(
                "POST",
                "/v1/hsm/init",
                None,
                json!({"admin_password": ADMIN_PASSWORD, "init_token": token}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let login = |u: &'static str, p: &'static str| async move {
            let (s, b) = self
                .call(
                    "POST",
                    "/v1/hsm/login",
                    None,
                    json!({"username": u, "password": p}),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            b["auth"]["client_token"].as_str().unwrap().to_string()
        };
        let co = login("admin", ADMIN_PASSWORD).await;
        let (s, b) = self
            .call(
                "POST",
                "/v1/hsm/users",
                Some(&co),
                json!({"username": "app", "password": "app-user-password-1"}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let app = login("app", "app-user-password-1").await;
        (co, app)
    }

    /// Plain HTTP/1.1 GET on the metrics listener from `source`; `None`
    /// when the connection is closed without an answer.
    async fn scrape_from(&self, source: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(source.parse().ok()?, 0)).ok()?;
        let mut s = socket.connect(self.metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        let out = String::from_utf8(out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        Some(body.to_string())
    }

    async fn scrape(&self) -> String {
        self.scrape_from("127.0.0.1").await.expect("scrape")
    }

    /// SIGHUP: reload the config tree.
    fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// Polls the scrape (up to 30 s) until the sample is at least `min`.
    async fn wait_for_sample(&self, prefix: &str, min: f64) {
        for _ in 0..300 {
            let text = self.scrape().await;
            let value = text
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok());
            if value.is_some_and(|v| v >= min) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{prefix} never reached {min}");
    }
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in scrape:\n{text}"))
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("HSMGATE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("promtool is required (HSMGATE_REQUIRE_ALL=1): apt-get install prometheus");
        }
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus); set HSMGATE_REQUIRE_ALL=1 to fail instead");
    }
    found
}

/// Drives traffic of every kind the dashboards show.
async fn traffic(server: &Server) -> (String, String) {
    let (co, app) = server.init().await;
    let (s, _) = server
        .call(
            "POST",
            "/v1/transit/keys/very-secret-key-name",
            Some(&app),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    for _ in 0..3 {
        let (s, _) = server
            .call(
                "POST",
                "/v1/transit/encrypt/very-secret-key-name",
                Some(&app),
                json!({"plaintext": "aGVsbG8="}),
            )
            .await;
        assert_eq!(s, 200);
    }
    // A failed officer login, then a denied source on the API listener.
    let (s, _) = server
        .call(
            "POST",
            "/v1/hsm/login",
            None,
            json!({"username": "admin", "password": "not-the-password"}),
        )
        .await;
    assert_eq!(s, 401);
    // Guessing one user's password from one source: the shipped
    // per-(source, username) budget (a burst of 5) answers the sixth with 429.
    for expected in [401, 401, 401, 401, 401, 429] {
        let (s, _) = server
            .call(
                "POST",
                "/v1/hsm/login",
                None,
                json!({"username": "guessed", "password": "not-the-password"}),
            )
            .await;
        assert_eq!(s, expected);
    }
    let denied = server
        .client("127.0.0.2")
        .get(format!("https://{}/v1/sys/health", server.api))
        .send()
        .await;
    assert!(denied.is_err(), "127.0.0.2 must be refused at accept");
    // Config reloads: one rejected (a broken policy file), then one applied.
    let groups = server.dir.path().join("policies/groups.toml");
    let good = std::fs::read_to_string(&groups).unwrap();
    std::fs::write(
        &groups,
        "[group.apps]\nrules = [{ source = \"not a network\" }]\n",
    )
    .unwrap();
    server.sighup();
    server
        .wait_for_sample("hsmgate_config_reloads_total{outcome=\"failure\"}", 1.0)
        .await;
    std::fs::write(&groups, good).unwrap();
    server.sighup();
    server
        .wait_for_sample("hsmgate_config_reloads_total{outcome=\"success\"}", 1.0)
        .await;
    server
        .wait_for_sample("hsmgate_config_last_reload_successful ", 1.0)
        .await;
    (co, app)
}

#[tokio::test]
async fn metrics_listener_counts_traffic_with_bounded_labels() {
    let server = start();
    traffic(&server).await;
    let text = server.scrape().await;
    assert_eq!(sample(&text, "hsmgate_build_info{"), 1.0);
    assert_eq!(
        sample(&text, "hsmgate_connections_total{listener=\"api\",reason=\"security_group\",result=\"denied\"}"),
        1.0
    );
    assert!(
        sample(
            &text,
            "hsmgate_connections_total{listener=\"api\",reason=\"allowed\",result=\"accepted\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &text,
            "hsmgate_login_attempts_total{outcome=\"failure\",role=\"crypto_officer\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "hsmgate_login_attempts_left{user=\"admin\"}"),
        2.0
    );
    assert_eq!(sample(&text, "hsmgate_engine_state{state=\"active\"}"), 1.0);
    assert_eq!(
        sample(
            &text,
            "hsmgate_rate_limited_total{class=\"login\",scope=\"login_user\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "hsmgate_rate_limited_total{class=\"transit\",scope=\"source\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&text, "hsmgate_keys{key_type=\"aes256-gcm96\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "hsmgate_engine_operations_total{key_type=\"aes256-gcm96\",op=\"encrypt\",outcome=\"success\"}"),
        3.0
    );
    assert!(
        sample(
            &text,
            "hsmgate_http_requests_total{class=\"transit\",method=\"POST\",status=\"200\"}"
        ) >= 4.0
    );
    assert!(sample(&text, "hsmgate_audit_head_sequence ") >= 8.0);
    assert!(sample(&text, "hsmgate_config_reloads_total{outcome=\"success\"}") >= 1.0);
    assert!(sample(&text, "hsmgate_config_reloads_total{outcome=\"failure\"}") >= 1.0);
    assert_eq!(sample(&text, "hsmgate_config_last_reload_successful "), 1.0);
    assert_eq!(sample(&text, "hsmgate_config_info{sha256=\""), 1.0);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("hsmgate_config_info{"))
            .count(),
        1,
        "one config_info series at a time"
    );
    assert!(
        sample(
            &text,
            "hsmgate_config_last_reload_success_timestamp_seconds "
        ) > 1.7e9
    );
    assert!(text.contains("hsmgate_http_request_duration_seconds_bucket{class=\"transit\""));
    // Bounded labels: no addresses, no key names, no token.
    assert!(!text.contains("127.0.0"), "an address leaked into a label");
    assert!(
        !text.contains("very-secret-key-name"),
        "a key name leaked into a label"
    );
    // Cluster metrics exist only with `[cluster]` (tests/cluster.rs).
    assert!(
        !text.contains("hsmgate_cluster_"),
        "cluster metrics without [cluster]"
    );

    // A source outside the monitoring group is dropped at accept, and counted.
    assert!(server.scrape_from("127.0.0.2").await.is_none());
    let text = server.scrape().await;
    assert_eq!(
        sample(&text, "hsmgate_connections_total{listener=\"metrics\",reason=\"security_group\",result=\"denied\"}"),
        1.0
    );

    if let Some(promtool) = promtool() {
        let path = server.dir.path().join("scrape.prom");
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn vault_sys_metrics_needs_a_token() {
    let server = start();
    let (co, _app) = server.init().await;
    let (s, _) = server
        .call(
            "GET",
            "/v1/sys/metrics?format=prometheus",
            None,
            json!(null),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = server
        .call(
            "GET",
            "/v1/sys/metrics?format=prometheus",
            Some("hsm.bogus"),
            json!(null),
        )
        .await;
    assert_eq!(s, 403);
    let (s, body) = server
        .call(
            "GET",
            "/v1/sys/metrics?format=prometheus",
            Some(&co),
            json!(null),
        )
        .await;
    assert_eq!(s, 200);
    let text = body.as_str().unwrap();
    assert!(
        text.contains("hsmgate_engine_state{state=\"active\"} 1"),
        "{text}"
    );
    let (s, _) = server
        .call("GET", "/v1/sys/metrics", Some(&co), json!(null))
        .await;
    assert_eq!(s, 400);
}

#[test]
fn shipped_alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts.yml");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rules' unit tests (dashboards/alerts_test.yml): the cluster
    // alerts fire when they should and not before, and the dashboard's
    // cluster joins return what they claim.
    let out = Command::new(promtool)
        .args(["test", "rules"])
        .arg(rules.with_file_name("alerts_test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric name (`hsmgate_...`, histogram suffixes folded) in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("hsmgate_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let name = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .unwrap_or(name);
        names.insert(name.to_string());
        i = end;
    }
    names
}

/// The PromQL of every dashboard panel and every alert rule.
fn shipped_queries() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("hsmgate.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            out.push((
                format!("panel {:?}", panel["title"].as_str().unwrap()),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let rules = std::fs::read_to_string(root.join("alerts.yml")).unwrap();
    let mut alert = String::new();
    for line in rules.lines() {
        let line = line.trim();
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = a.to_string();
        } else if let Some(e) = line.strip_prefix("expr: ") {
            out.push((format!("alert {alert}"), e.to_string()));
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus on loopback scrapes a real hsmgate that served real
/// traffic; every panel query and alert expression must evaluate, and every
/// metric it names must have been seen.
#[tokio::test]
async fn a_real_prometheus_evaluates_every_panel_and_alert() {
    let prometheus = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("prometheus"))
            .find(|p| p.is_file())
    });
    let Some(prometheus) = prometheus else {
        if std::env::var("HSMGATE_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("prometheus is required (HSMGATE_REQUIRE_ALL=1): apt-get install prometheus");
        }
        eprintln!("SKIPPED: prometheus not found (apt-get install prometheus)");
        return;
    };
    let server = start();
    traffic(&server).await;
    let dir = server.dir.path();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: hsmgate\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            server.metrics
        ),
    )
    .unwrap();
    let port = free_port();
    let prom_log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(prom_log)
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let query = |q: String| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let resp = http
                .get(format!("{api}/query?query={}", urlencode(&q)))
                .send()
                .await
                .ok()?;
            resp.json::<Value>().await.ok()
        }
    };
    // Wait (polling Prometheus, not sleeping blind) until two scrapes landed,
    // so rate() has two points.
    let mut ready = false;
    for _ in 0..120 {
        if let Some(v) = query("count_over_time(up{job=\"hsmgate\"}[1m])".into()).await {
            if v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|n| n.parse::<f64>().ok())
                .is_some_and(|n| n >= 3.0)
            {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ready,
        "Prometheus never scraped hsmgate; log:\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    let queries = shipped_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut with_data = Vec::new();
    for (what, expr) in &queries {
        let v = query(expr.clone()).await.expect("query answer");
        assert_eq!(v["status"], "success", "{what}: {expr} is invalid: {v}");
        // `hsmgate_cluster_*` is exported only with `[cluster]` and
        // `hsmgate_upstream_*` only with `[upstream]`: tests/cluster.rs and
        // tests/upstream.rs check those names against real scrapes.
        for name in metric_names(expr)
            .into_iter()
            .filter(|n| !n.starts_with("hsmgate_cluster_") && !n.starts_with("hsmgate_upstream_"))
        {
            let seen = query(format!("count({{__name__=~\"{name}(_bucket)?\"}})"))
                .await
                .expect("series answer");
            assert!(
                !seen["data"]["result"].as_array().unwrap().is_empty(),
                "{what}: series {name} never appeared in a scrape"
            );
        }
        if !v["data"]["result"].as_array().unwrap().is_empty() {
            with_data.push(what.clone());
        }
    }
    eprintln!("queries with data after test traffic: {with_data:#?}");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
