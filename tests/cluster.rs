//! A replicated cluster of real node processes (`[cluster]`), each with its
//! cluster port on its own loopback address (127.0.<net>.<id>:8201, one
//! `net` per test), its API on 127.0.0.1. What must hold: a key created
//! through one node works on every node; a killed node catches up; a node
//! zeroized by wrong officer logins loses the cluster nothing and rejoins;
//! a leader killed mid-stream loses no acknowledged key; a certificate
//! from another CA, or a gateway's, gets nothing from the cluster port.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{b64, into_parts, wait_for, Opts, TestServer, ADMIN_PASSWORD, CU_PASSWORD};
use serde_json::{json, Value};

/// One cluster test at a time: each starts three server processes with
/// sub-second Raft timers, and a 2-core CI machine running them all at once
/// would measure CPU starvation, not the cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    id: u64,
    server: TestServer,
    cluster_addr: String,
}

fn node_opts(net: u8, id: u64, certs: &Path) -> Opts {
    node_opts_advertising(net, id, certs, &format!("127.0.{net}.{id}:8201"))
}

fn node_opts_advertising(net: u8, id: u64, certs: &Path, advertise: &str) -> Opts {
    common::cluster_node_opts(net, id, certs, advertise)
}

fn certs(ids: &[u64]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    hsmgate::cluster::certs::generate(dir.path(), ids, &["edge".to_string()]).unwrap();
    dir
}

fn start(net: u8, id: u64, certs: &Path) -> Node {
    Node {
        id,
        server: TestServer::start(node_opts(net, id, certs)),
        cluster_addr: format!("127.0.{net}.{id}:8201"),
    }
}

async fn co_token(n: &Node) -> String {
    n.server.token("admin", ADMIN_PASSWORD).await
}

async fn cluster_status(n: &Node, co: &str) -> Value {
    let (status, body) = n
        .server
        .get(&n.server.client(), "/v1/hsm/cluster", Some(co))
        .await;
    assert_eq!(status, 200, "cluster status on node {}: {body}", n.id);
    body["data"].clone()
}

async fn add(leader: &Node, co: &str, joining: &Node) -> (u16, Value) {
    leader
        .server
        .post(
            &leader.server.client(),
            "/v1/hsm/cluster/nodes",
            Some(co),
            json!({
                "node_id": joining.id,
                "address": joining.cluster_addr,
                "init_token": joining.server.init_token(),
            }),
        )
        .await
}

/// Founds a cluster on nodes[0] (init + app user), adds the others.
async fn form(nodes: &[Node]) -> String {
    let (co, _) = nodes[0].server.init_with_app_user().await;
    for n in &nodes[1..] {
        let (status, body) = add(&nodes[0], &co, n).await;
        assert_eq!(status, 200, "adding node {}: {body}", n.id);
    }
    let status = cluster_status(&nodes[0], &co).await;
    assert_eq!(
        status["voters"].as_array().unwrap().len(),
        nodes.len(),
        "{status}"
    );
    co
}

/// The cluster key id node `n` reports, with a fresh officer login (a
/// rotation ends every session, so an older token may be gone).
async fn key_id_on(n: &Node) -> Value {
    let co = co_token(n).await;
    let (_, body) = n
        .server
        .get(&n.server.client(), "/v1/hsm/cluster", Some(&co))
        .await;
    body["data"]["cluster_key_id"].clone()
}

async fn app_token(n: &Node) -> String {
    // Users are replicated: the app user logs in on any member.
    n.server.token("app", CU_PASSWORD).await
}

async fn create_key(n: &Node, token: &str, name: &str) -> (u16, Value) {
    n.server
        .post(
            &n.server.client(),
            &format!("/v1/transit/keys/{name}"),
            Some(token),
            json!({"type": "aes256-gcm96"}),
        )
        .await
}

async fn encrypt(n: &Node, token: &str, key: &str, plaintext: &[u8]) -> (u16, Value) {
    n.server
        .post(
            &n.server.client(),
            &format!("/v1/transit/encrypt/{key}"),
            Some(token),
            json!({"plaintext": b64(plaintext)}),
        )
        .await
}

async fn decrypt(n: &Node, token: &str, key: &str, ciphertext: &str) -> (u16, Value) {
    n.server
        .post(
            &n.server.client(),
            &format!("/v1/transit/decrypt/{key}"),
            Some(token),
            json!({"ciphertext": ciphertext}),
        )
        .await
}

