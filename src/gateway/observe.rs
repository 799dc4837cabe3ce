//! Phase 10 for one request: the audit record and the metrics. Runs whatever
//! the earlier phases decided, including denials and errors.
//!
//! What is recorded: every HSM API call (login and admin classes), every
//! policy denial (403) on the Transit and metrics routes, and, when
//! `audit.key_use = "all"`, every Transit operation with its principal and
//! key (`"per_minute"`: counted here, one record per principal, key and
//! operation per minute). A zeroization caused by the request gets a record of its own. The
//! password of a login never reaches this module: only the user name is
//! read from the body.
//!
//! An audit write failure fails admin-class requests (the caller sees a
//! 500 saying the record could not be written; the action may have
//! happened) and raises `hsmgate_audit_write_failures_total`. Transit
//! requests go on: their records are lost (counted by the metric, and by
//! the `audit.resumed` record written when the log recovers).
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::http::request::Parts;
use hyper::Method;

use super::listener::ConnInfo;
use super::rescue::ApiError;
use super::router::RouteClass;
use super::AppState;
use crate::audit::{Event, KeyUseLevel, Outcome};
use crate::engine::{Channel, EngineState, Role, ADMIN_USERNAME};
use crate::metrics;

/// Longest user or key name copied into a record; longer input is cut.
const MAX_NAME: usize = 128;

/// What phase 10 learns about a request on its way through.
#[derive(Debug, Default)]
pub struct Facts {
    state_before: Option<EngineState>,
    /// The authenticated user, or the user name a login tried.
    actor: Option<String>,
    role: Option<Role>,
    /// Transit: the operation (a closed set) and the key named in the path.
    op: Option<&'static str>,
    key: Option<String>,
    /// Phase 8's refusal, if an access policy refused the request.
    acl: Option<crate::api::AclDenial>,
    /// The user an admin request creates (`POST /v1/hsm/users`).
    target_user: Option<String>,
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_NAME).collect()
}

