//! Access policies (src/acl.rs) over real sockets: JWT apps and crypto users
//! get exactly what their policies grant on Transit, denials are 403 with
//! Vault's body, audited and counted; without any policy Transit is not
//! path-restricted (the behaviour before ACLs).
mod common;

#[path = "fixtures/jwt_issuer.rs"]
mod jwt_issuer;

use common::*;
use jwt_issuer::*;
use serde_json::{json, Value};

const VAULT_DENIED: &str = "1 error occurred:\n\t* permission denied\n\n";

const ACL: &str = r#"
[[policy]]
name = "payments-keys"
description = "The payments app encrypts and decrypts with its own keys"
[[policy.path]]
path = "transit/encrypt/payments-*"
capabilities = ["update"]
[[policy.path]]
path = "transit/decrypt/payments-*"
capabilities = ["update"]
[[policy.path]]
path = "transit/encrypt/payments-frozen"
capabilities = ["update"]

[[policy]]
name = "no-frozen"
[[policy.path]]
path = "transit/+/payments-frozen"
capabilities = ["deny"]

[[policy]]
name = "billing-keys"
[[policy.path]]
path = "transit/+/billing"
capabilities = ["update"]
[[policy.path]]
path = "transit/keys/billing-*"
capabilities = ["create", "read"]

[[policy]]
name = "list-only"
[[policy.path]]
path = "transit/keys"
capabilities = ["list"]

[[user_policy]]
user = "alice"
policies = ["billing-keys"]
"#;

