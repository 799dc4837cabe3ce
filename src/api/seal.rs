//! Seal routes: `POST /v1/hsm/unseal`, `POST /v1/hsm/seal`,
//! `POST /v1/hsm/rotate-master-key`, `POST /v1/hsm/rekey`, and Vault's `GET /v1/sys/seal-status`
//! and `PUT|POST /v1/sys/unseal` (bare seal-status bodies, as Vault's).
//!
//! Unseal takes no token (nobody can log in to a sealed engine) and is
//! admin-class: only the listener's admin networks reach it. Seal-status is
//! health-class, as in Vault.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::hsm::hashing_slot;
use super::{blocking, Call};
use crate::engine::seal::{self, RekeyRequest};
use crate::engine::secret::SecretString;
use crate::gateway::rescue::{self, ApiError};

/// Vault's unseal body: `{"key": ...}` or `{"reset": true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsealBody {
    #[serde(default)]
    key: Option<SecretString>,
    #[serde(default)]
    reset: bool,
    /// Accepted for Vault compatibility; seal migration does not exist here.
    #[serde(default)]
    migrate: bool,
}

async fn do_unseal(call: &Call<'_>) -> Result<crate::engine::SealStatus, ApiError> {
    let body: UnsealBody = call.json()?;
    if body.migrate {
        return Err(ApiError::BadRequest(
            "seal migration is not supported".into(),
        ));
    }
    // argon2 (passphrase mode) shares the hashing slots with logins.
    let _hashing = hashing_slot(call).await?;
    blocking(call.engine(), move |e| {
        e.unseal(body.key.as_ref(), body.reset)
    })
    .await
}

/// `POST /v1/hsm/unseal`: the seal status in the usual envelope.
pub async fn hsm_unseal(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let status = do_unseal(call).await?;
    call.ok(serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?)
}

/// `PUT|POST /v1/sys/unseal` (Vault's shape: the bare seal-status body).
pub async fn sys_unseal(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::PUT && call.method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let status = do_unseal(call).await?;
    Ok(rescue::json_response(StatusCode::OK, &json!(status)))
}

/// `GET /v1/sys/seal-status`.
pub fn sys_seal_status(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    if call.method != Method::GET && call.method != Method::HEAD {
        return Err(ApiError::MethodNotAllowed);
    }
    Ok(rescue::json_response(
        StatusCode::OK,
        &json!(call.engine().seal_status()),
    ))
}

/// `POST /v1/hsm/seal` (crypto officer).
pub async fn hsm_seal(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    blocking(call.engine(), move |e| e.seal(&by)).await?;
    call.ok(json!({ "state": "sealed" }))
}

/// `POST /v1/hsm/rotate-master-key` (crypto officer).
pub async fn hsm_rotate_master_key(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let generation = blocking(call.engine(), move |e| e.rotate_master_key(&by)).await?;
    call.ok(json!({ "master_key_generation": generation }))
}

/// `POST /v1/hsm/rekey` body. One call, not Vault's init/update/verify
/// dance: the officer's session plus the current secret authorize it, and
/// the new shares are handed back once, in the answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyBody {
    /// The current passphrase, or at least the threshold of current shares.
    current_keys: Vec<SecretString>,
    #[serde(default)]
    new_passphrase: Option<SecretString>,
    /// Vault's `sys/rekey/init` names for the new split.
    #[serde(default)]
    secret_threshold: Option<u8>,
    #[serde(default)]
    secret_shares: Option<u8>,
}

/// `POST /v1/hsm/rekey` (crypto officer): a new unseal passphrase or a new
/// Shamir split for the same master key.
pub async fn hsm_rekey(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body: RekeyBody = call.json()?;
    // argon2id (passphrase mode) shares the hashing slots with logins.
    let _hashing = hashing_slot(call).await?;
    let outcome = blocking(call.engine(), move |e| {
        e.rekey_seal(
            &by,
            RekeyRequest {
                current: body.current_keys,
                new_passphrase: body.new_passphrase,
                new_threshold: body.secret_threshold,
                new_shares: body.secret_shares,
            },
        )
    })
    .await?;
    let mut data = json!({
        "seal_type": outcome.seal_type,
        "secret_threshold": outcome.threshold,
        "secret_shares": outcome.shares_total,
        "verification_required": outcome.verification_required,
    });
    if !outcome.shares.is_empty() {
        // Returned once, never stored; both of Vault's encodings.
        data["keys"] = json!(seal::shares_hex(&outcome.shares));
        data["keys_base64"] = json!(outcome.shares);
    }
    call.ok(data)
}

/// `POST /v1/hsm/rekey/verify` body: the new shares.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyVerifyBody {
    keys: Vec<SecretString>,
}

/// `POST /v1/hsm/rekey/verify` (crypto officer): the new shares come back,
/// and only then replace the current ones.
pub async fn hsm_rekey_verify(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body: RekeyVerifyBody = call.json()?;
    let outcome = blocking(call.engine(), move |e| e.rekey_verify(&by, &body.keys)).await?;
    call.ok(json!({
        "seal_type": outcome.seal_type,
        "secret_threshold": outcome.threshold,
        "secret_shares": outcome.shares_total,
        "complete": true,
    }))
}