fn token(parts: &Parts) -> Option<&str> {
    if let Some(t) = parts
        .headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
    {
        return Some(t.trim());
    }
    parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Transit operation and key name from the path and method.
fn transit_op(method: &Method, path: &str) -> (Option<&'static str>, Option<String>) {
    let Some(rest) = path.strip_prefix("/v1/transit/") else {
        return (None, None);
    };
    let seg: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let key = |i: usize| seg.get(i).map(|k| clip(k));
    match seg.as_slice() {
        ["keys"] => (Some("list"), None),
        ["keys", _] => {
            let op = match *method {
                Method::POST | Method::PUT => "create",
                Method::DELETE => "delete",
                _ => "read",
            };
            (Some(op), key(1))
        }
        ["keys", _, sub, ..] => (Some(metrics::op_label(sub)), key(1)),
        ["datakey", _, _, ..] => (Some("datakey"), key(2)),
        ["export", _, _, ..] => (Some("export"), key(2)),
        ["random", ..] | ["hash", ..] => (Some(metrics::op_label(seg[0])), None),
        [op, _, ..] => (Some(metrics::op_label(op)), key(1)),
        [op] => (Some(metrics::op_label(op)), None),
        [] => (None, None),
    }
}

impl Facts {
    /// An access policy refused the request: who, what it needed, why.
    pub fn acl_denied(&mut self, denial: crate::api::AclDenial) {
        if self.actor.is_none() {
            // JWT apps are not session users; the denial knows who it was.
            self.actor = Some(clip(&denial.actor));
        }
        self.acl = Some(denial);
    }

    pub fn new(state_before: EngineState) -> Facts {
        Facts {
            state_before: Some(state_before),
            ..Facts::default()
        }
    }

    /// Called once the body is read, before dispatch: who is acting (the
    /// session's user, or the name a login tries) and on which key.
    pub fn learn(&mut self, state: &AppState, class: RouteClass, parts: &Parts, body: &Bytes) {
        match class {
            RouteClass::Login => {
                #[derive(serde::Deserialize)]
                struct Name {
                    username: Option<String>,
                }
                // Only the name is read: the password never leaves the body.
                if let Ok(Name { username: Some(u) }) = serde_json::from_slice::<Name>(body) {
                    self.role = Some(if u == ADMIN_USERNAME {
                        Role::CryptoOfficer
                    } else {
                        Role::CryptoUser
                    });
                    self.actor = Some(clip(&u));
                }
            }
            RouteClass::Admin | RouteClass::Transit | RouteClass::Metrics => {
                if class == RouteClass::Admin && parts.uri.path() == "/v1/hsm/users" {
                    #[derive(serde::Deserialize)]
                    struct Name {
                        username: Option<String>,
                    }
                    // Only the name: the new user's password stays in the body.
                    if let Ok(Name { username: Some(u) }) = serde_json::from_slice::<Name>(body) {
                        self.target_user = Some(clip(&u));
                    }
                }
                if let Some(p) = token(parts).and_then(|t| state.engine.authenticate(t).ok()) {
                    self.role = Some(p.role);
                    self.actor = Some(p.username);
                }
                if class == RouteClass::Transit {
                    (self.op, self.key) = transit_op(&parts.method, parts.uri.path());
                }
            }
            RouteClass::Health | RouteClass::Unknown => {}
        }
    }
}

fn outcome(status: u16, guard_refused: bool) -> Outcome {
    match status {
        _ if guard_refused => Outcome::Refused,
        200..=399 => Outcome::Success,
        403 => Outcome::Denied,
        500..=599 => Outcome::Error,
        _ => Outcome::Failure,
    }
}

/// `hsm.login`, `hsm.users`, `hsm.users.password`, ...: the route, never
/// free text (unknown segments become `other`).
fn hsm_action(path: &str) -> (String, Option<String>) {
    if path == "/v1/sys/unseal" {
        return ("hsm.unseal".into(), None);
    }
    let rest = path.trim_start_matches("/v1/hsm/");
    let seg: Vec<&str> = rest.split('/').collect();
    let known = |s: &str| {
        matches!(
            s,
            "init"
                | "login"
                | "status"
                | "users"
                | "zeroize"
                | "password"
                | "unseal"
                | "seal"
                | "rotate-master-key"
                | "rekey"
                | "backup"
                | "restore"
        )
        .then(|| s.to_string())
        .unwrap_or_else(|| "other".into())
    };
    match seg.as_slice() {
        ["users", name, "password"] => ("hsm.users.password".into(), Some(clip(name))),
        ["users", name] if !name.is_empty() => ("hsm.users.delete".into(), Some(clip(name))),
        ["rekey", "verify"] => ("hsm.rekey.verify".into(), None),
        [first, ..] => (format!("hsm.{}", known(first)), None),
        [] => ("hsm.other".into(), None),
    }
}

/// Writes the request's audit record(s). An error here fails the request
/// when it is admin-class.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    class: RouteClass,
    method: &Method,
    path: &str,
    request_id: &str,
    facts: &Facts,
    status: u16,
    guard_refused: bool,
) -> Result<(), ApiError> {
    let outcome = outcome(status, guard_refused);
    let admin_class = matches!(class, RouteClass::Login | RouteClass::Admin);
    let mut events = Vec::new();
    let base = |action: String, outcome: Outcome| {
        let mut e = Event::new(action, outcome);
        e.actor = facts.actor.clone();
        e.source = Some(conn.peer);
        e.request_id = Some(request_id.to_string());
        let e = e.detail("status", status).detail("method", method.as_str());
        // The client a trusted proxy named, beside the peer that named it.
        if conn.client != conn.peer {
            e.detail("client", conn.client.to_string())
        } else {
            e
        }
    };
    match class {
        RouteClass::Login | RouteClass::Admin => {
            let (action, user) = hsm_action(path);
            let user = user.or_else(|| facts.target_user.clone());
            let mut e = base(action, outcome);
            if let Some(u) = user {
                e = e.detail("user", u);
            }
            if class == RouteClass::Login {
                let channel = match conn.channel {
                    Channel::FrontDoor => "front-door",
                    Channel::BreakGlass => "break-glass",
                };
                e = e.detail("channel", channel);
            }
            events.push(e);
        }
        RouteClass::Transit => {
            let level = state.audit.key_use();
            // Key material moving in or out (wrapped, or in plaintext by
            // export or backup) is a key lifecycle event: recorded and
            // synced whatever `key_use` says.
            let lifecycle = matches!(
                facts.op,
                Some(
                    "wrap"
                        | "unwrap"
                        | "import"
                        | "import_version"
                        | "export"
                        | "backup"
                        | "restore"
                )
            );
            let key_use = level == KeyUseLevel::All && facts.op.is_some();
            if let (KeyUseLevel::PerMinute, Some(op), false, false) =
                (level, facts.op, outcome == Outcome::Denied, lifecycle)
            {
                // Counted now, written as one record per minute
                // (`AuditLog::roll_key_use` on the flush timer).
                state.audit.count_key_use(
                    facts.actor.as_deref(),
                    facts.key.as_deref(),
                    op,
                    outcome == Outcome::Success,
                );
            } else if key_use || lifecycle || outcome == Outcome::Denied {
                let action = format!("transit.{}", facts.op.unwrap_or("request"));
                let mut e = base(action, outcome);
                if let Some(k) = &facts.key {
                    e = e.detail("key", k.clone());
                }
                if let Some(d) = &facts.acl {
                    e = e
                        .detail("decision", "acl_denied")
                        .detail("acl_reason", d.reason.as_str())
                        .detail(
                            "acl_capability",
                            d.capability.map_or("none", |c| c.as_str()),
                        )
                        .detail("acl_path", clip(&d.path))
                        .detail(
                            "policies",
                            d.policies.iter().map(|p| clip(p)).collect::<Vec<_>>(),
                        );
                    if let Some(rule) = &d.rule {
                        e = e.detail("acl_rule", clip(rule));
                    }
                }
                // Key use is the bulk of the log: synced by the policy's
                // timer when batched; denials are synced at once.
                e.urgent = outcome == Outcome::Denied || lifecycle;
                events.push(e);
            }
        }
        RouteClass::Metrics if outcome == Outcome::Denied => {
            events.push(base("sys.metrics".into(), outcome));
        }
        RouteClass::Metrics | RouteClass::Health | RouteClass::Unknown => {}
    }
    if facts.state_before == Some(EngineState::Active)
        && admin_class
        && state.engine.state() == EngineState::Zeroized
    {
        let cause = if class == RouteClass::Login {
            "crypto-officer login failures reached the threshold"
        } else {
            "requested by the crypto officer"
        };
        let mut e = base("engine.zeroized".into(), Outcome::Success).detail("cause", cause);
        e.urgent = true;
        events.push(e);
    }
    if events.is_empty() {
        return Ok(());
    }
    let failure = match state.audit.append_all(events).await {
        Ok(_) => return Ok(()),
        Err(e) => e.to_string(),
    };
    state.metrics.audit_write_failures.inc();
    tracing::error!(request_id, error = %failure, "audit write failed");
    if admin_class {
        Err(ApiError::AuditFailed)
    } else {
        Ok(())
    }
}

