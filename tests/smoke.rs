mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn smoke() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, b) = s.post(&c, "/v1/transit/keys/k1", Some(&app), json!({})).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.post(&c, "/v1/transit/encrypt/k1", Some(&app), json!({"plaintext": b64(b"hello")})).await;
    assert_eq!(st, 200, "{b}");
    println!("{b}");
}
