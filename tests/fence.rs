//! The fence through the real server: port-range rules, prefix lists (inline
//! and from a file), deny lists, IPv6 and IPv4-mapped peers, route-class
//! groups, and a million-entry list. Each decision is seen allowed once and
//! denied once, from real sockets bound to different loopback sources.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A server with a config tree written by the test.
struct Fence {
    dir: tempfile::TempDir,
    child: Child,
    addrs: HashMap<String, SocketAddr>,
}

impl Fence {
    /// `top`: top-level keys of the main file; `listeners`: its
    /// `[[listener]]` tables; `policies`: files in the policies dir.
    fn start(top: &str, listeners: &str, policies: &[(&str, &str)]) -> Fence {
        let dir = tempfile::tempdir().expect("tempdir");
        let pol = dir.path().join("policies");
        std::fs::create_dir_all(&pol).unwrap();
        for (name, text) in policies {
            std::fs::write(pol.join(name), text).unwrap();
        }
        let data = dir.path().join("data");
        let config = dir.path().join("hsmgate.toml");
        std::fs::write(
            &config,
            format!(
                "policies_dir = \"policies\"\n{top}\n[engine]\ndata_dir = \"{}\"\n{listeners}",
                data.display()
            ),
        )
        .unwrap();
        Self::spawn(dir, config, listeners.matches("[[listener]]").count())
    }

