//! The live server serves the repository's OpenAPI document, without a
//! token, and every route in `hsmgate::api::openapi::ROUTES` reaches a
//! handler on the real router (no 404 for an unknown path, no 405).
mod common;

use common::{Opts, TestServer};
use hsmgate::api::openapi::{DOCUMENT, ROUTES};

#[tokio::test]
async fn served_document_is_the_repository_file() {
    let server = TestServer::start(Opts::default());
    let resp = server
        .client()
        .get(server.url("/v1/hsm/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/hsmgate.json"))
            .unwrap();
    assert_eq!(body, on_disk);
    assert_eq!(body, DOCUMENT);
}

#[tokio::test]
async fn every_listed_route_reaches_a_handler() {
    let server = TestServer::start(Opts::default());
    let client = server.client();
    for (method, template) in ROUTES {
        let mut path: String = template
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        if *template == "/v1/transit/keys" {
            path.push_str("?list=true");
        }
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = client
            .request(method.clone(), server.url(&path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(
            status != 404 && status != 405,
            "{method} {path}: {status} (the router does not serve a listed route)"
        );
    }
}
