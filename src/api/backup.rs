//! `POST /v1/hsm/backup` (crypto officer) and `POST /v1/hsm/restore`
//! (fresh or zeroized engine, init token) — docs/BACKUP.md.
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde::Deserialize;
use serde_json::json;

use super::hsm::hashing_slot;
use super::{blocking, Call};
use crate::engine::secret::SecretString;
use crate::gateway::rescue::ApiError;

pub async fn backup(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let (summary, bytes) = blocking(call.engine(), move |e| e.backup(&by)).await?;
    call.ok(json!({
        "backup": STANDARD.encode(&bytes),
        "sha256": hex::encode(crate::engine::crypto::sha256(&bytes)),
        "bytes": bytes.len(),
        "users": summary.users,
        "keys": summary.keys,
        "created_at": summary.created_at,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    /// The backup file, base64.
    backup: String,
    /// The custodian's X25519 private key, base64 of 32 bytes.
    custodian_key: SecretString,
    init_token: SecretString,
    #[serde(default)]
    unseal_passphrase: Option<SecretString>,
}

pub async fn restore(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: RestoreBody = call.json()?;
    let file = STANDARD
        .decode(body.backup.trim())
        .map_err(|_| ApiError::BadRequest("backup must be base64 of the backup file".into()))?;
    let custodian = zeroize::Zeroizing::new(
        STANDARD
            .decode(body.custodian_key.expose_secret().trim())
            .map_err(|_| ApiError::BadRequest("custodian_key must be base64".into()))?,
    );
    let _hashing = hashing_slot(call).await?;
    let (summary, outcome) = blocking(call.engine(), move |e| {
        e.restore(
            &file,
            &custodian,
            &body.init_token,
            body.unseal_passphrase.as_ref(),
        )
    })
    .await?;
    let mut data = json!({
        "state": "active",
        "seal_type": outcome.seal_type,
        "users": summary.users,
        "keys": summary.keys,
        "created_at": summary.created_at,
    });
    if !outcome.shares.is_empty() {
        data["keys_base64"] = json!(outcome.shares);
    }
    call.ok(data)
}
