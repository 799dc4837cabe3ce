//! The HTTP surface: [`transit`] (Vault Transit compatible), [`hsm`] (HSM
//! administration), [`seal`] (unseal, seal, master-key rotation, seal
//! status), [`sys`] (health, token lookup), [`openapi`] (the API's
//! description and route table). Handlers parse, call the
//! engine, and shape Vault-style envelopes; errors go back as
//! [`ApiError`] for the gateway's rescue to render.
pub mod auth;
pub mod backup;
pub mod cluster;
pub mod hsm;
pub mod openapi;
pub mod seal;
pub mod sys;
pub mod transit;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Method, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::engine::{Engine, EngineError, Principal};
use crate::gateway::listener::ConnInfo;
use crate::gateway::rescue::{self, ApiError};
use crate::gateway::AppState;

/// One request, as the handlers see it.
pub struct Call<'a> {
    pub state: &'a Arc<AppState>,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub conn: ConnInfo,
    /// Whether the TCP peer is on one of the listener's admin networks.
    pub is_admin_network: bool,
    pub request_id: &'a str,
    /// This request's rate limiters (phase 7 runs in [`Call::principal`]).
    pub limiters: Arc<crate::ratelimit::Limiters>,
    /// The snapshot's JWT issuers.
    pub jwt: &'a crate::auth::JwtIssuers,
    /// The snapshot's client-certificate mappings (mutual TLS).
    pub certs: &'a crate::auth::CertPrincipals,
    /// The snapshot's access policies (phase 8, in [`Call::principal`]).
    pub acl: &'a crate::acl::Acl,
    /// Set when an access policy refused this request; the router hands it
    /// to phase 10 for the audit record.
    pub acl_denial: std::sync::Mutex<Option<AclDenial>>,
}

/// An access-policy refusal, as phase 10 records it.
#[derive(Debug, Clone)]
pub struct AclDenial {
    pub actor: String,
    /// `None` when the method maps to no capability.
    pub capability: Option<crate::acl::Capability>,
    /// The path checked (`transit/...`), or the raw path when not canonical.
    pub path: String,
    pub reason: crate::acl::DenyReason,
    /// The deciding rule's path, when one matched.
    pub rule: Option<String>,
    /// The principal's policy names.
    pub policies: Vec<String>,
}

impl Call<'_> {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.state.engine
    }

    /// The session token from `X-Vault-Token` or `Authorization: Bearer`.
    pub fn token(&self) -> Option<&str> {
        if let Some(t) = self
            .headers
            .get("x-vault-token")
            .and_then(|v| v.to_str().ok())
        {
            return Some(t.trim());
        }
        self.headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
    }

    /// Who is calling (phase 6), then whether they may go on now (phase 7:
    /// per principal, and per key for Transit key routes). The token is an
    /// HSM session token (one hash lookup) or an app JWT from a configured
    /// issuer; without a token, a verified client certificate that a
    /// `[[cert_principal]]` maps. A missing, unknown, expired or invalid
    /// token is a plain 403, as in Vault; why a JWT was refused goes to the
    /// log only. A token, when sent, always decides (a certificate never
    /// overrides or widens it).
    pub fn principal(&self) -> Result<Principal, ApiError> {
        let Some(token) = self.token() else {
            let principal = self
                .conn
                .cert
                .as_deref()
                .and_then(|cert| self.certs.principal(cert))
                .ok_or(ApiError::PermissionDenied)?;
            let state = self.engine().state();
            if state != crate::engine::EngineState::Active {
                return Err(ApiError::Unavailable(state));
            }
            return self.limited(principal);
        };
        let principal = if !self.jwt.is_empty() && crate::auth::looks_like_jwt(token) {
            match self.jwt.verify(token, None) {
                Ok(identity) => {
                    // Keys are the engine's; an app gets none while it is not active.
                    let state = self.engine().state();
                    if state != crate::engine::EngineState::Active {
                        return Err(ApiError::Unavailable(state));
                    }
                    identity.principal()
                }
                Err(reason) => {
                    tracing::info!(
                        target: "hsmgate::auth",
                        request_id = self.request_id,
                        peer = %self.conn.peer,
                        %reason,
                        "JWT refused"
                    );
                    return Err(ApiError::PermissionDenied);
                }
            }
        } else {
            self.engine().authenticate(token)?
        };
        self.limited(principal)
    }

    /// Phase 7 for an identified principal: per principal, and per key.
    fn limited(&self, principal: Principal) -> Result<Principal, ApiError> {
        self.limiters
            .check_principal(&principal.username)
            .map_err(ApiError::RateLimited)?;
        // Phase 8 before the per-key limit: a request its policies refuse
        // must not spend the budget of a key it may not use.
        self.authorize(&principal)?;
        if let Some(key) = transit_key_name(self.path) {
            self.limiters
                .check_key(key)
                .map_err(ApiError::RateLimited)?;
        }
        Ok(principal)
    }

    /// Phase 8: may this principal do this to this Transit path? Only
    /// while access policies are configured (`crate::acl::Acl::enabled`);
    /// other routes are guarded by role and network alone. A refusal is a
    /// 403 with Vault's body, counted, logged, and left in `acl_denial` for
    /// the audit record.
    fn authorize(&self, principal: &Principal) -> Result<(), ApiError> {
        if !self.acl.enabled() || !self.path.starts_with("/v1/transit/") {
            return Ok(());
        }
        let policies = self.acl.policies_of(principal);
        let request =
            crate::acl::transit_request(self.method, self.path, transit::lists(self), |name| {
                self.engine().key_type_of(name).is_some()
            });
        let (decision, capability, checked) = match &request {
            Ok(r) => (
                self.acl.check(&policies, r),
                Some(r.capability),
                r.path.clone(),
            ),
            Err(reason) => (
                crate::acl::Decision::Deny {
                    reason: *reason,
                    rule: None,
                    policies: Vec::new(),
                },
                None,
                self.path.chars().take(256).collect(),
            ),
        };
        let crate::acl::Decision::Deny { reason, rule, .. } = decision else {
            return Ok(());
        };
        self.state
            .metrics
            .acl_denial(capability.map_or("none", |c| c.as_str()), reason);
        tracing::info!(
            target: "hsmgate::acl",
            request_id = self.request_id,
            principal = %principal.username,
            capability = capability.map_or("none", |c| c.as_str()),
            path = %checked,
            reason = reason.as_str(),
            rule = rule.as_deref().unwrap_or(""),
            "access policy denied the request"
        );
        let denial = AclDenial {
            actor: principal.username.clone(),
            capability,
            path: checked,
            reason,
            rule,
            policies,
        };
        *self.acl_denial.lock().unwrap_or_else(|e| e.into_inner()) = Some(denial);
        Err(ApiError::AclDenied)
    }

    /// The JSON body; an empty body reads as `{}`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("failed to parse JSON input: {e}")))
    }

    /// A boolean query flag read as Vault reads it (Go's `strconv.ParseBool`):
    /// `1 t T TRUE true True` are true; anything else, or absence, is false.
    /// (hvac sends Python's `True` for `list=True`.)
    pub fn query_flag(&self, name: &str) -> bool {
        self.query_param(name)
            .is_some_and(|v| matches!(v, "1" | "t" | "T" | "TRUE" | "true" | "True"))
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    /// A 200 with Vault's response envelope around `data`.
    pub fn ok(&self, data: Value) -> Result<Response<Full<Bytes>>, ApiError> {
        Ok(self.respond(StatusCode::OK, &data, None))
    }

    /// A response with Vault's envelope around `data` and, for logins,
    /// `auth`.
    pub fn respond(
        &self,
        status: StatusCode,
        data: &Value,
        auth: Option<&Value>,
    ) -> Response<Full<Bytes>> {
        rescue::json_response(
            status,
            &Envelope {
                auth,
                data,
                lease_duration: 0,
                lease_id: "",
                renewable: false,
                request_id: self.request_id,
                warnings: (),
                wrap_info: (),
            },
        )
    }
}

