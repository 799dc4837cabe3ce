//! The one place errors become HTTP responses, by type.
//!
//! Vault's shapes: `{"errors": [...]}` with 400/403/404/405/413/429/503.
//! 5xx bodies are generic; their detail goes to the log. Every login
//! failure produces the same 401 body whatever the cause.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

use crate::engine::{EngineError, EngineState};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("permission denied")]
    PermissionDenied,
    /// An access policy refused the request (`crate::acl`): Vault's exact
    /// body for a policy denial, a Go multierror.
    #[error("1 error occurred:\n\t* permission denied\n\n")]
    AclDenied,
    #[error("invalid username or password")]
    LoginFailed,
    /// A JWT login failed; the same body whatever the reason (the reason is
    /// logged by `crate::auth`'s caller).
    #[error("authentication failed")]
    AuthenticationFailed,
    /// Over a rate limit: 429 with `Retry-After` and `RateLimit-*` headers.
    #[error("rate limit quota exceeded ({}); retry after {} s", .0.scope, .0.retry_after_secs)]
    RateLimited(crate::ratelimit::Limited),
    /// The login guard refused a front-door officer login (423 Locked).
    #[error("{0}")]
    GuardRefused(String),
    #[error("no handler for route")]
    NotFound,
    /// Vault answers a missing object with 404 and an empty error list.
    #[error("not found")]
    ObjectNotFound,
    #[error("unsupported operation")]
    MethodNotAllowed,
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    #[error("the engine is {}", .0.as_str())]
    Unavailable(EngineState),
    /// The data dir cannot be written (disk full, read-only, I/O error):
    /// 503, nothing changed, detail in the log.
    #[error(
        "the engine's store cannot be written (disk full, read-only data dir or I/O error); \
         nothing was changed; keys already loaded keep serving; see the server log"
    )]
    StorageUnavailable(String),
    #[error("internal error")]
    Internal(String),
    /// A cluster member could not commit a write now (no leader, no
    /// quorum, or a concurrent write on another member): 503. The message
    /// says whether the write is known not to have happened.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// A gateway (`[upstream]`) found no engine node to answer: 503. The
    /// message says whether anything was sent.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// A gateway sent a write to a node that never answered: 502, and the
    /// write may have taken effect (the message says so).
    #[error("{0}")]
    UpstreamLost(String),
    /// The audit log cannot be written: admin requests and logins are
    /// refused before they act (503), so none goes unaudited.
    #[error("the audit log cannot be written; admin requests are refused until it recovers")]
    AuditUnavailable,
    /// The request ran but its audit record could not be written (500).
    #[error(
        "the audit record of this request could not be written; the action may have taken \
         effect — check the server log before retrying"
    )]
    AuditFailed,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotActive(state) => ApiError::Unavailable(state),
            EngineError::AlreadyInitialized => {
                ApiError::BadRequest("the engine is already initialized".into())
            }
            EngineError::InvalidInitToken => ApiError::PermissionDenied,
            EngineError::InvalidCredentials => ApiError::LoginFailed,
            e @ EngineError::GuardRefused { .. } => ApiError::GuardRefused(e.to_string()),
            EngineError::PermissionDenied => ApiError::PermissionDenied,
            EngineError::KeyNotFound(_) | EngineError::UserNotFound(_) => ApiError::ObjectNotFound,
            e @ (EngineError::UserExists(_)
            | EngineError::KeyTypeMismatch(_)
            | EngineError::DeletionNotAllowed(_)
            | EngineError::InvalidRequest(_)
            | EngineError::UnsealFailed(_)
            | EngineError::Crypto(_)) => ApiError::BadRequest(e.to_string()),
            EngineError::Storage(e) if e.is_io() => ApiError::StorageUnavailable(e.to_string()),
            e @ (EngineError::Conflict(_) | EngineError::Cluster(_)) => {
                ApiError::ClusterUnavailable(e.to_string())
            }
            e @ (EngineError::Storage(_) | EngineError::Internal(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PermissionDenied | ApiError::AclDenied => StatusCode::FORBIDDEN,
            ApiError::LoginFailed | ApiError::AuthenticationFailed => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::GuardRefused(_) => StatusCode::LOCKED,
            ApiError::NotFound | ApiError::ObjectNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_)
            | ApiError::StorageUnavailable(_)
            | ApiError::ClusterUnavailable(_)
            | ApiError::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UpstreamLost(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) | ApiError::AuditFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The messages the caller sees. Internal detail never leaves the server.
    fn messages(&self) -> Vec<String> {
        match self {
            ApiError::ObjectNotFound => Vec::new(),
            ApiError::Internal(_) => vec!["internal error; see the server log".into()],
            other => vec![other.to_string()],
        }
    }
}

