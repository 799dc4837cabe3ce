//! Vault's auth routes: `POST /v1/auth/jwt/login` (an app JWT for a session
//! token) and token revocation (`POST /v1/hsm/logout`, Vault's
//! `POST /v1/auth/token/revoke-self`). The decisions live in
//! [`crate::auth`]; this is their HTTP shape.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::Call;
use crate::gateway::rescue::{self, ApiError};

/// Whether this module serves `path`.
pub fn owns(path: &str) -> bool {
    matches!(
        path,
        "/v1/auth/jwt/login" | "/v1/hsm/logout" | "/v1/auth/token/revoke-self"
    )
}

pub async fn handle(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    match call.path {
        "/v1/auth/jwt/login" => jwt_login(call),
        _ => logout(call),
    }
}

#[derive(Deserialize)]
struct JwtLoginBody {
    /// Vault's `role`; optional here: the first role binding the claims.
    #[serde(default)]
    role: Option<String>,
    jwt: String,
}

/// Vault's shape: `{"role": "...", "jwt": "..."}` → `auth.client_token`.
/// Every failure is the same 401; the reason goes to the log.
fn jwt_login(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: JwtLoginBody = call.json()?;
    let identity = match call.jwt.verify(&body.jwt, body.role.as_deref()) {
        Ok(identity) => identity,
        Err(reason) => {
            tracing::info!(
                target: "hsmgate::auth",
                request_id = call.request_id,
                peer = %call.conn.peer,
                %reason,
                "JWT login refused"
            );
            return Err(ApiError::AuthenticationFailed);
        }
    };
    let principal = identity.principal();
    call.limiters
        .check_principal(&principal.username)
        .map_err(ApiError::RateLimited)?;
    let token = call.engine().open_app_session(principal.clone())?;
    let ttl = principal
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .min(call.engine().session_ttl().as_secs());
    let auth = json!({
        "client_token": token.expose_secret(),
        "accessor": "",
        "policies": principal.policies(),
        "token_policies": principal.policies(),
        "metadata": { "role": identity.role, "issuer": identity.issuer, "user": identity.user },
        "lease_duration": ttl,
        "renewable": false,
        "token_type": "service",
        "orphan": true,
    });
    Ok(call.respond(StatusCode::OK, &serde_json::Value::Null, Some(&auth)))
}

/// Revokes the caller's session token (204). A JWT has nothing to revoke
/// here: it ends at its `exp`.
fn logout(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    call.principal()?;
    if let Some(token) = call.token() {
        call.engine().revoke_session(token);
    }
    Ok(rescue::empty_response(StatusCode::NO_CONTENT))
}
