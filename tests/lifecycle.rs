//! The server's lifecycle under stress, end to end on a real server:
//! SIGTERM in the middle of a write load (nothing acknowledged is lost, not
//! the write and not its audit record), an audit log that cannot be written
//! (admin requests refused, Transit goes on, recovery), and the JSON log
//! format.
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{b64, Opts, TestServer, ADMIN_PASSWORD, CU_PASSWORD};
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

/// How one request ended, seen from the client.
enum Ended {
    /// A whole response: status, `X-Request-Id`, body.
    Answered(u16, Option<String>, Value),
    /// No response head at all (refused, or closed before answering): the
    /// request was never acknowledged.
    NoResponse,
    /// The head arrived but the body broke off: a reset mid-response.
    CutOff,
}

async fn send(req: reqwest::RequestBuilder) -> Ended {
    let Ok(resp) = req.send().await else {
        return Ended::NoResponse;
    };
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match resp.bytes().await {
        Ok(body) => Ended::Answered(
            status,
            id,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ),
        Err(_) => Ended::CutOff,
    }
}

/// What the load acknowledged (a whole 200 response), with request ids.
#[derive(Default)]
struct Acked {
    /// (request id, key name)
    keys: Vec<(String, String)>,
    /// (request id, key name, plaintext base64, ciphertext)
    ciphertexts: Vec<(String, String, String, String)>,
    /// (request id, user name)
    users: Vec<(String, String)>,
    /// Other answered statuses: (status, body).
    unexpected: Vec<(u16, Value)>,
    no_response: usize,
    cut_off: usize,
}

impl Acked {
    fn note(&mut self, ended: Ended) -> Option<(String, Value)> {
        match ended {
            Ended::Answered(200, Some(id), body) => Some((id, body)),
            Ended::Answered(status, _, body) => {
                self.unexpected.push((status, body));
                None
            }
            Ended::NoResponse => {
                self.no_response += 1;
                None
            }
            Ended::CutOff => {
                self.cut_off += 1;
                None
            }
        }
    }
}

/// One Transit worker: creates keys and encrypts with each new key and the
/// shared one, until the server is gone.
async fn transit_worker(
    w: usize,
    base: String,
    client: reqwest::Client,
    token: String,
    acked: Arc<Mutex<Acked>>,
    progress: Arc<AtomicUsize>,
) {
    let url = |p: String| format!("{base}{p}");
    let mut misses = 0;
    for i in 0.. {
        if misses >= 3 {
            break;
        }
        let key = format!("w{w}-k{i}");
        let ended = send(
            client
                .post(url(format!("/v1/transit/keys/{key}")))
                .header("X-Vault-Token", &token)
                .json(&json!({})),
        )
        .await;
        let missed = matches!(ended, Ended::NoResponse);
        let created = acked.lock().unwrap().note(ended);
        if let Some((id, _)) = &created {
            acked.lock().unwrap().keys.push((id.clone(), key.clone()));
            progress.fetch_add(1, Ordering::Relaxed);
        }
        let target = if created.is_some() {
            key
        } else {
            "base".into()
        };
        let plaintext = b64(format!("worker {w} message {i}").as_bytes());
        let ended = send(
            client
                .post(url(format!("/v1/transit/encrypt/{target}")))
                .header("X-Vault-Token", &token)
                .json(&json!({ "plaintext": plaintext })),
        )
        .await;
        let missed = missed && matches!(ended, Ended::NoResponse);
        let mut a = acked.lock().unwrap();
        if let Some((id, body)) = a.note(ended) {
            let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
            a.ciphertexts.push((id, target, plaintext, ct));
            progress.fetch_add(1, Ordering::Relaxed);
        }
        misses = if missed { misses + 1 } else { 0 };
    }
}

