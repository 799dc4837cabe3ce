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
    ("POST", "/v1/transit/keys/{name}/import"),
    ("POST", "/v1/transit/keys/{name}/import_version"),
    ("POST", "/v1/transit/keys/{name}/wrap"),
    ("POST", "/v1/transit/keys/{name}/unwrap"),
    ("GET", "/v1/transit/wrapping_key"),
    ("POST", "/v1/transit/encrypt/{name}"),
    ("POST", "/v1/transit/decrypt/{name}"),
    ("POST", "/v1/transit/rewrap/{name}"),
    ("POST", "/v1/transit/datakey/{plaintext_or_wrapped}/{name}"),
    ("POST", "/v1/transit/hash"),
    ("POST", "/v1/transit/hash/{algorithm}"),
    ("GET", "/v1/transit/export/{key_type}/{name}"),
    ("GET", "/v1/transit/export/{key_type}/{name}/{version}"),
    ("GET", "/v1/transit/backup/{name}"),
    ("POST", "/v1/transit/restore"),
    ("POST", "/v1/transit/restore/{name}"),
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
    ("GET", "/v1/hsm/users"),
    ("DELETE", "/v1/hsm/users/{username}"),
    ("POST", "/v1/hsm/users/{username}/password"),
    ("POST", "/v1/hsm/password"),
    ("POST", "/v1/hsm/zeroize"),
    ("POST", "/v1/hsm/unseal"),
    ("POST", "/v1/hsm/seal"),
    ("POST", "/v1/hsm/rotate-master-key"),
    ("POST", "/v1/hsm/rekey"),
    ("POST", "/v1/hsm/rekey/verify"),
    ("POST", "/v1/hsm/backup"),
    ("POST", "/v1/hsm/restore"),
    ("GET", "/v1/hsm/cluster"),
    ("POST", "/v1/hsm/cluster/nodes"),
    ("DELETE", "/v1/hsm/cluster/nodes/{node_id}"),
    ("POST", "/v1/hsm/cluster/rotate-key"),
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

/// What [`lookup`] found for a request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A listed route (or one of its Vault twins): dispatch it.
    Route(&'static (&'static str, &'static str)),
    /// The path is listed, but not with this method (405).
    WrongMethod,
    /// No listed route has this path (404).
    Missing,
}

/// Finds the [`ROUTES`] entry a request is for. The router looks the
/// request up here before it dispatches anything and answers 404/405 for
/// what is not listed, so a handler arm missing from the table can never be
/// reached: the table (and with it the document) cannot fall behind what
/// the server serves.
///
/// A `{param}` segment matches one non-empty segment. Vault's twins are
/// folded onto the listed method first: `PUT` → `POST` under
/// `/v1/transit/`, `LIST` → `GET` (and `LIST /v1/transit/keys/` with
/// hvac's trailing slash), `HEAD` → `GET`.
pub fn lookup(method: &str, path: &str) -> Lookup {
    let (method, path) = match method {
        "PUT" if path.starts_with("/v1/transit/") => ("POST", path),
        "LIST" | "GET" if path == "/v1/transit/keys/" => ("GET", "/v1/transit/keys"),
        "LIST" | "HEAD" => ("GET", path),
        m => (m, path),
    };
    // Split once; no template has more than MAX_SEGMENTS segments, so a
    // longer path matches none (and is not "listed" under another method).
    let mut segments = [""; MAX_SEGMENTS];
    let mut count = 0;
    for segment in path.split('/') {
        if count == MAX_SEGMENTS {
            return Lookup::Missing;
        }
        segments[count] = segment;
        count += 1;
    }
    let segments = &segments[..count];
    let mut path_listed = false;
    for (route, template) in COMPILED.iter() {
        if template.len() == segments.len()
            && template.iter().zip(segments).all(|(t, p)| match t {
                Segment::Literal(l) => l == p,
                Segment::Param => !p.is_empty(),
            })
        {
            if route.0 == method {
                return Lookup::Route(route);
            }
            path_listed = true;
        }
    }
    if path_listed {
        Lookup::WrongMethod
    } else {
        Lookup::Missing
    }
}

