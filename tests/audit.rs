//! The audit log, end to end: a real server writes it, `hsmgate audit
//! verify` checks it, and every kind of tampering is caught.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestServer, ADMIN_PASSWORD, CU_PASSWORD};
use serde_json::{json, Value};

fn verify(log: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .expect("run hsmgate audit verify");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A copy of the log and its head in a fresh dir, with the lines changed by `f`.
fn tampered(
    dir: &tempfile::TempDir,
    name: &str,
    log: &Path,
    f: impl FnOnce(&mut Vec<String>),
) -> PathBuf {
    let text = std::fs::read_to_string(log).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    f(&mut lines);
    let copy = dir.path().join(name);
    std::fs::write(&copy, lines.join("\n") + "\n").unwrap();
    let head = std::fs::read(hsmgate::audit::head_path(log)).unwrap();
    std::fs::write(hsmgate::audit::head_path(&copy), head).unwrap();
    copy
}

/// Drives a server through init, users, key use, failed and refused
/// logins, a zeroization and a restart; returns its log path.
async fn real_log(server: &mut TestServer) -> PathBuf {
    let (co, app) = server.init_with_app_user().await;
    let client = server.client();
    let (s, _) = server
        .post(&client, "/v1/transit/keys/orders", Some(&app), json!({}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = server
        .post(
            &client,
            "/v1/transit/encrypt/orders",
            Some(&app),
            json!({"plaintext": common::b64(b"hello")}),
        )
        .await;
    assert_eq!(s, 200);
    // An app token on an admin route: a policy denial.
    let (s, _) = server
        .post(&client, "/v1/hsm/zeroize", Some(&app), json!({}))
        .await;
    assert_eq!(s, 403);
    // Two wrong officer passwords, then the guard refuses the third.
    for expected in [401, 401, 423] {
        let (s, _) = server.login("admin", "wrong-password-xyz").await;
        assert_eq!(s, expected);
    }
    // Break-glass resets the count; then the officer zeroizes on purpose.
    let (s, _) = server.login_break_glass("admin", ADMIN_PASSWORD).await;
    assert_eq!(s, 200);
    let (s, body) = server
        .post(&client, "/v1/hsm/zeroize", Some(&co), json!({}))
        .await;
    assert_eq!(s, 200, "{body}");
    server.restart();
    server.data_dir.join("audit.log")
}

#[tokio::test]
async fn a_real_log_verifies_and_every_tampering_is_caught() {
    let mut server = TestServer::start(Default::default());
    let log = real_log(&mut server).await;

    // Zeroization removed the keys, never the audit log.
    assert!(!server.path("store.redb").exists());
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit log OK"), "{out}");
    assert!(out.contains("matches the stored head"), "{out}");

    let recs = records(&log);
    let find = |action: &str, outcome: &str| {
        recs.iter()
            .find(|r| r["action"] == action && r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {action}/{outcome} record in {recs:#?}"))
            .clone()
    };
    find("server.start", "success");
    find("hsm.init", "success");
    find("hsm.users", "success");
    let login_ok = find("hsm.login", "success");
    assert_eq!(login_ok["source"], "127.0.0.1");
    let failed = find("hsm.login", "failure");
    assert_eq!(failed["actor"], "admin");
    let refused = find("hsm.login", "refused");
    assert_eq!(refused["detail"]["status"], 423);
    assert_eq!(refused["detail"]["channel"], "front-door");
    let denied = find("hsm.zeroize", "denied");
    assert_eq!(denied["actor"], "app");
    let used = find("transit.encrypt", "success");
    assert_eq!(used["actor"], "app");
    assert_eq!(used["detail"]["key"], "orders");
    let zeroized = find("engine.zeroized", "success");
    assert_eq!(zeroized["actor"], "admin");
    find("server.stop", "success");
    // The restart opened the same chain and went on with it.
    assert_eq!(recs.last().unwrap()["action"], "server.start");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], (i + 1) as u64);
        assert!(r["request_id"].is_null() || r["request_id"].is_string());
    }
    // Never a password, right or wrong.
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [ADMIN_PASSWORD, CU_PASSWORD, "wrong-password-xyz"] {
        assert!(!text.contains(secret), "a password reached the audit log");
    }

    let dir = tempfile::tempdir().unwrap();
    let n = recs.len();
    assert!(n >= 12, "{n} records");

    // One byte changed in record 5: record 6's prev no longer matches.
    let one_byte = tampered(&dir, "byte.log", &log, |lines| {
        lines[4] = lines[4].replacen("\"status\":200", "\"status\":201", 1);
        if !lines[4].contains("\"status\":201") {
            lines[4] = lines[4].replacen("\"outcome\":\"", "\"outcome\":\"x", 1);
        }
    });
    let (code, out) = verify(&one_byte);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BROKEN") && out.contains("at record 6 "),
        "{out}"
    );

    // Record 4 deleted.
    let deleted = tampered(&dir, "deleted.log", &log, |lines| {
        lines.remove(3);
    });
    let (code, out) = verify(&deleted);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("at record 4 "), "{out}");

    // Records 7 and 8 swapped.
    let swapped = tampered(&dir, "swapped.log", &log, |lines| lines.swap(6, 7));
    let (code, out) = verify(&swapped);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("at record 7 "), "{out}");

    // The last three records cut off: the chain is whole, the head says more.
    let cut = tampered(&dir, "cut.log", &log, |lines| lines.truncate(n - 3));
    let (code, out) = verify(&cut);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cut off"), "{out}");

    // And a server refuses to write on after a truncated log.
    server.kill9();
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text.lines().take(n - 2).collect();
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["serve", "--config"])
        .arg(&server.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its stored head"), "{err}");
}

