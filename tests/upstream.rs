//! A gateway without an engine (`[upstream]`) in front of a cluster of three
//! real node processes: the API of node `id` on 127.0.<net>.<id>:8200 (fixed,
//! so a restarted node comes back at the same address), its cluster port on
//! :8201. The nodes trust 127.0.0.1 (where the gateway connects from) as a
//! proxy naming the client in `X-Forwarded-For`, and ask for an optional
//! client certificate from the cluster CA, which the gateway presents.
//! What must hold: keys created through the gateway, crypto spread over
//! the healthy nodes, writes to the leader; a killed or zeroized node
//! leaves the pool at once (no client sees its failure); a restarted one
//! catches up (a key created while it was down) and returns.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{b64, wait_for, Opts, TestServer, CU_PASSWORD};
use serde_json::{json, Value};

/// One test at a time: each runs four server processes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn node(net: u8, id: u64, certs: &Path, apps: Vec<&'static str>) -> TestServer {
    let mut opts = common::cluster_node_opts(net, id, certs, &format!("127.0.{net}.{id}:8201"));
    opts.apps = apps;
    opts.api_address = format!("127.0.{net}.{id}:8200");
    opts.proxies = vec!["127.0.0.1/32"];
    opts.api_listener_extra = format!(
        "trusted_proxy_groups = [\"proxies\"]\nxff_hops = 1\nclient_ca = \"{}\"\nclient_auth = \"optional\"\n",
        certs.join("ca.pem").display()
    );
    TestServer::start(opts)
}

/// Forms the cluster on nodes[0]; the officer's token.
async fn form(nodes: &[TestServer]) -> String {
    let (co, _) = nodes[0].init_with_app_user().await;
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let (status, body) = nodes[0]
            .post(
                &nodes[0].client(),
                "/v1/hsm/cluster/nodes",
                Some(&co),
                json!({
                    "node_id": i + 1,
                    "address": format!("{}:8201", n.addr.ip()),
                    "init_token": n.init_token(),
                }),
            )
            .await;
        assert_eq!(status, 200, "adding node {}: {body}", i + 1);
    }
    co
}

/// A gateway in front of `nodes` admitting `apps`, trusting `ca_pems` for
/// the nodes' API certificates and presenting the `edge` gateway
/// certificate (from `certs`).
fn gateway(
    nodes: &[(u64, &TestServer)],
    certs: &Path,
    ca_pems: &[&Path],
    apps: Vec<&'static str>,
) -> TestServer {
    let ca = certs.join(format!("nodes-ca-{}.pem", rand_suffix()));
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pems: Vec<u8> = ca_pems
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    std::fs::write(&ca, pems).unwrap();
    let list: Vec<String> = nodes
        .iter()
        .map(|(id, n)| format!("  {{ id = {id}, address = \"{}\" }},", n.addr))
        .collect();
    TestServer::start(Opts {
        break_glass: false,
        extra_config: format!(
            "[metrics]\naddress = \"127.0.0.1:{port}\"\nsecurity_groups = [\"apps\"]\n\
             [upstream]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
             health_interval_ms = 200\ntimeout_ms = 5000\nnodes = [\n{list}\n]\n",
            ca = ca.display(),
            cert = certs.join("gateway-edge.pem").display(),
            key = certs.join("gateway-edge-key.pem").display(),
            list = list.join("\n"),
            port = metrics_port,
        ),
        apps,
        ..Opts::default()
    })
}