/// The request's metrics beyond the per-class counters.
pub fn observe(state: &AppState, class: RouteClass, facts: &Facts, status: u16, elapsed: Duration) {
    let m = &state.metrics;
    match class {
        RouteClass::Login => {
            if let Some(role) = facts.role {
                let outcome = match status {
                    200 => Some("success"),
                    401 => Some("failure"),
                    423 => Some("refused"),
                    403 => Some("denied"),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    m.login(role, outcome);
                }
                if status == 423 {
                    m.guard_refusals.inc();
                }
            }
            // Attempts left and the zeroization count move with logins.
            m.refresh(&state.engine, &state.audit);
        }
        RouteClass::Admin => {
            if facts.state_before != Some(state.engine.state()) {
                m.refresh(&state.engine, &state.audit);
            }
        }
        RouteClass::Transit => {
            if let Some(op) = facts.op {
                let key_type = facts
                    .key
                    .as_deref()
                    .and_then(|k| state.engine.key_type_of(k))
                    .map_or("none", |t| t.as_str());
                m.engine_op(op, key_type, status < 400, elapsed);
            }
        }
        RouteClass::Health | RouteClass::Metrics | RouteClass::Unknown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_paths_name_op_and_key() {
        let p = |m: Method, path: &str| transit_op(&m, path);
        assert_eq!(
            p(Method::POST, "/v1/transit/encrypt/k1"),
            (Some("encrypt"), Some("k1".into()))
        );
        assert_eq!(
            p(Method::POST, "/v1/transit/keys/k1"),
            (Some("create"), Some("k1".into()))
        );
        assert_eq!(
            p(Method::POST, "/v1/transit/keys/k1/rotate"),
            (Some("rotate"), Some("k1".into()))
        );
        assert_eq!(
            p(Method::POST, "/v1/transit/datakey/plaintext/k2"),
            (Some("datakey"), Some("k2".into()))
        );
        assert_eq!(
            p(Method::GET, "/v1/transit/random/32"),
            (Some("random"), None)
        );
        assert_eq!(
            p(Method::POST, "/v1/transit/frobnicate/k"),
            (Some("other"), Some("k".into()))
        );
    }

    #[test]
    fn hsm_actions_are_a_closed_set() {
        assert_eq!(hsm_action("/v1/hsm/login").0, "hsm.login");
        assert_eq!(
            hsm_action("/v1/hsm/users/bob/password"),
            ("hsm.users.password".into(), Some("bob".into()))
        );
        assert_eq!(hsm_action("/v1/hsm/<script>").0, "hsm.other");
        assert_eq!(
            hsm_action("/v1/hsm/users/bob"),
            ("hsm.users.delete".into(), Some("bob".into()))
        );
        assert_eq!(hsm_action("/v1/hsm/password").0, "hsm.password");
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(200, false), Outcome::Success);
        assert_eq!(outcome(401, false), Outcome::Failure);
        assert_eq!(outcome(423, true), Outcome::Refused);
        assert_eq!(outcome(403, false), Outcome::Denied);
        assert_eq!(outcome(500, false), Outcome::Error);
    }
}
