//! `sys/health` and `auth/token/lookup-self`, in Vault's shapes.
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use super::{rfc3339, Call};
use crate::engine::EngineState;
use crate::gateway::rescue::{self, ApiError};

/// Vault's codes: 200 active, 501 uninitialized, 503 sealed (sealed mode
/// before unseal, or zeroized).
/// `?uninitcode=`, `?sealedcode=` and `?activecode=` override them, as in Vault.
pub fn health(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::GET && call.method != Method::HEAD {
        return Err(ApiError::MethodNotAllowed);
    }
    let state = call.engine().state();
    let (default, param) = match state {
        EngineState::Active => (200, "activecode"),
        EngineState::Uninitialized => (501, "uninitcode"),
        EngineState::Sealed | EngineState::Zeroized => (503, "sealedcode"),
    };
    let code = call
        .query_param(param)
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::from_u16(default).unwrap_or(StatusCode::OK));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // A cluster follower serves reads and crypto itself and forwards writes
    // to its leader: Vault's performance standby. Gateways (`[upstream]`)
    // read this to send writes to the leader; the status code stays 200.
    let follower = call
        .state
        .cluster
        .as_ref()
        .is_some_and(|c| state == EngineState::Active && !c.is_leader());
    let body = json!({
        "initialized": state != EngineState::Uninitialized,
        "sealed": state != EngineState::Active,
        "standby": false,
        "performance_standby": follower,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": now,
        "version": concat!("hsmgate-", env!("CARGO_PKG_VERSION")),
        "cluster_name": "hsmgate",
        "engine_state": state.as_str(),
    });
    Ok(rescue::json_response(code, &body))
}

pub fn lookup_self(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    let p = call.principal()?;
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    // The role, then every policy name the access-policy phase uses for
    // this principal (a JWT role's, a crypto user's `[[user_policy]]`).
    let mut policies = vec![p.role.as_str().to_string()];
    for name in call.acl.policies_of(&p) {
        if !policies.contains(&name) {
            policies.push(name);
        }
    }
    let ttl = p
        .expires_at
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    call.ok(json!({
        "display_name": format!("hsm-{}", p.username),
        "creation_time": secs(p.issued_at),
        "creation_ttl": secs(p.expires_at).saturating_sub(secs(p.issued_at)),
        "expire_time": rfc3339(secs(p.expires_at)),
        "explicit_max_ttl": 0,
        "meta": { "username": p.username, "role": p.role.as_str() },
        "num_uses": 0,
        "orphan": true,
        "path": "hsm/login",
        "policies": policies,
        "renewable": false,
        "ttl": ttl,
        "type": "service",
    }))
}