/// The gateway's Prometheus scrape (its `[metrics]` listener).
async fn scrape(gw: &TestServer) -> String {
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let port = text
        .split("[metrics]\naddress = \"127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of `series` (exact, labels included) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `text` without terminal colour codes.
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn rand_suffix() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// POST through the gateway: status, body, and the node that answered.
async fn post(
    gw: &TestServer,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value, Option<u64>) {
    let mut req = gw.client().post(gw.url(path)).json(&body);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    let resp = req.send().await.unwrap();
    let node = resp
        .headers()
        .get("x-hsmgate-upstream")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, node)
}

/// Encrypts `n` times through the gateway: every answer must be 200; the
/// nodes that answered.
async fn encrypt_many(gw: &TestServer, token: &str, n: usize) -> (BTreeSet<u64>, Vec<String>) {
    encrypt_many_with(gw, token, "payroll", n).await
}

/// Like [`encrypt_many`] with key `key`.
async fn encrypt_many_with(
    gw: &TestServer,
    token: &str,
    key: &str,
    n: usize,
) -> (BTreeSet<u64>, Vec<String>) {
    let mut nodes = BTreeSet::new();
    let mut cts = Vec::new();
    for i in 0..n {
        let (status, body, node) = post(
            gw,
            &format!("/v1/transit/encrypt/{key}"),
            Some(token),
            json!({"plaintext": b64(format!("secret {i}").as_bytes())}),
        )
        .await;
        assert_eq!(status, 200, "encrypt {i} through the gateway: {body}");
        nodes.insert(node.expect("the gateway names the node that answered"));
        cts.push(body["data"]["ciphertext"].as_str().unwrap().to_string());
    }
    (nodes, cts)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_spreads_crypto_sends_writes_to_the_leader_and_loses_no_request_to_a_dead_node() {
    let _serial = SERIAL.lock().await;
    let net = 53;
    let certs = tempfile::tempdir().unwrap();
    hsmgate::cluster::certs::generate(certs.path(), &[1, 2, 3], &["edge".to_string()]).unwrap();
    let mut nodes: Vec<TestServer> = (1..=3)
        .map(|id| node(net, id, certs.path(), vec!["127.0.0.1/32"]))
        .collect();
    let co = form(&nodes).await;
    let node_certs: Vec<std::path::PathBuf> =
        nodes.iter().map(|n| n.path("tls/cert.pem")).collect();
    let refs: Vec<&Path> = node_certs.iter().map(|p| p.as_path()).collect();
    let gw = gateway(
        &[(1, &nodes[0]), (2, &nodes[1]), (3, &nodes[2])],
        certs.path(),
        &refs,
        vec!["127.0.0.1/32"],
    );

    // A login through the gateway: the token verifies on every member.
    let (status, body, _) = post(
        &gw,
        "/v1/hsm/login",
        None,
        json!({"username": "app", "password": CU_PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["auth"]["client_token"].as_str().unwrap().to_string();

    // A write goes to the leader (node 1 founded the cluster and leads).
    let (status, body) = nodes[0]
        .get(&nodes[0].client(), "/v1/hsm/cluster", Some(&co))
        .await;
    assert_eq!(status, 200, "{body}");
    let leader = body["data"]["leader"].as_u64().expect("a leader");
    wait_for("the gateway to see the leader", || async {
        let (_, _, node) = post(&gw, "/v1/transit/keys/probe", Some(&token), json!({})).await;
        node == Some(leader)
    })
    .await;
    let (status, body, node) = post(
        &gw,
        "/v1/transit/keys/payroll",
        Some(&token),
        json!({"type": "aes256-gcm96"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(node, Some(leader), "a write went to a follower");

    // Crypto spreads over every healthy node, right after the create.
    wait_for("crypto answered by all three nodes", || async {
        encrypt_many(&gw, &token, 6).await.0.len() == 3
    })
    .await;
    let (_, cts) = encrypt_many(&gw, &token, 9).await;
    for (i, ct) in cts.iter().enumerate() {
        let (status, body, _) = post(
            &gw,
            "/v1/transit/decrypt/payroll",
            Some(&token),
            json!({"ciphertext": ct}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"]["plaintext"],
            b64(format!("secret {i}").as_bytes())
        );
    }

    // The gateway's scrape: the pool, every node up, no engine gauges, and
    // every hsmgate_upstream_* name the shipped alerts and dashboard use.
    let text = scrape(&gw).await;
    for id in 1..=3 {
        let up = format!("hsmgate_upstream_node_up{{node=\"{id}\"}}");
        assert_eq!(sample(&text, &up), Some(1.0), "{text}");
    }
    let leader_series = format!("hsmgate_upstream_node_leader{{node=\"{leader}\"}}");
    assert_eq!(sample(&text, &leader_series), Some(1.0), "{text}");
    assert!(!text.contains("hsmgate_engine_state{"), "{text}");
    let shipped = common::shipped_metric_names("hsmgate_upstream_");
    assert!(!shipped.is_empty(), "the shipped alerts watch the pool");
    for name in shipped {
        assert!(text.contains(&name), "{name} is not exported: {text}");
    }

    // Node 3 dies: no client sees it, and it leaves the pool.
    nodes[2].kill9();
    let (answered, _) = encrypt_many(&gw, &token, 20).await;
    assert!(!answered.contains(&3), "a dead node answered: {answered:?}");
    let text = scrape(&gw).await;
    assert_eq!(
        sample(&text, "hsmgate_upstream_node_up{node=\"3\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "hsmgate_upstream_ejections_total{node=\"3\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // A key created through the gateway while node 3 is down...
    let (status, body, _) = post(
        &gw,
        "/v1/transit/keys/ledger",
        Some(&token),
        json!({"type": "aes256-gcm96"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // ...is served by node 3 once it restarts (same address), catches up
    // and returns to the pool.
    nodes[2].start_again();
    wait_for(
        "the restarted node back in the pool, serving the new key",
        || async {
            encrypt_many_with(&gw, &token, "ledger", 6)
                .await
                .0
                .contains(&3)
        },
    )
    .await;

    // Node 2 zeroizes (wrong officer passwords at its own break-glass
    // door): it leaves the pool; nobody notices.
    for _ in 0..3 {
        let (status, _) = nodes[1]
            .login_break_glass("admin", "wrong password guess")
            .await;
        assert_eq!(status, 401);
    }
    assert_eq!(nodes[1].status().await["state"], "zeroized");
    let (answered, _) = encrypt_many(&gw, &token, 20).await;
    assert!(
        !answered.contains(&2),
        "a zeroized node answered: {answered:?}"
    );
    assert!(answered.len() >= 2, "{answered:?}");
}

/// Guards the gateway's own fence and its trust in nodes: an untrusted
/// source is refused by the gateway and no node ever sees it; a client's
/// own `X-Forwarded-For` is replaced, never passed on; a node whose
/// certificate the gateway does not trust gets nothing (503, nothing sent).
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_source_or_a_forged_address_never_reaches_a_node_and_an_unknown_node_gets_nothing(
) {
    let _serial = SERIAL.lock().await;
    let net = 54;
    let certs = tempfile::tempdir().unwrap();
    hsmgate::cluster::certs::generate(certs.path(), &[1], &["edge".to_string()]).unwrap();
    // The node admits 127.0.54.7 as a client; the gateway admits .7 and .8.
    let n1 = node(net, 1, certs.path(), vec!["127.0.0.1/32", "127.0.54.7/32"]);
    let (_co, _app) = n1.init_with_app_user().await;
    let gw = gateway(
        &[(1, &n1)],
        certs.path(),
        &[&n1.path("tls/cert.pem")],
        vec!["127.0.0.1/32", "127.0.54.7/32", "127.0.54.8/32"],
    );
    let token = n1.token("app", CU_PASSWORD).await;
    wait_for("the node in the gateway's pool", || async {
        post(
            &gw,
            "/v1/transit/hash",
            Some(&token),
            json!({"input": b64(b"x")}),
        )
        .await
        .0 == 200
    })
    .await;
    let hash_from = |source: &str, forged: Option<&str>| {
        let mut req = gw
            .client_from(source.parse().unwrap())
            .post(gw.url("/v1/transit/hash"))
            .header("X-Vault-Token", &token)
            .json(&json!({"input": b64(b"x")}));
        if let Some(f) = forged {
            req = req.header("X-Forwarded-For", f);
        }
        req.send()
    };
    // Allow: a client with a forged X-Forwarded-For gets its answer, and the
    // node judged the client the gateway saw, not the forged address.
    let resp = hash_from("127.0.54.7", Some("127.0.54.99")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Deny (defence in depth): .8 passes the gateway's fence, but the node
    // judges the forwarded client itself and refuses it.
    let resp = hash_from("127.0.54.8", None).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // Deny: 127.0.0.2 is in none of the gateway's groups: refused there.
    assert!(
        hash_from("127.0.0.2", None).await.is_err(),
        "an untrusted source was answered"
    );
    let log = plain(&n1.log_when(|l| plain(l).contains("client=127.0.54.7")));
    assert!(log.contains("client=127.0.54.7"), "{log}");
    assert!(
        !log.contains("127.0.54.99"),
        "a forged address reached the node"
    );
    assert!(
        !log.contains("127.0.0.2 "),
        "an untrusted source reached the node"
    );

    // Deny: a gateway that does not trust the node's certificate (here it
    // trusts only the cluster CA, which did not issue the node's API
    // certificate) never sends it anything.
    let stranger = gateway(
        &[(1, &n1)],
        certs.path(),
        &[&certs.path().join("ca.pem")],
        vec!["127.0.0.1/32"],
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body, node) = post(
        &stranger,
        "/v1/transit/hash",
        Some(&token),
        json!({"input": b64(b"x")}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(node, None);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("nothing was sent"),
        "{body}"
    );
}
