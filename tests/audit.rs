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