/// Connections denied at accept become `connection.denied.summary` records:
/// one per source per interval (the busiest `DENY_SUMMARY_TOP`) and one with
/// the interval's totals, never one per connection. The last interval is
/// written at shutdown.
#[tokio::test]
async fn denied_connections_are_audited_as_bounded_per_source_summaries() {
    use hsmgate::netfilter::DENY_SUMMARY_TOP;
    let mut server = TestServer::start(Default::default());
    // 30 foreign sources (outside every group), the first one five times.
    let sources: Vec<std::net::IpAddr> = (2..32)
        .map(|i| format!("127.0.0.{i}").parse().unwrap())
        .collect();
    let mut attempts = 0;
    for (i, source) in sources.iter().enumerate() {
        for _ in 0..if i == 0 { 5 } else { 1 } {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(std::net::SocketAddr::new(*source, 0)).unwrap();
            let mut stream = socket.connect(server.addr).await.unwrap();
            // Dropped right after accept: the read ends without a byte.
            let mut buf = [0u8; 1];
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
                .await
                .unwrap_or(0);
            assert_eq!(n, 0);
            attempts += 1;
        }
    }
    // An admitted client is not summarised.
    let (s, _) = server.get(&server.client(), "/v1/sys/health", None).await;
    assert_eq!(s, 501);
    let exit = server.terminate();
    assert!(exit.success());

    let log = server.path("audit.log");
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    let recs = records(&log);
    let summaries: Vec<&Value> = recs
        .iter()
        .filter(|r| r["action"] == "connection.denied.summary")
        .collect();
    let (per_source, totals): (Vec<&Value>, Vec<&Value>) =
        summaries.iter().partition(|r| r["source"] != "local");
    // Whatever the interval boundaries, the totals add up and each
    // interval names at most DENY_SUMMARY_TOP sources.
    assert!(!totals.is_empty());
    let total: u64 = totals
        .iter()
        .map(|r| r["detail"]["total"].as_u64().unwrap())
        .sum();
    assert_eq!(total, attempts);
    assert!(per_source.len() <= totals.len() * DENY_SUMMARY_TOP);
    for t in &totals {
        assert_eq!(t["outcome"], "denied");
        assert!(t["detail"]["sources_named"].as_u64().unwrap() <= DENY_SUMMARY_TOP as u64);
    }
    // The busiest source is named with all its denials.
    let busiest: u64 = per_source
        .iter()
        .filter(|r| r["source"] == "127.0.0.2")
        .map(|r| {
            assert_eq!(r["detail"]["reason"], "not-in-groups", "{r}");
            assert_eq!(r["detail"]["listener"], "api", "{r}");
            r["detail"]["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(busiest, 5);
    assert!(
        !summaries.iter().any(|r| r["source"] == "127.0.0.1"),
        "an admitted peer was summarised as denied"
    );
    // Fewer records than connections: 30 sources, at most 20 named.
    assert!(per_source.len() < sources.len(), "{}", per_source.len());
}

/// `key_use = "per_minute"`: many encrypts become one `transit.key_use`
/// record per (principal, key, operation) with the counts; denials still
/// get a record each. `key_use = "all"` (the default) is tested by
/// `a_real_log_verifies_and_every_tampering_is_caught`.
#[tokio::test]
async fn per_minute_key_use_writes_one_record_per_principal_key_and_op() {
    let mut server = TestServer::start(common::Opts {
        extra_config: "[audit]\nkey_use = \"per_minute\"\n".into(),
        ..Default::default()
    });
    let (_co, app) = server.init_with_app_user().await;
    let client = server.client();
    let (s, _) = server
        .post(&client, "/v1/transit/keys/orders", Some(&app), json!({}))
        .await;
    assert_eq!(s, 200);
    for _ in 0..40 {
        let (s, _) = server
            .post(
                &client,
                "/v1/transit/encrypt/orders",
                Some(&app),
                json!({"plaintext": common::b64(b"hello")}),
            )
            .await;
        assert_eq!(s, 200);
    }
    // A failure (bad ciphertext) is counted as one.
    let (s, _) = server
        .post(
            &client,
            "/v1/transit/decrypt/orders",
            Some(&app),
            json!({"ciphertext": "vault:v1:AAAA"}),
        )
        .await;
    assert_eq!(s, 400);
    // A denial (no token) keeps its own record.
    let (s, _) = server
        .post(
            &client,
            "/v1/transit/encrypt/orders",
            None,
            json!({"plaintext": common::b64(b"x")}),
        )
        .await;
    assert_eq!(s, 403);
    assert!(server.terminate().success());

    let log = server.path("audit.log");
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    let recs = records(&log);
    assert!(
        !recs
            .iter()
            .any(|r| r["action"] == "transit.encrypt" && r["outcome"] == "success"),
        "per-operation records were written"
    );
    let uses: Vec<&Value> = recs
        .iter()
        .filter(|r| r["action"] == "transit.key_use")
        .collect();
    let count = |op: &str, field: &str| -> u64 {
        uses.iter()
            .filter(|r| r["detail"]["op"] == op)
            .map(|r| {
                assert_eq!(r["actor"], "app", "{r}");
                assert_eq!(r["detail"]["key"], "orders", "{r}");
                r["detail"][field].as_u64().unwrap()
            })
            .sum()
    };
    // The minute may roll over mid-test: sum over the records.
    assert_eq!(count("encrypt", "success"), 40);
    assert_eq!(count("create", "success"), 1);
    assert_eq!(count("decrypt", "failure"), 1);
    assert!(uses.len() <= 6, "{} key-use records", uses.len());
    let denied = recs
        .iter()
        .find(|r| r["action"] == "transit.encrypt" && r["outcome"] == "denied")
        .expect("the denial has its own record");
    assert_eq!(denied["detail"]["key"], "orders");
}

/// Truncation that also rewrites the sidecar head consistently (what an
/// attacker who can edit both files does) fools the sidecar, not the head
/// the engine keeps in its sealed store: `audit verify --config` names the
/// store head and fails. The untouched log verifies against both heads.
#[tokio::test]
async fn the_store_head_catches_a_log_and_sidecar_cut_together() {
    let mut server = TestServer::start(Default::default());
    let (_co, app) = server.init_with_app_user().await;
    let client = server.client();
    let (s, _) = server
        .post(&client, "/v1/transit/keys/ledger", Some(&app), json!({}))
        .await;
    assert_eq!(s, 200);
    for i in 0..3 {
        let (s, _) = server
            .post(
                &client,
                "/v1/transit/encrypt/ledger",
                Some(&app),
                json!({"plaintext": common::b64(format!("entry {i}").as_bytes())}),
            )
            .await;
        assert_eq!(s, 200);
    }
    assert!(server.terminate().success());

    let log = server.path("audit.log");
    let config_path = server.config_path.clone();
    let verify_with_config = || {
        let out = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["audit", "verify", "--config"])
            .arg(&config_path)
            .output()
            .expect("run hsmgate audit verify");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    };
    let n = records(&log).len();
    let (code, out) = verify_with_config();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "store head {}: seq {n}, matches",
            server.path("store.redb").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("sidecar head") && out.contains(": matches"),
        "{out}"
    );

    // Cut the last three records and rewrite the sidecar to the new end.
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text.lines().take(n - 3).collect();
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    let last = kept.last().unwrap();
    let forged = json!({
        "seq": n - 3,
        "hash": hex::encode(hsmgate::engine::crypto::sha256(last.as_bytes())),
    });
    std::fs::write(
        hsmgate::audit::head_path(&log),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    // The sidecar alone is fooled...
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("give --config"), "{out}");
    // ...the store's witness is not.
    let (code, out) = verify_with_config();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN"), "{out}");
    assert!(out.contains("the engine's store head"), "{out}");
    assert!(out.contains("cut off"), "{out}");

    // A server started on the forged pair (the sidecar agrees, so it
    // starts) must not overwrite the store's witness, even once the log
    // has grown past the old head.
    server.start_again();
    for _ in 0..5 {
        let (s, _) = server.login("nobody", "wrong-password-xyz").await;
        assert_ne!(s, 200);
    }
    assert!(server.terminate().success());
    assert!(
        records(&log).len() > n,
        "the log did not grow past the old head"
    );
    assert!(
        server
            .log()
            .contains("does not contain the head kept in the engine's store"),
        "{}",
        server.log()
    );
    let (code, out) = verify_with_config();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "store head {}: seq {n}",
            server.path("store.redb").display()
        )),
        "{out}"
    );
    assert!(out.contains("differs from the stored head's hash"), "{out}");
}