    fn spawn(dir: tempfile::TempDir, config: PathBuf, expected: usize) -> Fence {
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["serve", "--config"])
            .arg(&config)
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
        let mut addrs = HashMap::new();
        for _ in 0..expected {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok((name, addr)) => {
                    addrs.insert(name, addr.parse().unwrap());
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "server did not start; log:\n{}",
                        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
                    );
                }
            }
        }
        Fence { dir, child, addrs }
    }

    fn client(&self, source: &str) -> reqwest::Client {
        let pem = std::fs::read(self.dir.path().join("data/tls/cert.pem")).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .local_address(source.parse::<IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// GET `path` on `listener` from `source`: the status, or `None` when the
    /// connection was refused before any HTTP.
    async fn get(&self, listener: &str, source: &str, path: &str) -> Option<u16> {
        let addr = self.addrs[listener];
        self.get_at(addr, source, path).await
    }

    async fn get_at(&self, addr: SocketAddr, source: &str, path: &str) -> Option<u16> {
        let url = format!("https://{addr}{path}");
        match self.client(source).get(url).send().await {
            Ok(resp) => Some(resp.status().as_u16()),
            Err(_) => None,
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port for a listener that a port-range rule must name.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const HEALTH: &str = "/v1/sys/health";
/// `sys/health` on an uninitialized engine: reached the router.
const UNINITIALIZED: Option<u16> = Some(501);

#[tokio::test]
async fn port_range_rules_select_listeners() {
    let (a, b) = (free_port(), free_port());
    let f = Fence::start(
        "",
        &format!(
            "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:{a}\"\nsecurity_groups = [\"apps\"]\n\
             [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:{b}\"\nsecurity_groups = [\"apps\"]\n"
        ),
        &[(
            "sg.toml",
            &format!(
                "[group.apps]\nrules = [\n  {{ source = \"127.0.0.2\", ports = \"{a}-{a}\", description = \"only on a\" }},\n  {{ source = \"127.0.0.1/32\" }},\n]\n"
            ),
        )],
    );
    assert_eq!(f.get("a", "127.0.0.2", HEALTH).await, UNINITIALIZED);
    assert_eq!(
        f.get("b", "127.0.0.2", HEALTH).await,
        None,
        "rule is for port {a} only"
    );
    assert_eq!(f.get("b", "127.0.0.1", HEALTH).await, UNINITIALIZED);
}

#[tokio::test]
async fn prefix_lists_inline_and_from_a_file() {
    let f = Fence::start(
        "",
        "[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"apps\"]\n",
        &[
            (
                "sg.toml",
                "[prefix_list.inline]\ncidrs = [\"127.0.0.2/32\"]\n\
                 [prefix_list.partners]\nfile = \"partners.txt\"\n\
                 [group.apps]\nrules = [{ prefix_list = \"inline\" }, { prefix_list = \"partners\" }]\n",
            ),
            (
                "partners.txt",
                "# partner networks\n\n192.0.2.0/24\n127.0.0.3   # the partner's gateway\n2001:db8::/32\n",
            ),
        ],
    );
    assert_eq!(f.get("api", "127.0.0.2", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("api", "127.0.0.3", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("api", "127.0.0.4", HEALTH).await, None);
    assert_eq!(f.get("api", "127.0.0.1", HEALTH).await, None);
}

#[tokio::test]
async fn deny_lists_beat_allow_rules_globally_and_per_listener() {
    let f = Fence::start(
        "deny_lists = [\"threats\"]",
        "[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"all\"]\ndeny_lists = [\"local\"]\n\
         [[listener]]\nname = \"other\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"all\"]\n",
        &[
            (
                "sg.toml",
                "[prefix_list.threats]\nfile = \"threats.txt\"\n\
                 [deny_list.threats]\nrules = [{ prefix_list = \"threats\", description = \"imported feed\" }]\n\
                 [deny_list.local]\nrules = [{ source = \"127.0.0.6\" }]\n\
                 [group.all]\nrules = [{ source = \"127.0.0.0/8\" }]\n",
            ),
            ("threats.txt", "127.0.0.5\n198.51.100.0/24\n"),
        ],
    );
    assert_eq!(f.get("api", "127.0.0.4", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("api", "127.0.0.5", HEALTH).await, None, "global deny");
    assert_eq!(
        f.get("other", "127.0.0.5", HEALTH).await,
        None,
        "global deny"
    );
    assert_eq!(
        f.get("api", "127.0.0.6", HEALTH).await,
        None,
        "listener deny"
    );
    assert_eq!(f.get("other", "127.0.0.6", HEALTH).await, UNINITIALIZED);
}

#[tokio::test]
async fn ipv6_listener_allows_and_denies() {
    let f = Fence::start(
        "",
        "[[listener]]\nname = \"v6\"\naddress = \"[::1]:0\"\nsecurity_groups = [\"v6\"]\n\
         [[listener]]\nname = \"v6-closed\"\naddress = \"[::1]:0\"\nsecurity_groups = [\"elsewhere\"]\n",
        &[(
            "sg.toml",
            "[group.v6]\nrules = [{ source = \"::1/128\" }]\n\
             [group.elsewhere]\nrules = [{ source = \"2001:db8::/32\" }, { source = \"0.0.0.0/0\" }]\n",
        )],
    );
    assert_eq!(f.get("v6", "::1", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("v6-closed", "::1", HEALTH).await, None);
}

#[tokio::test]
async fn ipv4_mapped_peers_match_ipv4_rules() {
    // A dual-stack socket sees 127.0.0.2 as ::ffff:127.0.0.2.
    let f = Fence::start(
        "",
        "[[listener]]\nname = \"dual\"\naddress = \"[::]:0\"\nsecurity_groups = [\"apps\"]\n",
        &[(
            "sg.toml",
            "[group.apps]\nrules = [{ source = \"127.0.0.2/32\" }, { source = \"::/0\", description = \"IPv6 only: no IPv4 peer\" }]\n",
        )],
    );
    let port = f.addrs["dual"].port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(f.get_at(v4, "127.0.0.2", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get_at(v4, "127.0.0.3", HEALTH).await, None);
}

#[tokio::test]
async fn route_class_groups_keep_apps_off_admin_routes() {
    let f = Fence::start(
        "",
        "[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\n\
         security_groups = [\"apps\", \"admins\", \"monitoring\"]\nadmin_groups = [\"admins\"]\n\
         transit_groups = [\"apps\"]\nlogin_groups = [\"apps\", \"admins\"]\nhealth_groups = [\"monitoring\", \"admins\"]\n",
        &[(
            "sg.toml",
            "[group.apps]\nrules = [{ source = \"127.0.0.2\" }]\n\
             [group.admins]\nrules = [{ source = \"127.0.0.1\" }]\n\
             [group.monitoring]\nrules = [{ source = \"127.0.0.3\" }]\n",
        )],
    );
    // Admin: the admin network reaches it, the app network does not.
    assert_eq!(f.get("api", "127.0.0.1", "/v1/hsm/status").await, Some(200));
    assert_eq!(f.get("api", "127.0.0.2", "/v1/hsm/status").await, Some(403));
    // Health: monitoring yes, apps no — while apps still reach transit.
    assert_eq!(f.get("api", "127.0.0.3", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("api", "127.0.0.2", HEALTH).await, Some(403));
    // Transit: an app with a valid crypto-user token works from the app
    // network; the same token from the monitoring network does not.
    let token = crypto_user_token(&f).await;
    let keys = format!("https://{}/v1/transit/keys?list=true", f.addrs["api"]);
    let from = |source: &'static str| {
        let req = f.client(source).get(&keys).header("X-Vault-Token", &token);
        async move { req.send().await.map(|r| r.status().as_u16()).ok() }
    };
    let app_status = from("127.0.0.2").await;
    assert!(matches!(app_status, Some(200 | 404)), "{app_status:?}");
    assert_eq!(from("127.0.0.3").await, Some(403));
    // Login: monitoring may not even try.
    let login = |source: &'static str| {
        let client = f.client(source);
        let url = format!("https://{}/v1/hsm/login", f.addrs["api"]);
        async move {
            client
                .post(url)
                .json(&serde_json::json!({"username": "admin", "password": "x"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    assert_eq!(login("127.0.0.3").await, Some(403));
    assert_ne!(login("127.0.0.2").await, Some(403));
}

/// Initializes the engine from the admin network (127.0.0.1), adds crypto
/// user `app`, and logs it in from the app network (127.0.0.2).
async fn crypto_user_token(f: &Fence) -> String {
    use serde_json::{json, Value};
    let base = format!("https://{}", f.addrs["api"]);
    let admin = f.client("127.0.0.1");
    let post = |client: &reqwest::Client, path: &str, token: Option<&str>, body: Value| {
        let mut req = client.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let init_token = std::fs::read_to_string(f.dir.path().join("data/init-token")).unwrap();
    let password = "correct horse battery staple";
    let (st, body) = post(
        &admin,
        "/v1/hsm/init",
        None,
        json!({"admin_password": password, "init_token": init_token}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(
        &admin,
        "/v1/hsm/login",
        None,
        json!({"username": "admin", "password": password}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let co = body["auth"]["client_token"].as_str().unwrap().to_string();
    let (st, body) = post(
        &admin,
        "/v1/hsm/users",
        Some(&co),
        json!({"username": "app", "password": "app-user-password-1", "role": "crypto-user"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(
        &f.client("127.0.0.2"),
        "/v1/hsm/login",
        None,
        json!({"username": "app", "password": "app-user-password-1"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    body["auth"]["client_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_million_cidr_list_loads_and_matches() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("million.txt");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&list).unwrap());
        writeln!(w, "# generated: one million networks").unwrap();
        for i in 0u32..1_000_000 {
            // Distinct /32s across 10.0.0.0/8 plus /24s in 100.64.0.0/10.
            if i % 2 == 0 {
                writeln!(w, "10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255).unwrap();
            } else {
                writeln!(w, "100.{}.{}.0/24", 64 + ((i >> 16) & 63), (i >> 8) & 255).unwrap();
            }
        }
        writeln!(w, "127.0.0.7/32").unwrap();
    }
    let f = Fence::start(
        "deny_lists = [\"feed\"]",
        "[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"all\"]\n",
        &[(
            "sg.toml",
            &format!(
                "[prefix_list.feed]\nfile = {:?}\n[deny_list.feed]\nrules = [{{ prefix_list = \"feed\" }}]\n\
                 [group.all]\nrules = [{{ source = \"127.0.0.0/8\" }}]\n",
                list.display().to_string()
            ),
        )],
    );
    assert_eq!(f.get("api", "127.0.0.6", HEALTH).await, UNINITIALIZED);
    assert_eq!(f.get("api", "127.0.0.7", HEALTH).await, None);
    // And the list itself, in-process: every kind of entry decides right.
    let mut errors = Vec::new();
    let bytes = std::fs::read(&list).unwrap();
    let nets = hsmgate::config::read_prefix_file(&list, &bytes, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(nets.len(), 1_000_001);
    let set = hsmgate::netfilter::CidrSet::from_nets(nets);
    for (ip, listed) in [
        ("10.0.0.0", true),
        ("10.0.0.1", false),
        ("10.7.161.30", true),
        ("100.80.0.9", false),
        ("100.64.1.9", true),
        ("127.0.0.7", true),
        ("192.0.2.1", false),
    ] {
        assert_eq!(set.contains(ip.parse().unwrap()), listed, "{ip}");
    }
}