async fn roundtrip(via_enc: &Node, via_dec: &Node, key: &str) {
    let (t1, t2) = (app_token(via_enc).await, app_token(via_dec).await);
    let (status, body) = encrypt(via_enc, &t1, key, b"cluster secret").await;
    assert_eq!(status, 200, "encrypt {key} on node {}: {body}", via_enc.id);
    let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    let (status, body) = decrypt(via_dec, &t2, key, &ct).await;
    assert_eq!(status, 200, "decrypt {key} on node {}: {body}", via_dec.id);
    assert_eq!(body["data"]["plaintext"], b64(b"cluster secret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_created_on_one_node_works_on_every_node_and_a_killed_node_catches_up() {
    let _serial = SERIAL.lock().await;
    let certs = certs(&[1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3).map(|id| start(41, id, certs.path())).collect();
    let co = form(&nodes).await;

    // Created through a follower (forwarded to the leader), used at once
    // through the other follower: read-your-writes, never a 404.
    let t2 = app_token(&nodes[1]).await;
    let (status, body) = create_key(&nodes[1], &t2, "orders").await;
    assert_eq!(status, 200, "{body}");
    roundtrip(&nodes[2], &nodes[0], "orders").await;

    // kill -9 one node: everything keeps working on the other two.
    nodes[2].server.kill9();
    let t1 = app_token(&nodes[0]).await;
    let (status, body) = create_key(&nodes[0], &t1, "while-down").await;
    assert_eq!(status, 200, "{body}");
    roundtrip(&nodes[1], &nodes[0], "orders").await;
    roundtrip(&nodes[0], &nodes[1], "while-down").await;

    // It comes back and catches up with what it missed.
    nodes[2].server.start_again();
    roundtrip(&nodes[2], &nodes[1], "while-down").await;
    let status = cluster_status(&nodes[2], &co_token(&nodes[2]).await).await;
    assert_eq!(status["voters"].as_array().unwrap().len(), 3, "{status}");
    let _ = co;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_zeroized_by_wrong_officer_logins_costs_the_cluster_nothing_and_rejoins() {
    let _serial = SERIAL.lock().await;
    let certs = certs(&[1, 2, 3]);
    let nodes: Vec<Node> = (1..=3).map(|id| start(42, id, certs.path())).collect();
    let co = form(&nodes).await;
    let t1 = app_token(&nodes[0]).await;
    let (status, body) = create_key(&nodes[0], &t1, "payroll").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = encrypt(&nodes[0], &t1, "payroll", b"old secret").await;
    assert_eq!(status, 200, "{body}");
    let old_ct = body["data"]["ciphertext"].as_str().unwrap().to_string();

    // Node 3's own break-glass door: three wrong officer passwords.
    let victim = &nodes[2];
    for _ in 0..3 {
        let resp = victim
            .server
            .client()
            .post(victim.server.break_glass_url("/v1/hsm/login"))
            .json(&json!({"username": "admin", "password": "wrong password guess"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }
    assert_eq!(victim.server.status().await["state"], "zeroized");
    // Its data dir holds no store and no Raft log any more.
    wait_for("the zeroized node's Raft log to be shredded", || async {
        !victim.server.path("raft.redb").exists()
    })
    .await;
    assert!(!victim.server.path("store.redb").exists());

    // The other two keep serving every key, old ciphertexts included, and
    // keep writing (2 of 3 is a majority).
    let t2 = app_token(&nodes[1]).await;
    let (status, body) = decrypt(&nodes[1], &t2, "payroll", &old_ct).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = create_key(&nodes[1], &t2, "after-zeroize").await;
    assert_eq!(status, 200, "{body}");
    // The officer's failures on node 3 counted nothing on node 1.
    assert_eq!(nodes[0].server.failures("admin").await, 0);

    // The officer re-admits it with its new init token; it is re-synced.
    // Taking the zeroized member out first rotates the cluster key: the
    // remaining members re-seal everything, and every session ends.
    let old_key_id = cluster_status(&nodes[0], &co).await["cluster_key_id"].clone();
    assert!(old_key_id.is_string(), "{old_key_id}");
    let (status, body) = add(&nodes[0], &co, victim).await;
    assert_eq!(status, 200, "rejoin: {body}");
    let co = co_token(&nodes[0]).await;
    let new_key_id = cluster_status(&nodes[0], &co).await["cluster_key_id"].clone();
    assert_ne!(new_key_id, old_key_id, "the cluster key was not rotated");
    for n in &nodes {
        wait_for("every member on the new cluster key", || {
            let want = new_key_id.clone();
            async move { key_id_on(n).await == want }
        })
        .await;
    }
    // Deny: a token issued before the rotation is over.
    let (status, body) = decrypt(&nodes[1], &t2, "payroll", &old_ct).await;
    assert_eq!(status, 403, "a session from before the rotation: {body}");
    let t3 = app_token(victim).await;
    let (status, body) = decrypt(victim, &t3, "payroll", &old_ct).await;
    assert_eq!(status, 200, "old ciphertext on the rejoined node: {body}");
    assert_eq!(body["data"]["plaintext"], b64(b"old secret"));
    roundtrip(victim, &nodes[0], "after-zeroize").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_mid_stream_loses_no_acknowledged_key() {
    let _serial = SERIAL.lock().await;
    let certs = certs(&[1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3).map(|id| start(43, id, certs.path())).collect();
    let co = form(&nodes).await;
    let leader = cluster_status(&nodes[0], &co).await["leader"]
        .as_u64()
        .unwrap();
    let leader_ix = nodes.iter().position(|n| n.id == leader).unwrap();
    let writer_ix = (leader_ix + 1) % 3;
    let token = app_token(&nodes[writer_ix]).await;

    // A stream of creations through a follower; the leader dies mid-way.
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        if i == 10 {
            nodes[leader_ix].server.kill9();
        }
        let name = format!("stream-{i}");
        let (status, _) = create_key(&nodes[writer_ix], &token, &name).await;
        if status == 200 {
            acknowledged.push(name);
        } else {
            // Only "unavailable, retry" while a new leader is elected.
            assert_eq!(status, 503, "creating {name}");
        }
    }
    eprintln!(
        "leader {leader} killed after 10 creations; {} of 40 acknowledged",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= 30,
        "too few writes went through: {acknowledged:?}"
    );
    nodes[leader_ix].server.start_again();

    // Every acknowledged key is on every node, exactly once.
    for n in &nodes {
        let t = app_token(n).await;
        let client = n.server.client();
        for name in &acknowledged {
            let (status, body) = encrypt(n, &t, name, b"x").await;
            assert_eq!(status, 200, "{name} on node {}: {body}", n.id);
        }
        let resp = client
            .request(
                reqwest::Method::from_bytes(b"LIST").unwrap(),
                n.server.url("/v1/transit/keys"),
            )
            .header("X-Vault-Token", &t)
            .send()
            .await
            .unwrap();
        let (status, body) = into_parts(resp).await;
        assert_eq!(status, 200, "{body}");
        let keys: Vec<&str> = body["data"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let mut unique = keys.clone();
        unique.dedup();
        assert_eq!(keys, unique, "duplicated keys on node {}", n.id);
        for name in &acknowledged {
            assert!(
                keys.contains(&name.as_str()),
                "{name} missing on node {}",
                n.id
            );
        }
    }
}

/// True when the cluster port answers a status request from this identity.
async fn cluster_port_answers(addr: &str, node: u64, ca: &Path, cert: &Path, key: &Path) -> bool {
    matches!(
        common::cluster_post(
            addr,
            node,
            (ca, cert, key),
            "/cluster/v1/status",
            &Value::Null
        )
        .await,
        Some((200, _))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_node_certificate_from_the_cluster_ca_gets_anything_from_the_cluster_port() {
    let _serial = SERIAL.lock().await;
    let good = certs(&[1, 2, 3]);
    let other = certs(&[2]);
    let node = start(44, 1, good.path());
    node.server.init().await;
    let addr = node.cluster_addr.clone();
    let p = |d: &tempfile::TempDir, f: &str| -> PathBuf { d.path().join(f) };

    // Who asks, trusting the cluster CA: `name`'s certificate from `dir`.
    let answers = |dir: &tempfile::TempDir, name: &str| {
        let (ca, cert, key) = (
            p(&good, "ca.pem"),
            p(dir, &format!("{name}.pem")),
            p(dir, &format!("{name}-key.pem")),
        );
        let addr = addr.clone();
        async move { cluster_port_answers(&addr, 1, &ca, &cert, &key).await }
    };
    // Allowed: node 2's certificate from the cluster CA.
    assert!(
        answers(&good, "node-2").await,
        "a member's certificate must be served"
    );
    // Denied: a gateway's certificate from the same CA (wrong role).
    assert!(
        !answers(&good, "gateway-edge").await,
        "a gateway certificate must get nothing from the cluster port"
    );
    // Denied: a node certificate from another CA.
    assert!(
        !answers(&other, "node-2").await,
        "a certificate from another CA must get nothing"
    );

    // A node whose certificate is from another CA cannot be added: the
    // officer's request fails and the node stays without keys.
    let stranger = start(44, 2, other.path());
    let co = co_token(&node).await;
    let (status, body) = add(&node, &co, &stranger).await;
    assert_ne!(status, 200, "{body}");
    assert_eq!(stranger.server.status().await["state"], "uninitialized");
    // A legitimate node with a wrong init token is refused too.
    let rightful = start(44, 3, good.path());
    let (status, body) = node
        .server
        .post(
            &node.server.client(),
            "/v1/hsm/cluster/nodes",
            Some(&co),
            json!({"node_id": 3, "address": rightful.cluster_addr, "init_token": "not-its-token"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(rightful.server.status().await["state"], "uninitialized");
    // With its own token it joins (the allow beside the denies above).
    let (status, body) = add(&node, &co, &rightful).await;
    assert_eq!(status, 200, "{body}");
    // Denied: adding it again now that it holds keys (it would be cut out
    // of its own cluster), and any membership change through a follower.
    let (status, body) = node
        .server
        .post(
            &node.server.client(),
            "/v1/hsm/cluster/nodes",
            Some(&co),
            json!({"node_id": 3, "address": rightful.cluster_addr, "init_token": "spent"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("is active"), "{body}");
    let follower_co = co_token(&rightful).await;
    let (status, body) = add(&rightful, &follower_co, &stranger).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("not the leader"), "{body}");
}

/// A TCP relay in front of one node's cluster port that the test can cut:
/// `isolate` refuses (and cuts) connections to the node and from the
/// node's own address (members dial from their cluster address).
#[derive(Clone)]
struct Relay {
    cut: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::net::IpAddr>>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    /// Listens on `listen`, forwarding to `target`; `blocked` is shared by
    /// every relay of the test (a set of cut member addresses).
    async fn start(
        listen: &str,
        target: std::net::SocketAddr,
        me: std::net::IpAddr,
        cut: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::net::IpAddr>>>,
        generation: tokio::sync::watch::Sender<u64>,
    ) -> Relay {
        let socket = tokio::net::TcpListener::bind(listen).await.unwrap();
        let relay = Relay { cut, generation };
        let r = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, peer)) = socket.accept().await else {
                    continue;
                };
                let blocked = {
                    let cut = r.cut.lock().unwrap();
                    cut.contains(&me) || cut.contains(&peer.ip())
                };
                if blocked {
                    continue; // dropped: the partition
                }
                let mut changed = r.generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = changed.changed() => {} // a cut: every relayed connection ends
                    }
                });
            }
        });
        relay
    }

    fn set_cut(&self, ips: &[std::net::IpAddr]) {
        *self.cut.lock().unwrap() = ips.iter().copied().collect();
        self.generation.send_modify(|g| *g += 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_minority_refuses_writes_and_reconverges_after_healing() {
    let _serial = SERIAL.lock().await;
    let net = 46;
    let certs = certs(&[1, 2, 3]);
    let cut = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (generation, _) = tokio::sync::watch::channel(0u64);
    let mut relays = Vec::new();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        // Members dial each other through the relays (127.0.46.10x).
        let relay_addr = format!("127.0.{net}.{}:8201", 100 + id);
        let me: std::net::IpAddr = format!("127.0.{net}.{id}").parse().unwrap();
        relays.push(
            Relay::start(
                &relay_addr,
                format!("127.0.{net}.{id}:8201").parse().unwrap(),
                me,
                cut.clone(),
                generation.clone(),
            )
            .await,
        );
        nodes.push(Node {
            id,
            server: TestServer::start(node_opts_advertising(net, id, certs.path(), &relay_addr)),
            cluster_addr: relay_addr,
        });
    }
    let co = form(&nodes).await;
    let leader = cluster_status(&nodes[0], &co).await["leader"]
        .as_u64()
        .unwrap();
    // Cut off a follower: the minority.
    let minority = nodes.iter().find(|n| n.id != leader).unwrap();
    let majority: Vec<&Node> = nodes.iter().filter(|n| n.id != minority.id).collect();
    let tm = app_token(minority).await;
    let (status, body) = create_key(majority[0], &app_token(majority[0]).await, "before").await;
    assert_eq!(status, 200, "{body}");
    roundtrip(minority, majority[1], "before").await;
    relays[0].set_cut(&[format!("127.0.{net}.{}", minority.id).parse().unwrap()]);

    // The majority keeps writing.
    let (status, body) = create_key(majority[1], &app_token(majority[1]).await, "during").await;
    assert_eq!(status, 200, "majority write during the partition: {body}");
    // The minority refuses writes (503, nothing changed) ...
    let (status, body) = create_key(minority, &tm, "minority-write").await;
    assert_eq!(status, 503, "minority write must be refused: {body}");
    // ... and keeps serving the keys it has.
    let (status, body) = encrypt(minority, &tm, "before", b"still served").await;
    assert_eq!(status, 200, "{body}");

    // Healing: the minority catches up; its refused write never appears.
    relays[0].set_cut(&[]);
    roundtrip(minority, majority[0], "during").await;
    for n in &nodes {
        let (status, _) = encrypt(n, &app_token(n).await, "minority-write", b"x").await;
        assert_eq!(
            status, 404,
            "a refused write must not exist anywhere (node {})",
            n.id
        );
    }
}

/// `GET /v1/sys/metrics?format=prometheus` on a node (any session token).
async fn scrape(n: &Node, token: &str) -> String {
    let resp = n
        .server
        .client()
        .get(n.server.url("/v1/sys/metrics?format=prometheus"))
        .header("X-Vault-Token", token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "metrics on node {}", n.id);
    resp.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// promtool from Debian's `prometheus` package; skipped loudly without it
/// unless HSMGATE_REQUIRE_ALL=1 (as in tests/metrics.rs).
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
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus)");
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_metrics_name_the_leader_and_count_who_holds_the_keys() {
    let _serial = SERIAL.lock().await;
    let certs = certs(&[1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3).map(|id| start(50, id, certs.path())).collect();
    let co = form(&nodes).await;
    let leader = cluster_status(&nodes[0], &co).await["leader"]
        .as_u64()
        .unwrap();
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    let (fi, other) = ((li + 1) % 3, (li + 2) % 3);
    let leader_token = co_token(&nodes[li]).await;

    // The leader: itself and both followers hold the keys.
    {
        let l = &nodes[li];
        let t = leader_token.clone();
        wait_for("the leader to count 3 members holding the keys", || {
            let t = t.clone();
            async move {
                sample(&scrape(l, &t).await, "hsmgate_cluster_members_holding_keys") == Some(3.0)
            }
        })
        .await;
    }
    let text = scrape(&nodes[li], &leader_token).await;
    assert_eq!(
        sample(&text, "hsmgate_cluster_is_leader"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "hsmgate_cluster_voters"), Some(3.0), "{text}");
    assert_eq!(
        sample(
            &text,
            &format!("hsmgate_cluster_node_info{{node_id=\"{leader}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "hsmgate_cluster_term").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "hsmgate_cluster_last_applied_index").unwrap() >= 1.0,
        "{text}"
    );
    for peer in [nodes[fi].id, nodes[other].id] {
        let lag = sample(
            &text,
            &format!("hsmgate_cluster_replication_lag_entries{{peer=\"{peer}\"}}"),
        );
        assert!(lag.is_some(), "no lag series for node {peer}: {text}");
    }
    // Every cluster metric the dashboard and alerts use is exported, and
    // the scrape passes promtool.
    let shipped = common::shipped_metric_names("hsmgate_cluster_");
    assert!(shipped.len() >= 5, "{shipped:?}");
    for name in &shipped {
        assert!(
            text.lines().any(|l| l.starts_with(name.as_str())),
            "{name} (used in dashboards/) is not exported by the leader: {text}"
        );
    }
    if let Some(promtool) = promtool() {
        let path = certs.path().join("scrape.prom");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(promtool)
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

    // A follower exports its own view, and nothing only the leader knows.
    // (Its gauges refresh every 2 s: a brief election on a loaded machine
    // may show for one period, so wait for the settled view.)
    let follower_token = co_token(&nodes[fi]).await;
    let mut follower_text = String::new();
    for _ in 0..50 {
        follower_text = scrape(&nodes[fi], &follower_token).await;
        if sample(&follower_text, "hsmgate_cluster_is_leader") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sample(&follower_text, "hsmgate_cluster_is_leader"),
        Some(0.0),
        "{follower_text}"
    );
    assert_eq!(
        sample(&follower_text, "hsmgate_cluster_voters"),
        Some(3.0),
        "{follower_text}"
    );
    assert!(
        !follower_text.contains("hsmgate_cluster_members_holding_keys"),
        "{follower_text}"
    );
    assert!(
        !follower_text.contains("hsmgate_cluster_replication_lag_entries{"),
        "{follower_text}"
    );

    // kill -9 a follower: the leader counts 2 (its matched index alone
    // would not show it: nothing is written meanwhile).
    nodes[fi].server.kill9();
    {
        let l = &nodes[li];
        let t = leader_token.clone();
        wait_for("the leader to count 2 members holding the keys", || {
            let t = t.clone();
            async move {
                sample(&scrape(l, &t).await, "hsmgate_cluster_members_holding_keys") == Some(2.0)
            }
        })
        .await;
    }
    let text = scrape(&nodes[li], &leader_token).await;
    assert_eq!(
        sample(&text, "hsmgate_cluster_is_leader"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "hsmgate_cluster_voters"), Some(3.0), "{text}");

    // Restarted, it is counted again.
    nodes[fi].server.start_again();
    let l = &nodes[li];
    let t = leader_token.clone();
    wait_for("the leader to count 3 members again", || {
        let t = t.clone();
        async move {
            sample(&scrape(l, &t).await, "hsmgate_cluster_members_holding_keys") == Some(3.0)
        }
    })
    .await;
}

/// `hsmgate backup-keygen` into `dir`; the `[backup]` lines it prints.
fn backup_keygen(dir: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["backup-keygen", "--out-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let start = text.find("[backup]").expect("config lines");
    text[start..].to_string()
}

fn start_with(net: u8, id: u64, certs: &Path, extra: &str) -> Node {
    let mut opts = node_opts(net, id, certs);
    opts.extra_config.push_str(extra);
    Node {
        id,
        server: TestServer::start(opts),
        cluster_addr: format!("127.0.{net}.{id}:8201"),
    }
}

fn backups_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".hsmbak"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_backup_seeds_a_new_cluster_whose_leader_alone_takes_scheduled_backups() {
    let _serial = SERIAL.lock().await;
    let net = 51;
    let certs = certs(&[1, 2, 3]);
    let keys = tempfile::tempdir().unwrap();
    let backup_lines = backup_keygen(keys.path());
    let custodian = b64(&std::fs::read(keys.path().join("custodian.key")).unwrap());

    // The old cluster (one member): a key, a ciphertext, a backup.
    let mut old = start_with(net, 1, certs.path(), &backup_lines);
    let (co, app) = old.server.init_with_app_user().await;
    let (status, body) = create_key(&old, &app, "ledger").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = encrypt(&old, &app, "ledger", b"before the disaster").await;
    assert_eq!(status, 200, "{body}");
    let old_ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    let (status, body) = old
        .server
        .post(&old.server.client(), "/v1/hsm/backup", Some(&co), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();
    old.server.kill9();

    // Two fresh nodes with scheduled backups every second, each to its own dir.
    let dirs = tempfile::tempdir().unwrap();
    let schedule = |id: u64| {
        let dir = dirs.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        format!(
            "{backup_lines}schedule_dir = \"{}\"\nschedule_interval_seconds = 1\nschedule_keep = 2\n",
            dir.display()
        )
    };
    let seed = start_with(net, 2, certs.path(), &schedule(2));
    let joiner = start_with(net, 3, certs.path(), &schedule(3));

    // The restore founds a cluster of one on node 2.
    let (status, body) = seed
        .server
        .post(
            &seed.server.client(),
            "/v1/hsm/restore",
            None,
            json!({"backup": backup, "custodian_key": custodian, "init_token": seed.server.init_token()}),
        )
        .await;
    assert_eq!(status, 200, "restore: {body}");
    let co = co_token(&seed).await;
    {
        let (s, c) = (&seed, co.clone());
        wait_for("the restored node to lead a cluster of one", || {
            let c = c.clone();
            async move {
                let st = cluster_status(s, &c).await;
                st["leader"] == json!(2) && st["voters"] == json!([2])
            }
        })
        .await;
    }
    let t = app_token(&seed).await;
    let (status, body) = decrypt(&seed, &t, "ledger", &old_ct).await;
    assert_eq!(status, 200, "old ciphertext on the restored node: {body}");

    // A second node added through the HSM API decrypts the old ciphertext.
    let (status, body) = add(&seed, &co, &joiner).await;
    assert_eq!(status, 200, "adding node 3: {body}");
    let t3 = app_token(&joiner).await;
    let (status, body) = decrypt(&joiner, &t3, "ledger", &old_ct).await;
    assert_eq!(status, 200, "old ciphertext on the added node: {body}");
    assert_eq!(body["data"]["plaintext"], b64(b"before the disaster"));
    let st = cluster_status(&seed, &co).await;
    assert_eq!(st["voters"], json!([2, 3]), "{st}");

    // Scheduled backups: the leader writes them; the follower, ticking
    // every second as well, writes none.
    let leader = st["leader"].as_u64().unwrap();
    let (lead_dir, follow_dir) = if leader == 2 {
        (dirs.path().join("node-2"), dirs.path().join("node-3"))
    } else {
        (dirs.path().join("node-3"), dirs.path().join("node-2"))
    };
    let before: std::collections::BTreeSet<String> = backups_in(&lead_dir).into_iter().collect();
    let mut fresh = std::collections::BTreeSet::new();
    for _ in 0..300 {
        fresh.extend(
            backups_in(&lead_dir)
                .into_iter()
                .filter(|n| !before.contains(n)),
        );
        if fresh.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fresh.len() >= 3, "the leader wrote only {fresh:?}");
    assert_eq!(
        backups_in(&follow_dir),
        Vec::<String>::new(),
        "a follower wrote a scheduled backup"
    );
    let status = cluster_status(&seed, &co).await;
    assert_eq!(status["leader"].as_u64(), Some(leader), "leadership moved");
}

/// A node that never ran Raft (initialized before `[cluster]` was added —
/// the same start-up path as a store written by `hsmgate restore` on a
/// stopped node) founds a cluster of one when it starts with `[cluster]`,
/// and a node added to it gets its keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_never_ran_raft_founds_a_cluster_when_started_with_one() {
    let _serial = SERIAL.lock().await;
    let net = 47;
    let certs = certs(&[1, 2]);
    let mut first = TestServer::start(Opts::default());
    let (_, app) = first.init_with_app_user().await;
    let client = first.client();
    let (status, body) = first
        .post(&client, "/v1/transit/keys/legacy", Some(&app), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = first
        .post(
            &client,
            "/v1/transit/encrypt/legacy",
            Some(&app),
            json!({"plaintext": b64(b"from before the cluster")}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();

    // Stopped, given a [cluster] table and its group, started again.
    first.kill9();
    let opts = node_opts(net, 1, certs.path());
    let config = std::fs::read_to_string(&first.config_path).unwrap();
    first.replace_file("hsmgate.toml", &format!("{config}\n{}", opts.extra_config));
    let groups_path = first.config_dir().join("policies/security-groups.toml");
    let groups = std::fs::read_to_string(&groups_path).unwrap();
    first.replace_file(
        "policies/security-groups.toml",
        &format!("{groups}\n{}", opts.extra_groups),
    );
    first.start_again();
    let n1 = Node {
        id: 1,
        server: first,
        cluster_addr: format!("127.0.{net}.1:8201"),
    };
    let co = co_token(&n1).await;
    wait_for("the restarted node to lead a cluster of one", || async {
        let s = cluster_status(&n1, &co).await;
        s["leader"] == 1 && s["voters"] == json!([1])
    })
    .await;
    let n2 = start(net, 2, certs.path());
    let (status, body) = add(&n1, &co, &n2).await;
    assert_eq!(status, 200, "{body}");
    let t2 = app_token(&n2).await;
    let (status, body) = decrypt(&n2, &t2, "legacy", &ct).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["plaintext"], b64(b"from before the cluster"));
}

/// HSM session tokens verify on every member (signed with a key derived
/// from the cluster key); a logout on one member ends the token on all of
/// them, and a password reset ends the user's older tokens everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_token_works_on_every_member_until_logout_or_password_reset() {
    let _serial = SERIAL.lock().await;
    let certs = certs(&[1, 2, 3]);
    let nodes: Vec<Node> = (1..=3).map(|id| start(48, id, certs.path())).collect();
    let co = form(&nodes).await;
    let t1 = app_token(&nodes[0]).await;
    let (status, body) = create_key(&nodes[0], &t1, "shared").await;
    assert_eq!(status, 200, "{body}");

    // Issued on node 1, used on nodes 2 and 3.
    let (status, body) = encrypt(&nodes[2], &t1, "shared", b"x").await;
    assert_eq!(status, 200, "app token from node 1 on node 3: {body}");
    let (status, body) = nodes[1]
        .server
        .get(&nodes[1].server.client(), "/v1/hsm/status", Some(&co))
        .await;
    assert_eq!(status, 200, "officer token from node 1 on node 2: {body}");

    // Logout on node 1: refused on node 2 once node 2 has applied it.
    let logout = nodes[0]
        .server
        .client()
        .post(nodes[0].server.url("/v1/hsm/logout"))
        .header("X-Vault-Token", &t1)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 204);
    wait_for("the logout to reach node 2", || async {
        encrypt(&nodes[1], &t1, "shared", b"x").await.0 == 403
    })
    .await;

    // A password reset on node 1 ends older tokens of that user on node 3.
    let t2 = app_token(&nodes[1]).await;
    assert_eq!(encrypt(&nodes[2], &t2, "shared", b"x").await.0, 200);
    let (status, body) = nodes[0]
        .server
        .post(
            &nodes[0].server.client(),
            "/v1/hsm/users/app/password",
            Some(&co),
            json!({"password": "a brand new app password"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for("the reset to end the old token on node 3", || async {
        encrypt(&nodes[2], &t2, "shared", b"x").await.0 == 403
    })
    .await;
    let fresh = nodes[2]
        .server
        .token("app", "a brand new app password")
        .await;
    assert_eq!(encrypt(&nodes[0], &fresh, "shared", b"x").await.0, 200);
}

/// `hsmgate check` loads `[cluster]`'s certificate as the cluster port
/// would: node 1's certificate passes as node 1 and is refused as node 2.
#[test]
fn check_refuses_a_certificate_for_another_node() {
    let certs = certs(&[1]);
    let run = |id: u64| {
        let opts = node_opts(52, id, certs.path());
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("groups.toml"),
            format!(
                "[group.loop]\nrules = [ {{ source = \"127.0.0.1\" }} ]\n{}",
                opts.extra_groups
            ),
        )
        .unwrap();
        let config = dir.path().join("hsmgate.toml");
        let extra = opts.extra_config.replace(&format!("node-{id}"), "node-1");
        std::fs::write(
            &config,
            format!(
                "policies_dir = \"policies\"\n[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"loop\"]\n{extra}"
            ),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let ok = run(1);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run(2);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("is not a certificate for node 2"),
        "{stderr}"
    );
}

/// Vault's `auto_rotate_period` in a cluster: every member ticks every
/// second, but only the leader rotates a due key (one rotation, one audit
/// record, on the leader), and the new version reaches every member like
/// any write. The due key is restored two hours old from a Transit backup
/// (a test cannot wait an hour); a fresh key with the same period stays.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_rotates_a_due_key_and_every_member_gets_the_new_version() {
    let _serial = SERIAL.lock().await;
    let net = 61;
    let certs = certs(&[1, 2, 3]);
    let nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut opts = node_opts(net, id, certs.path());
            opts.engine_extra = "auto_rotate_check_seconds = 1\n".into();
            Node {
                id,
                server: TestServer::start(opts),
                cluster_addr: format!("127.0.{net}.{id}:8201"),
            }
        })
        .collect();
    let co = form(&nodes).await;
    let app = app_token(&nodes[0]).await;
    let n0 = &nodes[0].server;
    let (status, body) = n0
        .post(
            &n0.client(),
            "/v1/transit/keys/fresh",
            Some(&app),
            json!({"exportable": true, "allow_plaintext_backup": true, "auto_rotate_period": "1h"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = n0
        .get(&n0.client(), "/v1/transit/backup/fresh", Some(&app))
        .await;
    assert_eq!(status, 200, "{body}");
    let aged = common::aged_transit_backup(body["data"]["backup"].as_str().unwrap(), 7200);
    let (status, body) = n0
        .post(
            &n0.client(),
            "/v1/transit/restore/aged",
            Some(&app),
            json!({"backup": aged}),
        )
        .await;
    assert_eq!(status, 204, "{body}");

    let rotations = |n: &Node| n.server.audit_records("transit.keys.auto_rotate");
    wait_for("an automatic rotation record", || async {
        nodes.iter().any(|n| !rotations(n).is_empty())
    })
    .await;
    for n in &nodes {
        let token = app_token(n).await;
        wait_for(&format!("version 2 of aged on node {}", n.id), || {
            let token = token.clone();
            async move {
                let (_, read) = n
                    .server
                    .get(&n.server.client(), "/v1/transit/keys/aged", Some(&token))
                    .await;
                read["data"]["latest_version"] == json!(2)
            }
        })
        .await;
        let (_, read) = n
            .server
            .get(&n.server.client(), "/v1/transit/keys/fresh", Some(&token))
            .await;
        assert_eq!(read["data"]["latest_version"], 1, "node {}: {read}", n.id);
    }
    let leader = cluster_status(&nodes[0], &co).await["leader"]
        .as_u64()
        .unwrap();
    for n in &nodes {
        let records = rotations(n);
        if n.id == leader {
            assert_eq!(records.len(), 1, "leader {}: {records:?}", n.id);
            assert_eq!(records[0]["detail"]["key"], "aged");
            assert_eq!(records[0]["detail"]["version"], 2);
        } else {
            assert!(records.is_empty(), "follower {} rotated: {records:?}", n.id);
        }
    }
}

/// A member that leaves takes the old cluster key with it: removing it
/// rotates the key on everyone left; a member that was down during a
/// rotation applies it from the log when it comes back; old ciphertexts
/// keep decrypting everywhere. A follower cannot start a rotation.
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_member_rotates_the_cluster_key_and_a_member_that_was_down_catches_up() {
    let _serial = SERIAL.lock().await;
    let net = 62;
    let certs = certs(&[1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3).map(|id| start(net, id, certs.path())).collect();
    let co = form(&nodes).await;
    let t1 = app_token(&nodes[0]).await;
    let (status, body) = create_key(&nodes[0], &t1, "ledger").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = encrypt(&nodes[0], &t1, "ledger", b"before rotation").await;
    assert_eq!(status, 200, "{body}");
    let old_ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    let key_id = |body: &Value| body["data"]["cluster_key_id"].clone();
    let (_, before) = nodes[0]
        .server
        .get(&nodes[0].server.client(), "/v1/hsm/cluster", Some(&co))
        .await;

    // Deny: a follower refuses to start a rotation.
    let co2 = co_token(&nodes[1]).await;
    let (status, body) = nodes[1]
        .server
        .post(
            &nodes[1].server.client(),
            "/v1/hsm/cluster/rotate-key",
            Some(&co2),
            json!({}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("leader"), "{body}");

    // Node 2 is down while the officer rotates on the leader (1 and 3 are
    // a majority).
    nodes[1].server.kill9();
    let (status, body) = nodes[0]
        .server
        .post(
            &nodes[0].server.client(),
            "/v1/hsm/cluster/rotate-key",
            Some(&co),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rotated = key_id(&body);
    assert_ne!(rotated, key_id(&before));
    nodes[1].server.start_again();
    wait_for("node 2 to apply the rotation from the log", || {
        let (n, want) = (&nodes[1], rotated.clone());
        async move { key_id_on(n).await == want }
    })
    .await;
    roundtrip(&nodes[1], &nodes[2], "ledger").await;

    // Removing node 3 rotates again, on the two left.
    let co = co_token(&nodes[0]).await;
    let resp = nodes[0]
        .server
        .client()
        .delete(nodes[0].server.url("/v1/hsm/cluster/nodes/3"))
        .header("X-Vault-Token", &co)
        .send()
        .await
        .unwrap();
    let (status, body) = into_parts(resp).await;
    assert_eq!(status, 200, "{body}");
    let after_removal = key_id(&body);
    assert_ne!(
        after_removal, rotated,
        "removing a member did not rotate the key"
    );
    wait_for("node 2 on the key after the removal", || {
        let (n, want) = (&nodes[1], after_removal.clone());
        async move { key_id_on(n).await == want }
    })
    .await;
    // The removed node kept the key it had: not the cluster's any more.
    assert_ne!(key_id_on(&nodes[2]).await, after_removal);
    // Old ciphertexts decrypt on the members left.
    for n in &nodes[..2] {
        let t = app_token(n).await;
        let (status, body) = decrypt(n, &t, "ledger", &old_ct).await;
        assert_eq!(status, 200, "node {}: {body}", n.id);
        assert_eq!(body["data"]["plaintext"], b64(b"before rotation"));
    }
}