/// Vault's response envelope, serialized straight from borrowed parts (no
/// intermediate `Value` map: building one cost 2% of the server's CPU
/// under Transit load, docs/BENCHMARKS.md, session 7). Fields in sorted
/// order, the order serde_json writes a map's keys, so the bytes are those
/// of the `json!` object this replaced.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    auth: Option<&'a Value>,
    data: &'a Value,
    lease_duration: u32,
    lease_id: &'static str,
    renewable: bool,
    request_id: &'a str,
    warnings: (),
    wrap_info: (),
}

/// The key a Transit path operates on, for the per-key limit.
pub fn transit_key_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/transit/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let name = match segments.as_slice() {
        ["keys", name, ..]
        | ["encrypt" | "decrypt" | "rewrap" | "hmac" | "sign" | "verify" | "backup" | "restore", name, ..]
        | ["datakey" | "export", _, name, ..] => *name,
        _ => return None,
    };
    (!name.is_empty()).then_some(name)
}

/// Runs blocking engine work (argon2, key generation, fsync) off the
/// async workers.
pub async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| ApiError::Internal(format!("engine task failed: {e}")))?
        .map_err(ApiError::from)
}

/// Unix seconds as RFC 3339 UTC, without pulling in a date crate.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_of_transit_paths() {
        assert_eq!(transit_key_name("/v1/transit/encrypt/k1"), Some("k1"));
        assert_eq!(transit_key_name("/v1/transit/keys/k1/rotate"), Some("k1"));
        assert_eq!(
            transit_key_name("/v1/transit/datakey/plaintext/k2"),
            Some("k2")
        );
        assert_eq!(transit_key_name("/v1/transit/keys"), None);
        assert_eq!(transit_key_name("/v1/transit/random/32"), None);
    }

    /// The typed envelope writes the bytes the `json!` map it replaced
    /// wrote (Vault's fields; keys sorted), with and without `auth`.
    #[test]
    fn envelope_bytes_match_vaults_shape() {
        let data = serde_json::json!({"ciphertext": "vault:v1:abc", "key_version": 1});
        let auth = serde_json::json!({"client_token": "t"});
        for auth in [None, Some(&auth)] {
            let typed = serde_json::to_string(&Envelope {
                auth,
                data: &data,
                lease_duration: 0,
                lease_id: "",
                renewable: false,
                request_id: "rid",
                warnings: (),
                wrap_info: (),
            })
            .unwrap();
            let map = serde_json::json!({
                "request_id": "rid",
                "lease_id": "",
                "renewable": false,
                "lease_duration": 0,
                "data": data,
                "wrap_info": null,
                "warnings": null,
                "auth": auth,
            });
            assert_eq!(typed, serde_json::to_string(&map).unwrap());
        }
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