/// The HSM worker: creates crypto users (a durable engine write and an
/// admin-class audit record each) until the server is gone.
async fn hsm_worker(
    base: String,
    client: reqwest::Client,
    token: String,
    acked: Arc<Mutex<Acked>>,
    progress: Arc<AtomicUsize>,
) {
    let mut misses = 0;
    for i in 0.. {
        if misses >= 3 {
            break;
        }
        let user = format!("load-user-{i}");
        let ended = send(
            client
                .post(format!("{base}/v1/hsm/users"))
                .header("X-Vault-Token", &token)
                .json(&json!({"username": user, "password": "load-password-123"})),
        )
        .await;
        misses = if matches!(ended, Ended::NoResponse) {
            misses + 1
        } else {
            0
        };
        let mut a = acked.lock().unwrap();
        if let Some((id, _)) = a.note(ended) {
            a.users.push((id, user));
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_load_loses_no_acknowledged_write_or_audit_record() {
    let mut server = TestServer::start(Opts::default());
    let (co, app) = server.init_with_app_user().await;
    let (s, body) = server
        .post(
            &server.client(),
            "/v1/transit/keys/base",
            Some(&app),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    let acked = Arc::new(Mutex::new(Acked::default()));
    let progress = Arc::new(AtomicUsize::new(0));
    let base = server.url("");
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..10 {
        // Half the workers on HTTP/1.1 keep-alive, half multiplexed on HTTP/2:
        // both drain differently (close after the response vs GOAWAY).
        let client = if w % 2 == 0 {
            server.client()
        } else {
            reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(
                        &std::fs::read(server.path("tls/cert.pem")).unwrap(),
                    )
                    .unwrap(),
                )
                .http1_only()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap()
        };
        workers.spawn(transit_worker(
            w,
            base.clone(),
            client,
            app.clone(),
            acked.clone(),
            progress.clone(),
        ));
    }
    workers.spawn(hsm_worker(
        base.clone(),
        server.client(),
        co.clone(),
        acked.clone(),
        progress.clone(),
    ));

    // Mid-stream: once a good number of writes are acknowledged.
    let mut waited = 0;
    while progress.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(
            waited < 6000,
            "the load never got going: {}",
            progress.load(Ordering::Relaxed)
        );
    }
    let exit = tokio::task::block_in_place(|| server.terminate());
    while workers.join_next().await.is_some() {}
    assert!(
        exit.success(),
        "the server must exit 0 after draining: {exit:?}\n{}",
        server.log()
    );

    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "acknowledged: {} keys, {} ciphertexts, {} users; no response: {}; cut off: {}",
        acked.keys.len(),
        acked.ciphertexts.len(),
        acked.users.len(),
        acked.no_response,
        acked.cut_off
    );
    assert_eq!(
        acked.cut_off, 0,
        "a response was reset after its head was sent"
    );
    assert!(
        acked.unexpected.is_empty(),
        "answers other than 200 during the drain: {:?}",
        acked.unexpected
    );
    assert!(!acked.users.is_empty(), "the HSM worker got nothing done");

    // The audit log verifies and holds each acknowledged request's record.
    let log = server.path("audit.log");
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    let records = server.all_audit_records();
    let by_id: HashMap<&str, &Value> = records
        .iter()
        .filter_map(|r| r["request_id"].as_str().map(|id| (id, r)))
        .collect();
    let audited = |id: &str, action: &str| {
        let r = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no audit record for acknowledged request {id} ({action})"));
        assert_eq!(r["action"], action, "{r}");
        assert_eq!(r["outcome"], "success", "{r}");
    };
    for (id, key) in &acked.keys {
        audited(id, "transit.create");
        assert_eq!(by_id[id.as_str()]["detail"]["key"], key.as_str());
    }
    for (id, key, _, _) in &acked.ciphertexts {
        audited(id, "transit.encrypt");
        assert_eq!(by_id[id.as_str()]["detail"]["key"], key.as_str());
    }
    for (id, _) in &acked.users {
        audited(id, "hsm.users");
    }
    assert_eq!(records.last().unwrap()["action"], "server.stop");

    // Every acknowledged write survives the restart.
    server.start_again();
    let app = server.token("app", CU_PASSWORD).await;
    let client = server.client();
    for (_, key) in &acked.keys {
        let (s, body) = server
            .get(&client, &format!("/v1/transit/keys/{key}"), Some(&app))
            .await;
        assert_eq!(s, 200, "acknowledged key {key} is gone: {body}");
    }
    for (_, key, plaintext, ciphertext) in &acked.ciphertexts {
        let (s, body) = server
            .post(
                &client,
                &format!("/v1/transit/decrypt/{key}"),
                Some(&app),
                json!({ "ciphertext": ciphertext }),
            )
            .await;
        assert_eq!(s, 200, "{key}: {body}");
        assert_eq!(body["data"]["plaintext"], plaintext.as_str());
    }
    let users: HashSet<String> = server.status().await["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect();
    for (_, user) in &acked.users {
        assert!(users.contains(user), "acknowledged user {user} is gone");
    }
}

fn prlimit(pid: u32, args: &[&str]) -> String {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .args(args)
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(
        out.status.success(),
        "prlimit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

async fn audit_failures(server: &TestServer, token: &str) -> f64 {
    let resp = server
        .client()
        .get(server.url("/v1/sys/metrics?format=prometheus"))
        .header("X-Vault-Token", token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sample(
        &resp.text().await.unwrap(),
        "hsmgate_audit_write_failures_total",
    )
}

/// The audit log's file cannot grow (the process's file-size limit is set
/// to the log's size with prlimit(1), as `LimitFSIZE=` or a full disk would
/// stop it): admin requests fail with a clear 500/503, Transit goes on,
/// the failure metric rises, and once the limit is lifted the next admin
/// request writes `audit.resumed` (with the count of lost records) and
/// goes through. Nothing here is a test hook: it is the real write path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_stops_admin_requests_until_it_recovers() {
    let server = TestServer::start(Opts::default());
    let (co, app) = server.init_with_app_user().await;
    let client = server.client();
    let (s, _) = server
        .post(&client, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(s, 200);
    let before = audit_failures(&server, &app).await;
    assert_eq!(before, 0.0);

    let pid = server.pid().unwrap();
    let original = prlimit(pid, &["--fsize", "--output=SOFT", "--noheadings"]);
    let size = std::fs::metadata(server.path("audit.log")).unwrap().len();
    prlimit(pid, &[&format!("--fsize={size}:")]);

    // The first admin request acted before the log failed under it: 500,
    // saying its record could not be written.
    let (s, body) = server.get(&client, "/v1/hsm/status", Some(&co)).await;
    assert_eq!(s, 500, "{body}");
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("audit record of this request could not be written"),
        "{body}"
    );
    // From now on admin requests and logins are refused before they act.
    let (s, body) = server
        .post(
            &client,
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "blocked", "password": "blocked-password-1"}),
        )
        .await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("audit log cannot be written"),
        "{body}"
    );
    let (s, _) = server.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(s, 503);
    // Transit keeps serving (documented policy: only admin requests stop);
    // its key-use records are lost and counted.
    let (s, body) = server
        .post(
            &client,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"still serving")}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let during = audit_failures(&server, &app).await;
    assert!(
        during >= 4.0,
        "hsmgate_audit_write_failures_total = {during}"
    );

    // The fault clears: the next admin request goes through.
    prlimit(pid, &[&format!("--fsize={original}:")]);
    let (s, body) = server
        .post(
            &client,
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "after", "password": "after-password-1"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let users: Vec<String> = server.status().await["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect();
    assert!(users.contains(&"after".to_string()), "{users:?}");
    assert!(
        !users.contains(&"blocked".to_string()),
        "a refused admin request acted: {users:?}"
    );

    let (code, out) = verify(&server.path("audit.log"));
    assert_eq!(code, 0, "{out}");
    let records = server.all_audit_records();
    let resumed = records
        .iter()
        .position(|r| r["action"] == "audit.resumed")
        .expect("an audit.resumed record");
    // The status, users, login and encrypt records were lost.
    assert!(
        records[resumed]["detail"]["lost_records"].as_u64().unwrap() >= 4,
        "{}",
        records[resumed]
    );
    let after = &records[resumed + 1];
    assert_eq!(after["action"], "hsm.users", "{after}");
    assert_eq!(after["outcome"], "success", "{after}");
}

/// `HSMGATE_LOG_FORMAT=json`: every line the server writes to stderr is a
/// JSON object with a level, a target and fields; access lines carry the
/// request id and status.
#[tokio::test]
async fn json_logs_are_json_lines() {
    // The harness builds the config tree; this test runs its own process
    // on it with the JSON format.
    let mut server = TestServer::start(Opts::default());
    server.kill9();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["serve", "--config"])
        .arg(&server.config_path)
        .env("HSMGATE_LOG", "info")
        .env("HSMGATE_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(a) = line.trim().strip_prefix("hsmgate: listening api https://") {
            break a.to_string();
        }
    };
    let client = server.client();
    for path in ["/v1/sys/health", "/v1/transit/nope", "/v1/hsm/status"] {
        let resp = client
            .get(format!("https://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert!(resp.headers().contains_key("x-request-id"));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let lines = lines.join().unwrap();
    assert!(lines.len() >= 5, "{lines:#?}");
    let mut access = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["target"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["fields"].is_object(), "{line}");
        if v["target"] == "hsmgate::access" {
            access += 1;
            assert!(v["fields"]["request_id"].is_string(), "{line}");
            assert!(v["fields"]["status"].is_u64(), "{line}");
        }
    }
    assert_eq!(access, 3, "{lines:#?}");
}
