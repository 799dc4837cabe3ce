//! Bad input of every kind gets a clear 4xx `{"errors": [...]}`, changes
//! nothing, and the server keeps serving.
mod common;

use common::*;
use serde_json::{json, Value};

fn has_errors(body: &Value) -> bool {
    body["errors"].is_array()
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let s = TestServer::start(Opts {
        max_body_bytes: 4096,
        ..Opts::default()
    });
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let post = |path: &'static str, body: Value| {
        let (s, c, app) = (&s, &c, &app);
        async move { s.post(c, path, Some(app), body).await }
    };
    assert_eq!(post("/v1/transit/keys/aes", json!({})).await.0, 200);
    assert_eq!(
        post("/v1/transit/keys/ed", json!({"type": "ed25519"}))
            .await
            .0,
        200
    );
    let (_, enc) = post(
        "/v1/transit/encrypt/aes",
        json!({"plaintext": b64(b"original")}),
    )
    .await;
    let ciphertext = enc["data"]["ciphertext"].as_str().unwrap().to_string();

    // Malformed JSON, and JSON that is not an object.
    for raw in [
        "{\"plaintext\": ",
        "[1,2,3]",
        "\"text\"",
        "{\"plaintext\": 5}",
    ] {
        let resp = c
            .post(s.url("/v1/transit/encrypt/aes"))
            .header("X-Vault-Token", &app)
            .body(raw)
            .send()
            .await
            .unwrap();
        let (st, body) = into_parts(resp).await;
        assert_eq!(st, 400, "{raw}: {body}");
        assert!(has_errors(&body), "{body}");
    }

    let cases: Vec<(&str, Value, u16)> = vec![
        // Unknown key.
        (
            "/v1/transit/encrypt/nope",
            json!({"plaintext": b64(b"x")}),
            404,
        ),
        (
            "/v1/transit/decrypt/nope",
            json!({"ciphertext": ciphertext}),
            404,
        ),
        // Wrong key type for the operation.
        (
            "/v1/transit/encrypt/ed",
            json!({"plaintext": b64(b"x")}),
            400,
        ),
        (
            "/v1/transit/decrypt/ed",
            json!({"ciphertext": ciphertext}),
            400,
        ),
        ("/v1/transit/sign/aes", json!({"input": b64(b"x")}), 400),
        (
            "/v1/transit/verify/aes",
            json!({"input": b64(b"x"), "signature": "vault:v1:AAAA"}),
            400,
        ),
        // Invalid base64 and invalid ciphertexts.
        (
            "/v1/transit/encrypt/aes",
            json!({"plaintext": "not base64!!"}),
            400,
        ),
        (
            "/v1/transit/decrypt/aes",
            json!({"ciphertext": "vault:v1:!!!"}),
            400,
        ),
        (
            "/v1/transit/decrypt/aes",
            json!({"ciphertext": "garbage"}),
            400,
        ),
        (
            "/v1/transit/decrypt/aes",
            json!({"ciphertext": "vault:v9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
            400,
        ),
        (
            "/v1/transit/decrypt/aes",
            json!({"ciphertext": "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
            400,
        ),
        ("/v1/transit/decrypt/aes", json!({}), 400),
        // Unknown types, bad names, unsupported options.
        ("/v1/transit/keys/new", json!({"type": "rot13"}), 400),
        ("/v1/transit/keys/.hidden", json!({}), 400),
        ("/v1/transit/keys/ed", json!({"type": "aes256-gcm96"}), 400),
        (
            "/v1/transit/keys/aes/config",
            json!({"min_decryption_version": 7}),
            400,
        ),
        (
            "/v1/transit/sign/ed",
            json!({"input": b64(b"x"), "marshaling_algorithm": "morse"}),
            400,
        ),
        (
            "/v1/transit/hmac/aes",
            json!({"input": b64(b"x"), "algorithm": "md5"}),
            400,
        ),
        ("/v1/transit/random", json!({"bytes": 10_000_000}), 400),
        ("/v1/transit/random", json!({"format": "base32"}), 400),
        ("/v1/transit/encrypt/aes", json!({"batch_input": []}), 400),
        ("/v1/transit/encrypt/aes", json!({"batch_input": "x"}), 400),
    ];
    for (path, body, want) in cases {
        let (st, resp) = post(path, body.clone()).await;
        assert_eq!(st, want, "{path} {body}: {resp}");
        assert!(has_errors(&resp), "{path}: {resp}");
    }

    // Deleting without deletion_allowed.
    let (st, body) = {
        let r = c
            .delete(s.url("/v1/transit/keys/aes"))
            .header("X-Vault-Token", &app)
            .send()
            .await
            .unwrap();
        into_parts(r).await
    };
    assert_eq!(st, 400, "{body}");

    // Oversized body: 413 whether or not the length is declared up front.
    let big = "A".repeat(8192);
    let (st, body) = post("/v1/transit/encrypt/aes", json!({"plaintext": big})).await;
    assert_eq!(st, 413, "{body}");
    let stream = futures_stream(big.into_bytes());
    let resp = c
        .post(s.url("/v1/transit/encrypt/aes"))
        .header("X-Vault-Token", &app)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Wrong method, unknown path.
    let r = c
        .get(s.url("/v1/transit/encrypt/aes"))
        .header("X-Vault-Token", &app)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = c.get(s.url("/v1/nothing/here")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Nothing changed, and the server still serves.
    let (st, body) = post("/v1/transit/decrypt/aes", json!({"ciphertext": ciphertext})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["plaintext"], b64(b"original"));
    let (_, key) = s.get(&c, "/v1/transit/keys/aes", Some(&app)).await;
    assert_eq!(key["data"]["latest_version"], 1);
    assert_eq!(key["data"]["min_decryption_version"], 1);
    assert_eq!(key["data"]["type"], "aes256-gcm96");
    let (_, ed) = s.get(&c, "/v1/transit/keys/ed", Some(&app)).await;
    assert_eq!(ed["data"]["type"], "ed25519");
}

#[tokio::test]
async fn a_batch_with_a_bad_item_reports_it_per_item() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    assert_eq!(
        s.post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
            .await
            .0,
        200
    );
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": null, "batch_input": [
                {"plaintext": b64(b"one"), "reference": "a"},
                {"plaintext": "%%%", "reference": "b"},
            ]}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let results = body["data"]["batch_results"].as_array().unwrap();
    assert!(results[0]["ciphertext"]
        .as_str()
        .unwrap()
        .starts_with("vault:v1:"));
    assert_eq!(results[0]["reference"], "a");
    assert!(results[1]["error"].as_str().unwrap().contains("base64"));
    assert_eq!(results[1]["reference"], "b");
}

fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    // Chunks without a Content-Length: the limit must hold while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(1024).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(chunks)
}
