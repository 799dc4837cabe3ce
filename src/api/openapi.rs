//! `GET /v1/hsm/openapi.json`: the OpenAPI 3.1 document of this API, and
//! [`ROUTES`], the one list of every (method, path) the router serves.
//!
//! The document is `openapi/hsmgate.json`, compiled in, so the served
//! document is the repository's. It is health-class (any peer admitted to
//! the listener, no token): it describes the API and holds no secrets, and a
//! client must be able to read it before it has credentials.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Response};

use super::Call;
use crate::gateway::rescue::ApiError;

/// The path this module serves.
pub const PATH: &str = "/v1/hsm/openapi.json";

/// The document, as kept in the repository.
pub const DOCUMENT: &str = include_str!("../../openapi/hsmgate.json");

/// Every route the router dispatches, as (method, OpenAPI path template).
/// Kept next to the handlers so a new route is added here and in the
/// document together: the tests in this module and tests/openapi.rs hold
/// the three (this table, the document, the live router) in step.
///
/// Vault's twins are not listed separately: `PUT` wherever Transit takes
/// `POST`, `LIST /v1/transit/keys` for `GET ?list=true`, `HEAD` for
/// `sys/health`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/transit/keys"),
    ("POST", "/v1/transit/keys/{name}"),
    ("GET", "/v1/transit/keys/{name}"),
    ("DELETE", "/v1/transit/keys/{name}"),
    ("POST", "/v1/transit/keys/{name}/config"),
    ("POST", "/v1/transit/keys/{name}/rotate"),
    ("POST", "/v1/transit/keys/{name}/trim"),
    ("POST", "/v1/transit/encrypt/{name}"),
    ("POST", "/v1/transit/decrypt/{name}"),
    ("POST", "/v1/transit/rewrap/{name}"),
    ("POST", "/v1/transit/datakey/{plaintext_or_wrapped}/{name}"),
    ("POST", "/v1/transit/hash"),
    ("POST", "/v1/transit/hash/{algorithm}"),
    ("GET", "/v1/transit/export/{key_type}/{name}"),
    ("GET", "/v1/transit/export/{key_type}/{name}/{version}"),
    ("POST", "/v1/transit/sign/{name}"),
    ("POST", "/v1/transit/sign/{name}/{algorithm}"),
    ("POST", "/v1/transit/verify/{name}"),
    ("POST", "/v1/transit/verify/{name}/{algorithm}"),
    ("POST", "/v1/transit/hmac/{name}"),
    ("POST", "/v1/transit/hmac/{name}/{algorithm}"),
    ("POST", "/v1/transit/random"),
    ("POST", "/v1/transit/random/{bytes_or_format}"),
    ("POST", "/v1/transit/random/{source}/{bytes}"),
    ("POST", "/v1/hsm/init"),
    ("POST", "/v1/hsm/login"),
    ("POST", "/v1/hsm/logout"),
    ("GET", "/v1/hsm/status"),
    ("POST", "/v1/hsm/users"),
    ("POST", "/v1/hsm/users/{username}/password"),
    ("POST", "/v1/hsm/zeroize"),
    ("POST", "/v1/hsm/unseal"),
    ("POST", "/v1/hsm/seal"),
    ("POST", "/v1/hsm/rotate-master-key"),
    ("POST", "/v1/hsm/backup"),
    ("POST", "/v1/hsm/restore"),
    ("GET", PATH),
    ("POST", "/v1/auth/jwt/login"),
    ("GET", "/v1/auth/token/lookup-self"),
    ("POST", "/v1/auth/token/revoke-self"),
    ("GET", "/v1/sys/health"),
    ("GET", "/v1/sys/seal-status"),
    ("PUT", "/v1/sys/unseal"),
    ("POST", "/v1/sys/unseal"),
    ("GET", "/v1/sys/metrics"),
];

pub fn handle(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::GET && call.method != Method::HEAD {
        return Err(ApiError::MethodNotAllowed);
    }
    let mut r = Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::gateway::router::{classify, RouteClass};

    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(DOCUMENT).expect("openapi/hsmgate.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("the document has paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            for method in item.as_object().expect("a path item is an object").keys() {
                if method != "parameters" {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let table: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(table.len(), ROUTES.len(), "ROUTES lists a route twice");
        let doc = documented();
        let missing: Vec<_> = table.difference(&doc).collect();
        let extra: Vec<_> = doc.difference(&table).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi/hsmgate.json: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "documented routes the router does not serve: {extra:?}"
        );
    }

    /// Each template, filled in, reaches a class; the document's
    /// `x-hsmgate-route-class` says which.
    #[test]
    fn every_route_classifies_as_documented() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("JSON");
        for (method, template) in ROUTES {
            let path = template
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let class = classify(&path);
            assert_ne!(class, RouteClass::Unknown, "{method} {template}");
            let documented = doc["paths"][template][method.to_lowercase()]["x-hsmgate-route-class"]
                .as_str()
                .unwrap_or_default();
            assert_eq!(
                format!("{class:?}").to_lowercase(),
                documented,
                "{method} {template}"
            );
        }
    }

    #[test]
    fn the_document_is_health_class() {
        assert_eq!(classify(PATH), RouteClass::Health);
    }
}