/// Most `/`-separated segments in any template (with the empty one before
/// the leading slash); checked by a test.
const MAX_SEGMENTS: usize = 8;

/// A `ROUTES` entry: method and path template.
type Route = (&'static str, &'static str);

/// One segment of a route template: literal text, or a `{param}` matching
/// one non-empty segment.
enum Segment {
    Literal(&'static str),
    Param,
}

/// `ROUTES` split once, at first use: the router matches every request
/// against it (a linear scan splitting each template was 2% of the server's
/// CPU under load, docs/BENCHMARKS.md).
static COMPILED: std::sync::LazyLock<Vec<(&'static Route, Vec<Segment>)>> =
    std::sync::LazyLock::new(|| {
        ROUTES
            .iter()
            .map(|route| {
                let segments = route
                    .1
                    .split('/')
                    .map(|t| {
                        if t.starts_with('{') && t.ends_with('}') {
                            Segment::Param
                        } else {
                            Segment::Literal(t)
                        }
                    })
                    .collect();
                (route, segments)
            })
            .collect()
    });

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
    fn no_template_is_longer_than_the_lookup_splits() {
        for (_, path) in ROUTES {
            assert!(path.split('/').count() <= MAX_SEGMENTS, "{path}");
        }
        assert_eq!(lookup("GET", "/v1/a/b/c/d/e/f/g/h/i"), Lookup::Missing);
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
    fn lookup_finds_listed_routes_and_their_twins_only() {
        let found = |m: &str, p: &str| match lookup(m, p) {
            Lookup::Route(r) => Some(*r),
            _ => None,
        };
        assert_eq!(
            found("POST", "/v1/transit/encrypt/k1"),
            Some(("POST", "/v1/transit/encrypt/{name}"))
        );
        assert_eq!(
            found("PUT", "/v1/transit/encrypt/k1"),
            Some(("POST", "/v1/transit/encrypt/{name}"))
        );
        assert_eq!(
            found("LIST", "/v1/transit/keys"),
            Some(("GET", "/v1/transit/keys"))
        );
        assert_eq!(
            found("LIST", "/v1/transit/keys/"),
            Some(("GET", "/v1/transit/keys"))
        );
        assert_eq!(
            found("HEAD", "/v1/sys/health"),
            Some(("GET", "/v1/sys/health"))
        );
        assert_eq!(
            found("GET", "/v1/transit/export/encryption-key/k/2"),
            Some(("GET", "/v1/transit/export/{key_type}/{name}/{version}"))
        );
        // Not listed: refused before any handler runs.
        assert_eq!(lookup("GET", "/v1/transit/encrypt/k1"), Lookup::WrongMethod);
        assert_eq!(lookup("PUT", "/v1/hsm/init"), Lookup::WrongMethod);
        assert_eq!(lookup("POST", "/v1/transit/encrypt/"), Lookup::Missing);
        assert_eq!(lookup("POST", "/v1/transit/encrypt"), Lookup::Missing);
        assert_eq!(lookup("POST", "/v1/transit/encrypt/k/x"), Lookup::Missing);
        assert_eq!(lookup("POST", "/v1/transit/frobnicate/k"), Lookup::Missing);
        assert_eq!(lookup("POST", "/v1/hsm/login/"), Lookup::Missing);
        assert_eq!(lookup("PATCH", "/v1/hsm/users"), Lookup::WrongMethod);
        assert_eq!(lookup("GET", "/"), Lookup::Missing);
    }

    /// Every listed route, filled in, is found by the router's lookup.
    #[test]
    fn every_route_is_found_by_lookup() {
        for route in ROUTES {
            let path = route
                .1
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            assert_eq!(lookup(route.0, &path), Lookup::Route(route), "{route:?}");
        }
    }

    #[test]
    fn the_document_is_health_class() {
        assert_eq!(classify(PATH), RouteClass::Health);
    }
}