fn issuer_config(issuer: &Issuer) -> String {
    let rsa = issuer.dir.path().join("rsa.pem").display().to_string();
    let role = |name: &str, team: &str, policies: &str| {
        format!(
            "[[jwt_issuer.role]]\nname = \"{name}\"\nbound_claims = {{ team = [\"{team}\"] }}\n\
             policies = [{policies}]\n"
        )
    };
    format!(
        "[[jwt_issuer]]\nname = \"ci\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
         algorithms = [\"RS256\"]\npublic_keys = [{{ kid = \"rsa1\", file = \"{rsa}\" }}]\n{}{}{}{}{}",
        role("payments", "payments", "\"payments-keys\", \"no-frozen\""),
        role("legacy", "legacy", "\"payments-keys\""),
        role("billing", "billing", "\"billing-keys\""),
        role("lister", "lister", "\"list-only\""),
        role("nothing", "nothing", ""),
    )
}

struct Fixture {
    s: TestServer,
    issuer: Issuer,
}

impl Fixture {
    /// A server whose keys were made while no policy existed, then
    /// restarted with `ACL` in its policies dir.
    async fn start() -> Fixture {
        let issuer = Issuer::new();
        let mut s = TestServer::start(Opts {
            extra_config: issuer_config(&issuer),
            ..Opts::default()
        });
        let (co, app) = s.init_with_app_user().await;
        for user in ["alice", "bob"] {
            let (st, body) = s
                .post(
                    &s.client(),
                    "/v1/hsm/users",
                    Some(&co),
                    json!({"username": user, "password": CU_PASSWORD, "role": "crypto-user"}),
                )
                .await;
            assert_eq!(st, 200, "{body}");
        }
        for key in ["payments-eu", "payments-frozen", "billing", "other"] {
            let path = format!("/v1/transit/keys/{key}");
            let (st, body) = s.post(&s.client(), &path, Some(&app), json!({})).await;
            assert_eq!(st, 200, "{body}");
        }
        std::fs::write(s.dir.path().join("policies/acl.toml"), ACL).unwrap();
        s.restart();
        Fixture { s, issuer }
    }

    fn jwt(&self, team: &str) -> String {
        let mut claims = self.issuer.claims();
        claims["team"] = json!(team);
        self.issuer.rs256(&claims)
    }

    async fn encrypt(&self, token: &str, key: &str) -> (u16, Value) {
        self.s
            .post(
                &self.s.client(),
                &format!("/v1/transit/encrypt/{key}"),
                Some(token),
                json!({"plaintext": b64(b"hello")}),
            )
            .await
    }

    fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.s.data_dir.join("audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn assert_vault_denied(status: u16, body: &Value) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["errors"], json!([VAULT_DENIED]), "{body}");
}

#[tokio::test]
async fn a_jwt_app_uses_its_paths_and_is_denied_elsewhere_audited_and_counted() {
    let f = Fixture::start().await;
    let token = f.jwt("payments");
    // Allowed: its own keys, both directions.
    let (st, body) = f.encrypt(&token, "payments-eu").await;
    assert_eq!(st, 200, "{body}");
    let ciphertext = body["data"]["ciphertext"].as_str().unwrap().to_string();
    let (st, body) =
        f.s.post(
            &f.s.client(),
            "/v1/transit/decrypt/payments-eu",
            Some(&token),
            json!({ "ciphertext": ciphertext }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["plaintext"], b64(b"hello"));
    // Denied: another team's key, and reading its own key's metadata (no
    // rule grants read).
    let (st, body) = f.encrypt(&token, "billing").await;
    assert_vault_denied(st, &body);
    let (st, body) =
        f.s.get(&f.s.client(), "/v1/transit/keys/payments-eu", Some(&token))
            .await;
    assert_vault_denied(st, &body);

    // Audited with who, what, where and why.
    let denial = f
        .audit_records()
        .into_iter()
        .find(|r| r["action"] == "transit.encrypt" && r["outcome"] == "denied")
        .expect("an audit record of the denial");
    assert_eq!(denial["actor"], "jwt:ci:payments:payments-api");
    assert_eq!(denial["detail"]["decision"], "acl_denied");
    assert_eq!(denial["detail"]["acl_reason"], "no_matching_rule");
    assert_eq!(denial["detail"]["acl_capability"], "update");
    assert_eq!(denial["detail"]["acl_path"], "transit/encrypt/billing");
    assert_eq!(denial["detail"]["key"], "billing");
    assert_eq!(
        denial["detail"]["policies"],
        json!(["payments-keys", "no-frozen"])
    );
    // The allowed calls left no denial behind.
    assert!(!f
        .audit_records()
        .iter()
        .any(|r| r["action"] == "transit.decrypt" && r["outcome"] == "denied"));

    // Counted, with bounded labels.
    let resp =
        f.s.client()
            .get(f.s.url("/v1/sys/metrics?format=prometheus"))
            .header("X-Vault-Token", &token)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(
            "hsmgate_acl_denials_total{capability=\"update\",reason=\"no_matching_rule\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "hsmgate_acl_denials_total{capability=\"read\",reason=\"no_matching_rule\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn an_explicit_deny_beats_an_exact_grant_from_another_policy() {
    let f = Fixture::start().await;
    // The allow: `payments-keys` alone grants the exact path.
    let (st, body) = f.encrypt(&f.jwt("legacy"), "payments-frozen").await;
    assert_eq!(st, 200, "{body}");
    // The deny: the same grant plus `no-frozen`'s less specific deny.
    let payments = f.jwt("payments");
    let (st, body) = f.encrypt(&payments, "payments-frozen").await;
    assert_vault_denied(st, &body);
    let (st, body) =
        f.s.post(
            &f.s.client(),
            "/v1/transit/decrypt/payments-frozen",
            Some(&payments),
            json!({"ciphertext": "vault:v1:AAAA"}),
        )
        .await;
    assert_vault_denied(st, &body);
    let denial = f
        .audit_records()
        .into_iter()
        .find(|r| r["detail"]["acl_reason"] == "deny_rule")
        .expect("the deny is audited");
    assert_eq!(denial["detail"]["acl_rule"], "transit/+/payments-frozen");
}

#[tokio::test]
async fn crypto_users_get_policies_from_bindings_and_default_deny_otherwise() {
    let f = Fixture::start().await;
    let s = &f.s;
    // alice is bound to billing-keys.
    let alice = s.token("alice", CU_PASSWORD).await;
    assert_eq!(f.encrypt(&alice, "billing").await.0, 200);
    let (st, body) = f.encrypt(&alice, "payments-eu").await;
    assert_vault_denied(st, &body);
    // `create` on transit/keys/billing-*: a new billing key yes, others no.
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/transit/keys/billing-2",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/transit/keys/payments-2",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_vault_denied(st, &body);
    // A rule that matches but grants something else: `transit/+/billing`
    // has update, not delete.
    let resp = s
        .client()
        .delete(s.url("/v1/transit/keys/billing"))
        .header("X-Vault-Token", &alice)
        .send()
        .await
        .unwrap();
    let (st, body) = into_parts(resp).await;
    assert_vault_denied(st, &body);
    // bob has no binding: default deny, even for a key he could use before.
    let bob = s.token("bob", CU_PASSWORD).await;
    let (st, body) = f.encrypt(&bob, "billing").await;
    assert_vault_denied(st, &body);
    let (st, body) = f.encrypt(&bob, "other").await;
    assert_vault_denied(st, &body);
    // A JWT role with no policies: default deny.
    let (st, body) = f.encrypt(&f.jwt("nothing"), "other").await;
    assert_vault_denied(st, &body);
    // A list grant lists, and buys nothing else.
    let lister = f.jwt("lister");
    let resp = s
        .client()
        .request(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            s.url("/v1/transit/keys"),
        )
        .header("X-Vault-Token", &lister)
        .send()
        .await
        .unwrap();
    let (st, body) = into_parts(resp).await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"]["keys"]
        .as_array()
        .unwrap()
        .contains(&json!("billing")));
    let (st, body) = s
        .get(
            &s.client(),
            "/v1/transit/keys/billing?list=true",
            Some(&lister),
        )
        .await;
    assert_vault_denied(st, &body);
    let (st, body) = f.encrypt(&lister, "billing").await;
    assert_vault_denied(st, &body);
    // Token housekeeping is not a Transit path: still open to any token,
    // and it shows the policies the ACL phase uses.
    let (st, body) = s
        .get(&s.client(), "/v1/auth/token/lookup-self", Some(&bob))
        .await;
    assert_eq!(st, 200);
    assert_eq!(body["data"]["policies"], json!(["crypto-user"]));
    let (st, body) = s
        .get(&s.client(), "/v1/auth/token/lookup-self", Some(&alice))
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        body["data"]["policies"],
        json!(["crypto-user", "billing-keys"])
    );
    let reasons: Vec<Value> = f
        .audit_records()
        .into_iter()
        .filter(|r| r["outcome"] == "denied")
        .map(|r| r["detail"]["acl_reason"].clone())
        .collect();
    assert!(reasons.contains(&json!("no_policies")), "{reasons:?}");
    assert!(
        reasons.contains(&json!("capability_not_granted")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn without_policies_transit_is_not_path_restricted() {
    let s = TestServer::start(Opts::default());
    let (_, app) = s.init_with_app_user().await;
    for key in ["a", "b"] {
        let path = format!("/v1/transit/keys/{key}");
        assert_eq!(
            s.post(&s.client(), &path, Some(&app), json!({})).await.0,
            200
        );
        let path = format!("/v1/transit/encrypt/{key}");
        let (st, body) = s
            .post(
                &s.client(),
                &path,
                Some(&app),
                json!({"plaintext": b64(b"x")}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let check = |config: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["check", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = check(&s.config_path);
    assert!(out.contains("access policies: none declared"), "{out}");
    std::fs::write(
        s.dir.path().join("policies/acl.toml"),
        "[[policy]]\nname = \"p\"\n[[policy.path]]\npath = \"transit/encrypt/a\"\ncapabilities = [\"update\"]\n",
    )
    .unwrap();
    let out = check(&s.config_path);
    assert!(
        out.contains("access policies: enforced on Transit (1 policies, 0 user bindings"),
        "{out}"
    );
}
