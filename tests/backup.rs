//! Encrypted backups through the real server and CLI (docs/BACKUP.md).
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// `hsmgate backup-keygen` into `dir`; returns the `[backup]` lines it prints.
fn keygen(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
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

fn custodian_key(dir: &Path) -> String {
    b64(&std::fs::read(dir.join("custodian.key")).unwrap())
}

fn with_backup(config: &str) -> Opts {
    Opts {
        extra_config: config.to_string(),
        ..Opts::default()
    }
}

/// Init, app user, one key, one ciphertext; then a backup. Returns
/// (ciphertext, backup base64, officer token).
async fn populate_and_back_up(s: &TestServer) -> (String, String, String) {
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"kept across restore")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    // Only the officer backs up.
    let (st, _) = s.post(&c, "/v1/hsm/backup", Some(&app), json!({})).await;
    assert_eq!(st, 403);
    let (st, body) = s.post(&c, "/v1/hsm/backup", Some(&co), json!({})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["keys"], 1);
    assert_eq!(body["data"]["users"], 2);
    (ct, body["data"]["backup"].as_str().unwrap().to_string(), co)
}

async fn restore(s: &TestServer, backup: &str, custodian: &str, token: &str) -> (u16, Value) {
    s.post(
        &s.client(),
        "/v1/hsm/restore",
        None,
        json!({"backup": backup, "custodian_key": custodian, "init_token": token}),
    )
    .await
}

async fn decrypts(s: &TestServer, ct: &str) -> bool {
    let app = s.token("app", CU_PASSWORD).await;
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/transit/decrypt/k",
            Some(&app),
            json!({"ciphertext": ct}),
        )
        .await;
    st == 200 && body["data"]["plaintext"] == b64(b"kept across restore")
}

fn decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test]
async fn backup_zeroize_restore_round_trip_and_bad_files_change_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let s = TestServer::start(with_backup(&keygen(keys.path())));
    let (ct, backup, co) = populate_and_back_up(&s).await;
    let custodian = custodian_key(keys.path());
    // Restore refuses an initialized engine.
    let (st, _) = restore(&s, &backup, &custodian, "whatever").await;
    assert_eq!(st, 400);
    let (st, _) = s
        .post(&s.client(), "/v1/hsm/zeroize", Some(&co), json!({}))
        .await;
    assert_eq!(st, 200);
    let token = s.init_token();

    // Tampered: one byte flipped in the middle.
    let mut bytes = decode(&backup);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let (st, body) = restore(&s, &b64(&bytes), &custodian, &token).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("backup refused"), "{body}");
    // Truncated.
    let bytes = decode(&backup);
    let (st, body) = restore(&s, &b64(&bytes[..bytes.len() - 10]), &custodian, &token).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("truncated"), "{body}");
    // Wrong custodian.
    let other = tempfile::tempdir().unwrap();
    keygen(other.path());
    let (st, body) = restore(&s, &backup, &custodian_key(other.path()), &token).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("another custodian"), "{body}");
    // Without the init token.
    let (st, _) = restore(&s, &backup, &custodian, "not-the-token").await;
    assert_eq!(st, 403);
    // Nothing changed by any of them.
    assert_eq!(s.status().await["state"], "zeroized");
    assert_eq!(s.init_token(), token);

    let (st, body) = restore(&s, &backup, &custodian, &token).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["keys"], 1);
    assert!(decrypts(&s, &ct).await);
    // The officer's password came back with the backup.
    s.token("admin", ADMIN_PASSWORD).await;
}

/// Someone who knows the custodian's public key (it is in config) builds a
/// well-formed backup with their own signing key: refused, nothing changes.
#[tokio::test]
async fn a_backup_not_signed_by_a_pinned_key_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let pinned = keygen(keys.path());
    let attacker_keys = tempfile::tempdir().unwrap();
    keygen(attacker_keys.path());
    // The attacker's server: same custodian, the attacker's signer.
    let custodian_line = pinned
        .lines()
        .find(|l| l.starts_with("custodian_public_key"))
        .unwrap();
    let attacker = TestServer::start(with_backup(&format!(
        "[backup]\n{custodian_line}\nsigning_key_file = \"{}\"\n",
        attacker_keys.path().join("signer.key").display()
    )));
    let (_, forged, _) = populate_and_back_up(&attacker).await;

    let victim = TestServer::start(with_backup(&pinned));
    let token = victim.init_token();
    let (st, body) = restore(&victim, &forged, &custodian_key(keys.path()), &token).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("trusted_signers"), "{body}");
    assert_eq!(victim.status().await["state"], "uninitialized");
    // The allow beside it: the victim's own backup restores elsewhere.
    let other = TestServer::start(with_backup(&pinned));
    let (ct, own, _) = populate_and_back_up(&other).await;
    let (st, body) = restore(&victim, &own, &custodian_key(keys.path()), &token).await;
    assert_eq!(st, 200, "{body}");
    assert!(decrypts(&victim, &ct).await);
}