/// Turns an error into its response, logging what the caller must not see.
pub fn respond(err: &ApiError, request_id: &str) -> Response<Full<Bytes>> {
    if let ApiError::Internal(detail) = err {
        tracing::error!(request_id, detail = %detail, "internal error");
    }
    if let ApiError::StorageUnavailable(detail) = err {
        tracing::error!(request_id, detail = %detail, "store write failed");
    }
    let mut resp = json_response(
        err.status(),
        &serde_json::json!({ "errors": err.messages() }),
    );
    if let ApiError::RateLimited(limited) = err {
        let h = resp.headers_mut();
        let secs = header::HeaderValue::from(limited.retry_after_secs);
        h.insert(header::RETRY_AFTER, secs.clone());
        h.insert("ratelimit-limit", header::HeaderValue::from(limited.limit));
        h.insert("ratelimit-remaining", header::HeaderValue::from(0u32));
        h.insert("ratelimit-reset", secs);
    }
    resp
}

pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // Callers pass JSON values and plain structs of them: serializing
    // those cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

pub fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_io_failure_is_503_with_a_clear_message_and_no_path() {
        use crate::engine::store::StoreError;
        let io = EngineError::Storage(StoreError::Io {
            path: "/var/lib/hsmgate/secret-dir/store.redb".into(),
            source: std::io::Error::from_raw_os_error(28), // ENOSPC
        });
        let resp = respond(&ApiError::from(io), "r");
        assert_eq!(resp.status(), 503);
        let body = format!("{:?}", resp.body());
        assert!(body.contains("cannot be written"), "{body}");
        assert!(!body.contains("secret-dir"), "{body}");
        let after = EngineError::Storage(StoreError::Database(redb::Error::PreviousIo));
        assert_eq!(ApiError::from(after).status(), 503);
        // Other storage failures (a record that does not open) stay 500.
        let corrupt = EngineError::Storage(StoreError::Unseal {
            table: "keys",
            name: "k".into(),
        });
        assert_eq!(ApiError::from(corrupt).status(), 500);
    }

    #[test]
    fn internal_detail_never_reaches_the_body() {
        let resp = respond(
            &ApiError::Internal("disk /secret/path exploded".into()),
            "r",
        );
        assert_eq!(resp.status(), 500);
        let body = format!("{:?}", resp.body());
        assert!(!body.contains("secret/path"));
    }

    #[test]
    fn rate_limited_is_429_with_retry_after_and_ratelimit_headers() {
        let resp = respond(
            &ApiError::RateLimited(crate::ratelimit::Limited {
                scope: "source",
                limit: 10,
                retry_after_secs: 3,
            }),
            "r",
        );
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert_eq!(resp.headers()["ratelimit-limit"], "10");
        assert_eq!(resp.headers()["ratelimit-remaining"], "0");
        assert_eq!(resp.headers()["ratelimit-reset"], "3");
    }

    #[test]
    fn acl_denials_carry_vaults_body() {
        let resp = respond(&ApiError::AclDenied, "r");
        assert_eq!(resp.status(), 403);
        assert_eq!(
            ApiError::AclDenied.messages(),
            vec!["1 error occurred:\n\t* permission denied\n\n".to_string()]
        );
    }

    #[test]
    fn every_login_failure_looks_the_same() {
        let a = ApiError::from(EngineError::InvalidCredentials);
        assert_eq!(a.status(), 401);
        assert_eq!(
            a.messages(),
            vec!["invalid username or password".to_string()]
        );
    }
}
