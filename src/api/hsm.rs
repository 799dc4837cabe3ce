//! The HSM administration API under `/v1/hsm/`: init, login, status, users
//! (create, list, delete, reset a password; every user's own password
//! change), zeroize. Every route but login is admin-class (the router has already
//! checked the admin networks); login tells the engine whether the peer is
//! on one, so an officer login from an app network counts nothing.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{blocking, Call};
use crate::engine::secret::SecretString;
use crate::engine::users::PasswordChange;
use crate::engine::{LoginRequest, LoginSuccess, Role};
use crate::gateway::rescue::{self, ApiError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InitBody {
    admin_password: SecretString,
    init_token: SecretString,
    /// Required exactly when `[engine] seal = "passphrase"`.
    #[serde(default)]
    unseal_passphrase: Option<SecretString>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: SecretString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserBody {
    username: String,
    password: SecretString,
    #[serde(default = "crypto_user")]
    role: Role,
}

fn crypto_user() -> Role {
    Role::CryptoUser
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: SecretString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangePasswordBody {
    old_password: SecretString,
    new_password: SecretString,
}

pub async fn handle(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = call.path.trim_start_matches("/v1/hsm/");
    let segments: Vec<&str> = route.split('/').collect();
    match (call.method.clone(), segments.as_slice()) {
        (Method::POST, ["init"]) => init(call).await,
        (Method::POST, ["login"]) => login(call).await,
        (Method::GET, ["status"]) => status(call),
        (Method::POST, ["users"]) => create_user(call).await,
        (Method::GET, ["users"]) => list_users(call),
        (m, ["users"]) if m.as_str() == "LIST" => list_users(call),
        (Method::DELETE, ["users", name]) if !name.is_empty() => delete_user(call, name).await,
        (Method::POST, ["users", name, "password"]) => reset_password(call, name).await,
        (Method::POST, ["password"]) => change_password(call).await,
        (Method::POST, ["zeroize"]) => zeroize(call).await,
        (Method::POST, ["unseal"]) => super::seal::hsm_unseal(call).await,
        (Method::POST, ["seal"]) => super::seal::hsm_seal(call).await,
        (Method::POST, ["rotate-master-key"]) => super::seal::hsm_rotate_master_key(call).await,
        (Method::POST, ["rekey"]) => super::seal::hsm_rekey(call).await,
        (Method::POST, ["rekey", "verify"]) => super::seal::hsm_rekey_verify(call).await,
        (Method::POST, ["backup"]) => super::backup::backup(call).await,
        (Method::POST, ["restore"]) => super::backup::restore(call).await,
        (Method::GET, ["cluster"]) => super::cluster::status(call).await,
        (Method::POST, ["cluster", "nodes"]) => super::cluster::add_node(call).await,
        (Method::DELETE, ["cluster", "nodes", id]) if !id.is_empty() => {
            super::cluster::remove_node(call, id).await
        }
        (Method::POST, ["cluster", "rotate-key"]) => super::cluster::rotate_key(call).await,
        (_, ["cluster"])
        | (_, ["cluster", "nodes"])
        | (_, ["cluster", "nodes", _])
        | (_, ["cluster", "rotate-key"]) => Err(ApiError::MethodNotAllowed),
        (_, ["unseal" | "seal" | "rotate-master-key" | "rekey" | "backup" | "restore"])
        | (_, ["rekey", "verify"]) => Err(ApiError::MethodNotAllowed),
        (_, ["init" | "login" | "status" | "users" | "zeroize" | "password"])
        | (_, ["users", _])
        | (_, ["users", _, "password"]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    }
}

async fn init(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: InitBody = call.json()?;
    let _hashing = hashing_slot(call).await?;
    let outcome = blocking(call.engine(), move |e| {
        e.init_with(
            &body.admin_password,
            &body.init_token,
            body.unseal_passphrase.as_ref(),
        )
    })
    .await?;
    let mut data = json!({ "state": "active", "seal_type": outcome.seal_type });
    if !outcome.shares.is_empty() {
        // Vault's sys/init names: returned once, never stored.
        data["keys"] = json!(crate::engine::seal::shares_hex(&outcome.shares));
        data["keys_base64"] = json!(outcome.shares);
    }
    call.ok(data)
}

async fn login(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: LoginBody = call.json()?;
    // Per (source network, username): guessing one user from one network is
    // slow, and every other user (and network) keeps its own budget.
    call.limiters
        .check_login_user(call.conn.client, &body.username)
        .map_err(ApiError::RateLimited)?;
    let _hashing = hashing_slot(call).await?;
    let channel = call.conn.channel;
    let officer_allowed = call.is_admin_network;
    let success = blocking(call.engine(), move |e| {
        e.login(LoginRequest {
            username: &body.username,
            password: &body.password,
            channel,
            officer_allowed,
        })
    })
    .await?;
    Ok(session_response(call, &success))
}

/// Vault's login shape: the token in `auth.client_token`.
fn session_response(call: &Call<'_>, success: &LoginSuccess) -> Response<Full<Bytes>> {
    let ttl = call.engine().session_ttl().as_secs();
    let auth = json!({
        "client_token": success.token.expose_secret(),
        "accessor": "",
        "policies": success.principal.policies(),
        "token_policies": success.principal.policies(),
        "metadata": { "username": success.principal.username, "role": success.principal.role.as_str() },
        "lease_duration": ttl,
        "renewable": false,
        "token_type": "service",
        "orphan": true,
    });
    call.respond(StatusCode::OK, &serde_json::Value::Null, Some(&auth))
}

fn status(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let status = call.engine().status()?;
    let data = serde_json::to_value(&status).map_err(|e| ApiError::Internal(e.to_string()))?;
    call.ok(data)
}

async fn create_user(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body: CreateUserBody = call.json()?;
    let _hashing = hashing_slot(call).await?;
    let (username, role) = (body.username.clone(), body.role);
    blocking(call.engine(), move |e| {
        e.create_user(&by, &body.username, &body.password, body.role)
    })
    .await?;
    call.ok(json!({ "username": username, "role": role.as_str() }))
}

/// The crypto officer's user list: names, roles, failure counts, locks.
fn list_users(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let users = call.engine().list_users(&by)?;
    let keys: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
    let info = serde_json::to_value(&users).map_err(|e| ApiError::Internal(e.to_string()))?;
    call.ok(json!({ "keys": keys, "users": info }))
}

/// The crypto officer deletes a crypto user (204); its tokens die with it.
async fn delete_user(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let username = name.to_string();
    blocking(call.engine(), move |e| e.delete_user(&by, &username)).await?;
    Ok(rescue::empty_response(StatusCode::NO_CONTENT))
}

/// Any HSM user changes its own password with the old one. The old
/// password goes through the login path (same per-(source, user) limit,
/// hashing slot, counter, guard); the answer carries a new session token,
/// every older one of the user being revoked.
async fn change_password(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body: ChangePasswordBody = call.json()?;
    call.limiters
        .check_login_user(call.conn.peer, &by.username)
        .map_err(ApiError::RateLimited)?;
    let _hashing = hashing_slot(call).await?;
    let channel = call.conn.channel;
    let officer_allowed = call.is_admin_network;
    let success = blocking(call.engine(), move |e| {
        e.change_password(
            &by,
            PasswordChange {
                old_password: &body.old_password,
                new_password: &body.new_password,
                channel,
                officer_allowed,
            },
        )
    })
    .await?;
    Ok(session_response(call, &success))
}

async fn reset_password(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body: PasswordBody = call.json()?;
    let _hashing = hashing_slot(call).await?;
    let username = name.to_string();
    blocking(call.engine(), move |e| {
        e.reset_password(&by, &username, &body.password)
    })
    .await?;
    call.ok(json!({ "username": name, "locked": false, "consecutive_failures": 0 }))
}

/// One of the few slots for argon2 work, held until the response: logins
/// can never take every core, whatever their rate.
pub(super) async fn hashing_slot(
    call: &Call<'_>,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    call.limiters
        .hashing_permit()
        .await
        .map_err(ApiError::RateLimited)
}

async fn zeroize(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    blocking(call.engine(), move |e| e.zeroize(&by)).await?;
    call.ok(json!({ "state": "zeroized" }))
}