#[tokio::test]
async fn cli_backup_and_restore_of_a_stopped_server() {
    let keys = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(with_backup(&keygen(keys.path())));
    let (ct, _, _) = populate_and_back_up(&s).await;
    s.kill9();
    let file = s.dir.path().join("offline.hsmbak");
    let config_path = s.config_path.clone();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()
            .unwrap()
    };
    let out = run(&["backup", "--out", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Progress as a percentage, from 0 to 100, records counted.
    assert!(stderr.contains("wrapping records:   0%"), "{stderr}");
    assert!(stderr.contains("wrapping records: 100% ("), "{stderr}");
    // Restore refuses the initialized engine and changes nothing.
    let key = keys.path().join("custodian.key");
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--custodian-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    // Fresh data dir: a truncated file is refused, the whole one restores.
    std::fs::remove_dir_all(&s.data_dir).unwrap();
    s.start_again();
    s.kill9();
    let whole = std::fs::read(&file).unwrap();
    let cut = file.with_extension("cut");
    std::fs::write(&cut, &whole[..whole.len() - 1]).unwrap();
    let out = run(&[
        "restore",
        cut.to_str().unwrap(),
        "--custodian-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was changed"));
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--custodian-key",
        key.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for stage in [
        "unwrapping records",
        "checking key rings",
        "writing the store",
    ] {
        assert!(
            stderr.contains(&format!("{stage}: 100% (")),
            "{stage}: {stderr}"
        );
    }
    s.start_again();
    assert!(decrypts(&s, &ct).await);
}

/// `[backup] schedule_dir`: a backup every interval, only the newest
/// `schedule_keep` kept; each one restores.
#[tokio::test]
async fn scheduled_backups_rotate_and_restore() {
    let keys = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        "{}schedule_dir = \"{}\"\nschedule_interval_seconds = 1\nschedule_keep = 2\n",
        keygen(keys.path()),
        out.path().display()
    );
    let s = TestServer::start(with_backup(&config));
    let (ct, _, _) = populate_and_back_up(&s).await;
    let backups = || -> Vec<String> {
        std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".hsmbak"))
            .collect()
    };
    // A new backup is complete on disk before the oldest is removed (never
    // the other way round: a failed write must not cost a kept backup), so
    // a read between the two sees schedule_keep + 1 files, never more.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let names = backups();
        assert!(names.len() <= 3, "more than schedule_keep + 1: {names:?}");
        seen.extend(names);
        if seen.len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen.len() >= 4, "saw only {seen:?}");
    // And after each prune exactly schedule_keep remain.
    let mut kept = backups();
    for _ in 0..100 {
        if kept.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        kept = backups();
    }
    assert_eq!(kept.len(), 2, "schedule_keep = 2 not kept: {kept:?}");
    let newest = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hsmbak"))
        .max()
        .unwrap();
    let file = std::fs::read(&newest).unwrap();
    let other = TestServer::start(with_backup(&config.replace(
        &out.path().display().to_string(),
        &out.path().join("other").display().to_string(),
    )));
    let (st, body) = restore(
        &other,
        &b64(&file),
        &custodian_key(keys.path()),
        &other.init_token(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(decrypts(&other, &ct).await);
}

/// A public-key-only key (Vault's `public_key` import) goes through an
/// encrypted backup, zeroize and restore as what it was: it verifies the
/// holder's signatures and still cannot sign.
#[tokio::test]
async fn a_public_only_key_survives_backup_and_restore_as_a_verification_key() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let keys = tempfile::tempdir().unwrap();
    let s = TestServer::start(with_backup(&keygen(keys.path())));
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let holder = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
    let pem = public_key_pem(holder.public_key().as_der().unwrap().as_ref());
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/pub/import",
            Some(&app),
            json!({"type": "ecdsa-p256", "public_key": pem}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let shown = body["data"]["keys"]["1"]["public_key"].clone();
    let msg = b"signed by the holder";
    let sig = format!("vault:v1:{}", b64(holder.sign(&rng, msg).unwrap().as_ref()));
    let (st, body) = s.post(&c, "/v1/hsm/backup", Some(&co), json!({})).await;
    assert_eq!(st, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();
    let (st, _) = s.post(&c, "/v1/hsm/zeroize", Some(&co), json!({})).await;
    assert_eq!(st, 200);
    let (st, body) = restore(&s, &backup, &custodian_key(keys.path()), &s.init_token()).await;
    assert_eq!(st, 200, "{body}");
    let app = s.token("app", CU_PASSWORD).await;
    let (st, body) = s.get(&c, "/v1/transit/keys/pub", Some(&app)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["keys"]["1"]["public_key"], shown);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/verify/pub",
            Some(&app),
            json!({"input": b64(msg), "signature": sig}),
        )
        .await;
    assert_eq!(
        (st, body["data"]["valid"].clone()),
        (200, json!(true)),
        "{body}"
    );
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/sign/pub",
            Some(&app),
            json!({"input": b64(msg)}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
}
