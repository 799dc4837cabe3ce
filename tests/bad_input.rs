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

/// Everything the server sent on `stream` until it closed the connection or
/// was quiet for 2 s.
async fn read_all<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(Ok(n @ 1..)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf)).await
    {
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// `bytes` over a fresh TLS connection from the trusted address: what came back.
async fn raw_tls(s: &TestServer, bytes: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut tls = s
        .tls_connect(s.addr, "127.0.0.1".parse().unwrap(), b"")
        .await
        .expect("TLS handshake");
    // The server may answer and close before it has read everything.
    let _ = tls.write_all(bytes).await;
    String::from_utf8_lossy(&read_all(&mut tls).await).into_owned()
}

/// `bytes` over plain TCP to the TLS port: what came back (a TLS alert at
/// most) and whether the server closed the connection.
async fn raw_tcp(s: &TestServer, bytes: &[u8]) -> (Vec<u8>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let got = read_all(&mut tcp).await;
    let mut one = [0u8; 1];
    let closed = matches!(
        tokio::time::timeout(std::time::Duration::from_secs(15), tcp.read(&mut one)).await,
        Ok(Ok(0) | Err(_))
    );
    (got, closed)
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

/// Transport- and framing-level bad input: TLS garbage, a truncated
/// ClientHello, request smuggling (Content-Length with Transfer-Encoding,
/// two Content-Lengths), huge headers, invalid UTF-8 in the body and the
/// path, deeply nested JSON. Each gets a 4xx or a closed connection, never
/// a smuggled second request, and nothing changes.
#[tokio::test]
async fn malformed_transport_and_smuggling_attempts_are_refused_and_change_nothing() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    assert_eq!(
        s.post(&c, "/v1/transit/keys/aes", Some(&app), json!({}))
            .await
            .0,
        200
    );

    // TLS garbage and plain HTTP on the TLS port: no HTTP answer, closed.
    for junk in [
        vec![0xab; 4096],
        b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // A ClientHello record header announcing 512 bytes, then 5 of them,
        // then the client hangs up.
        vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03],
    ] {
        let (got, closed) = raw_tcp(&s, &junk).await;
        assert!(
            !String::from_utf8_lossy(&got).contains("HTTP/"),
            "an HTTP answer to TLS garbage"
        );
        // The truncated hello is closed by the handshake timeout or when we
        // drop it; the others at once.
        if junk[0] != 0x16 {
            assert!(closed, "the server kept a garbage connection open");
        }
    }

    // CL + TE: a second request hidden after the chunked terminator.
    let smuggled = format!(
        "POST /v1/transit/keys/smuggled HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {app}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let body = format!("0\r\n\r\n{smuggled}");
    let resp = raw_tls(
        &s,
        format!(
            "POST /v1/transit/encrypt/aes HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {app}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(
        status_line(&resp).starts_with("HTTP/1.1 400"),
        "CL+TE: {resp}"
    );
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "CL+TE: {resp}");

    // Two different Content-Lengths, the shorter one hiding a request.
    let resp = raw_tls(
        &s,
        format!(
            "POST /v1/transit/encrypt/aes HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {app}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: {}\r\n\r\n{{}}{smuggled}",
            smuggled.len() + 2
        )
        .as_bytes(),
    )
    .await;
    assert!(
        status_line(&resp).starts_with("HTTP/1.1 400"),
        "duplicate Content-Length: {resp}"
    );
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");

    // A 64 KiB header (the limit is 16 KiB).
    let resp = raw_tls(
        &s,
        format!(
            "GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(65536)
        )
        .as_bytes(),
    )
    .await;
    assert!(
        resp.is_empty() || status_line(&resp).starts_with("HTTP/1.1 431"),
        "huge header: {resp}"
    );

    // Invalid UTF-8 in the path.
    let mut req =
        b"POST /v1/transit/encrypt/a\xff\xfe HTTP/1.1\r\nHost: x\r\nX-Vault-Token: ".to_vec();
    req.extend_from_slice(app.as_bytes());
    req.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
    let resp = String::from_utf8_lossy(&{
        use tokio::io::AsyncWriteExt;
        let mut tls = s
            .tls_connect(s.addr, "127.0.0.1".parse().unwrap(), b"")
            .await
            .unwrap();
        let _ = tls.write_all(&req).await;
        read_all(&mut tls).await
    })
    .into_owned();
    let status = status_line(&resp);
    assert!(
        resp.is_empty() || status.starts_with("HTTP/1.1 400") || status.starts_with("HTTP/1.1 404"),
        "invalid UTF-8 path: {resp}"
    );

    // Invalid UTF-8 inside a JSON string, and JSON nested 100,000 deep.
    for body in [
        b"{\"plaintext\": \"\xff\xfe\"}".to_vec(),
        "[".repeat(100_000).into_bytes(),
        format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)).into_bytes(),
    ] {
        let r = c
            .post(s.url("/v1/transit/encrypt/aes"))
            .header("X-Vault-Token", &app)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let b: Value = r.json().await.unwrap();
        assert!(has_errors(&b), "{b}");
    }

    // Nothing changed, and the server still serves.
    let (st, _) = s.get(&c, "/v1/transit/keys/smuggled", Some(&app)).await;
    assert_eq!(st, 404, "a smuggled request created a key");
    let (st, keys) = s.get(&c, "/v1/transit/keys?list=true", Some(&app)).await;
    assert_eq!(st, 200, "{keys}");
    assert_eq!(keys["data"]["keys"], json!(["aes"]));
    let (_, key) = s.get(&c, "/v1/transit/keys/aes", Some(&app)).await;
    assert_eq!(key["data"]["latest_version"], 1);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/aes",
            Some(&app),
            json!({"plaintext": "aGVsbG8="}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}
