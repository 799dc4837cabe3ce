//! Who an app is: JWTs from the issuers declared in `[[jwt_issuer]]`.
//!
//! A token is accepted only if, in this order:
//! 1. it is three base64url parts no larger than [`MAX_TOKEN_BYTES`];
//! 2. its unverified `iss` names a declared issuer (used only to pick the
//!    issuer; the signature check below covers it);
//! 3. its header `alg` is in that issuer's allowlist — which holds only
//!    asymmetric algorithms, so `none` and HS256 never verify anything;
//! 4. its `kid` names one of the issuer's keys (a key-less `kid` is allowed
//!    only when the issuer has exactly one key), and that key's family
//!    matches the algorithm: an RSA public key is never used as an HMAC
//!    secret;
//! 5. the signature verifies, `iss` and `aud` match, `exp` is in the future
//!    and `nbf` in the past (with the issuer's small leeway);
//! 6. a role of the issuer binds its claims (like Vault's JWT auth roles).
//!
//! The result is an app [`Principal`]: it uses keys like a crypto user and
//! can never administer. Every refusal looks the same to the caller; the
//! reason ([`AuthError`]) goes to the log.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::config::{ConfigError, Source};
use crate::engine::Principal;

/// Larger tokens are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest accepted leeway for `exp`/`nbf`: clocks drift, tokens should not.
const MAX_LEEWAY_SECONDS: i64 = 300;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("not a JWT")]
    Malformed,
    #[error("no issuer {0:?} is configured")]
    UnknownIssuer(String),
    #[error("algorithm {0:?} is not allowed for this issuer")]
    AlgorithmNotAllowed(String),
    #[error("no key {0:?} for this issuer")]
    UnknownKey(Option<String>),
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("no role of the issuer binds these claims")]
    NoMatchingRole,
    #[error("claim {0:?} (the role's user claim) is missing or not a string")]
    MissingUserClaim(String),
}

/// Every configured issuer, keys loaded. Part of the config snapshot.
#[derive(Debug, Clone, Default)]
pub struct JwtIssuers {
    issuers: Vec<Issuer>,
}

#[derive(Debug, Clone)]
struct Issuer {
    name: String,
    /// The exact `iss` value.
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    keys: Vec<VerifyKey>,
    leeway: u64,
    roles: Vec<JwtRole>,
}

#[derive(Debug, Clone)]
struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
}

/// Like a Vault JWT auth role: which tokens it accepts and what they get.
#[derive(Debug, Clone)]
pub struct JwtRole {
    pub name: String,
    /// The claim naming the app (default `sub`).
    pub user_claim: String,
    /// Each claim must be a string (or list of strings) holding one of these
    /// values.
    pub bound_claims: BTreeMap<String, Vec<String>>,
    pub policies: Vec<String>,
}

/// A verified app identity.
#[derive(Debug, Clone)]
pub struct JwtIdentity {
    pub issuer: String,
    pub role: String,
    pub user: String,
    pub policies: Vec<String>,
    pub expires_at: SystemTime,
}

impl JwtIdentity {
    /// The engine principal: named `jwt:<issuer>:<role>:<user>`, which can
    /// never collide with an HSM user name (those have no `:`).
    pub fn principal(&self) -> Principal {
        Principal::app(
            format!("jwt:{}:{}:{}", self.issuer, self.role, self.user),
            self.policies.clone(),
            self.expires_at,
        )
    }
}

/// Whether a bearer token looks like a JWT (three dot-separated parts), as
/// opposed to an HSM session token (`hsm.` + one part).
pub fn looks_like_jwt(token: &str) -> bool {
    token.len() <= MAX_TOKEN_BYTES && token.split('.').count() == 3 && !token.starts_with("hsm.")
}

impl JwtIssuers {
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token`; `role` (from `auth/jwt/login`) must then be one of
    /// the issuer's roles and bind the claims, otherwise the first role that
    /// binds them is taken.
    pub fn verify(&self, token: &str, role: Option<&str>) -> Result<JwtIdentity, AuthError> {
        if !looks_like_jwt(token) {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let iss = unverified_issuer(token)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(AuthError::UnknownIssuer(iss))?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let key = match &header.kid {
            Some(kid) => issuer
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None if issuer.keys.len() == 1 => issuer.keys.first(),
            None => None,
        }
        .ok_or_else(|| AuthError::UnknownKey(header.kid.clone()))?;
        if key.key.family() != header.alg.family() {
            return Err(AuthError::AlgorithmNotAllowed(format!(
                "{:?} with a {:?} key",
                header.alg,
                key.key.family()
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&issuer.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = issuer.leeway;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| AuthError::Rejected(format!("{:?}", e.kind())))?;
        let claims = data.claims;
        let chosen = match role {
            Some(name) => issuer
                .roles
                .iter()
                .find(|r| r.name == name && binds(r, &claims)),
            None => issuer.roles.iter().find(|r| binds(r, &claims)),
        }
        .ok_or(AuthError::NoMatchingRole)?;
        let user = claims
            .get(&chosen.user_claim)
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty() && u.len() <= 256)
            .ok_or_else(|| AuthError::MissingUserClaim(chosen.user_claim.clone()))?;
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        Ok(JwtIdentity {
            issuer: issuer.name.clone(),
            role: chosen.name.clone(),
            user: user.to_string(),
            policies: chosen.policies.clone(),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }
}

/// The `iss` claim, read without verification, only to choose the issuer
/// whose keys then verify everything.
fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).ok_or(AuthError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let iss: Iss = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    iss.iss.ok_or(AuthError::Rejected("no iss claim".into()))
}

fn binds(role: &JwtRole, claims: &serde_json::Map<String, Value>) -> bool {
    role.bound_claims.iter().all(|(claim, allowed)| {
        let matches = |v: &Value| v.as_str().is_some_and(|s| allowed.iter().any(|a| a == s));
        match claims.get(claim) {
            Some(Value::Array(values)) => values.iter().any(matches),
            Some(v) => matches(v),
            None => false,
        }
    })
}

// ---------------------------------------------------------------------------
// `[[jwt_issuer]]` in the main config file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    name: Spanned<String>,
    issuer: Spanned<String>,
    audiences: Option<Spanned<Vec<String>>>,
    algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    public_keys: Vec<Spanned<RawKeyFile>>,
    jwks_file: Option<Spanned<String>>,
    leeway_seconds: Option<Spanned<i64>>,
    #[serde(default)]
    role: Vec<Spanned<RawRole>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyFile {
    kid: Option<String>,
    file: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Spanned<String>,
    user_claim: Option<String>,
    #[serde(default)]
    bound_claims: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    policies: Vec<Spanned<String>>,
}

/// Every policy name a JWT role attaches, with its position, so the config
/// can check that each names a declared policy ([`crate::acl`]).
pub(crate) fn policy_refs(raw: &[Spanned<RawIssuer>]) -> Vec<crate::acl::PolicyRef<'_>> {
    let mut refs = Vec::new();
    for issuer in raw {
        let issuer = issuer.get_ref();
        for role in &issuer.role {
            let role = role.get_ref();
            for p in &role.policies {
                refs.push(crate::acl::PolicyRef {
                    name: p.get_ref(),
                    span: p.span(),
                    owner: format!(
                        "jwt_issuer {:?} role {:?}",
                        issuer.name.get_ref(),
                        role.name.get_ref()
                    ),
                });
            }
        }
    }
    refs
}

/// Validates every `[[jwt_issuer]]` and loads its keys; problems go to
/// `errors` with the line of the offending key.
pub(crate) fn load_issuers(
    main: &Source<'_>,
    raw: &[Spanned<RawIssuer>],
    errors: &mut Vec<ConfigError>,
) -> JwtIssuers {
    let base = main.path.parent().unwrap_or(Path::new(""));
    let mut issuers = Vec::new();
    for spanned in raw {
        let r = spanned.get_ref();
        let name = r.name.get_ref().clone();
        let at = |span, msg: String| main.error_at(span, format!("jwt_issuer {name:?}: {msg}"));
        if issuers.iter().any(|i: &Issuer| i.name == name) || name.is_empty() || name.contains(':')
        {
            errors.push(at(
                r.name.span(),
                "name must be unique, non-empty and without ':'".into(),
            ));
        }
        if r.issuer.get_ref().is_empty() {
            errors.push(at(
                r.issuer.span(),
                "issuer (the iss value) is required".into(),
            ));
        }
        let audiences = r.audiences.as_ref().map_or(&[][..], |a| a.get_ref());
        if audiences.is_empty() {
            errors.push(at(
                r.audiences.as_ref().map_or(spanned.span(), |a| a.span()),
                "audiences must name at least one aud value: a token minted for another \
                 service must not work here"
                    .into(),
            ));
        }
        let mut algorithms = Vec::new();
        let listed = r.algorithms.as_ref().map_or(&[][..], |a| a.get_ref());
        for a in listed {
            match parse_algorithm(a.get_ref()) {
                Ok(alg) => algorithms.push(alg),
                Err(msg) => errors.push(at(a.span(), msg)),
            }
        }
        if listed.is_empty() {
            errors.push(at(
                r.algorithms.as_ref().map_or(spanned.span(), |a| a.span()),
                "algorithms must list the allowed algorithms (e.g. [\"RS256\", \"ES256\"])".into(),
            ));
        }
        let mut keys = Vec::new();
        for k in &r.public_keys {
            let file = base.join(k.get_ref().file.get_ref());
            match load_pem(&file) {
                Ok(key) => keys.push(VerifyKey {
                    kid: k.get_ref().kid.clone(),
                    key,
                }),
                Err(msg) => errors.push(at(k.get_ref().file.span(), msg)),
            }
        }
        if let Some(jwks) = &r.jwks_file {
            match load_jwks(&base.join(jwks.get_ref())) {
                Ok(mut loaded) => keys.append(&mut loaded),
                Err(msg) => errors.push(at(jwks.span(), msg)),
            }
        }
        if keys.is_empty() && r.public_keys.is_empty() && r.jwks_file.is_none() {
            errors.push(at(
                r.name.span(),
                "needs public_keys or jwks_file to verify tokens with".into(),
            ));
        }
        let leeway = match &r.leeway_seconds {
            None => 30,
            Some(v) if (0..=MAX_LEEWAY_SECONDS).contains(v.get_ref()) => *v.get_ref() as u64,
            Some(v) => {
                errors.push(at(
                    v.span(),
                    format!("leeway_seconds must be between 0 and {MAX_LEEWAY_SECONDS}"),
                ));
                30
            }
        };
        let mut roles: Vec<JwtRole> = Vec::new();
        for role in &r.role {
            let role_ref = role.get_ref();
            let role_name = role_ref.name.get_ref().clone();
            if role_name.is_empty()
                || role_name.contains(':')
                || roles.iter().any(|x| x.name == role_name)
            {
                errors.push(at(
                    role_ref.name.span(),
                    "role name must be unique, non-empty and without ':'".into(),
                ));
            }
            roles.push(JwtRole {
                name: role_name,
                user_claim: role_ref.user_claim.clone().unwrap_or_else(|| "sub".into()),
                bound_claims: role_ref.bound_claims.clone(),
                policies: role_ref
                    .policies
                    .iter()
                    .map(|p| p.get_ref().clone())
                    .collect(),
            });
        }
        if roles.is_empty() {
            errors.push(at(
                spanned.span(),
                "needs at least one [[jwt_issuer.role]]: a token gets only what a role grants"
                    .into(),
            ));
        }
        issuers.push(Issuer {
            name,
            issuer: r.issuer.get_ref().clone(),
            audiences: audiences.to_vec(),
            algorithms,
            keys,
            leeway,
            roles,
        });
    }
    JwtIssuers { issuers }
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "HS256" | "HS384" | "HS512" => {
            return Err(format!(
                "algorithm {name} is refused: a shared secret lets every verifier mint \
                 tokens, and mixing HMAC with public keys invites key confusion"
            ))
        }
        "none" => return Err("algorithm none is refused: it means no signature".into()),
        other => return Err(format!("unknown algorithm {other:?}")),
    };
    Ok(alg)
}

fn load_pem(path: &PathBuf) -> Result<DecodingKey, String> {
    let pem = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|_| {
            format!(
                "{} is not a PEM public key (RSA, EC or Ed25519)",
                path.display()
            )
        })
}

fn load_jwks(path: &PathBuf) -> Result<Vec<VerifyKey>, String> {
    let text = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a JWKS document: {e}", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            return Err(format!(
                "{}: symmetric (oct) keys are refused",
                path.display()
            ));
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("{}: unusable key: {e}", path.display()))?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("{} holds no keys", path.display()));
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------
// Client certificates (mutual TLS) as app principals.

/// `[[cert_principal]]`: a verified client certificate whose subject matches
/// becomes an app principal carrying `policies`, without a token (like
/// Vault's cert auth method). The certificate was already verified against
/// the CA of the listener it came through (`client_ca`); this only names it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertPrincipal {
    name: Spanned<String>,
    subject_cn: Option<Spanned<String>>,
    san_dns: Option<Spanned<String>>,
    san_uri: Option<Spanned<String>>,
    #[serde(default)]
    policies: Vec<Spanned<String>>,
}

/// Every policy name a `[[cert_principal]]` attaches, with its position,
/// checked like a JWT role's ([`crate::acl`]).
pub(crate) fn cert_policy_refs(
    raw: &[Spanned<RawCertPrincipal>],
) -> Vec<crate::acl::PolicyRef<'_>> {
    raw.iter()
        .flat_map(|c| {
            let c = c.get_ref();
            c.policies.iter().map(move |p| crate::acl::PolicyRef {
                name: p.get_ref(),
                span: p.span(),
                owner: format!("cert_principal {:?}", c.name.get_ref()),
            })
        })
        .collect()
}

/// Every `[[cert_principal]]`, in file order (the first match wins).
#[derive(Debug, Clone, Default)]
pub struct CertPrincipals {
    mappings: Vec<CertMapping>,
}

#[derive(Debug, Clone)]
struct CertMapping {
    name: String,
    matcher: CertMatch,
    policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CertMatch {
    /// The subject's only common name, exactly.
    SubjectCn(String),
    /// One of the DNS subject alternative names, ASCII case-insensitively.
    SanDns(String),
    /// One of the URI subject alternative names (e.g. a SPIFFE ID), exactly.
    SanUri(String),
}

/// What a verified client certificate says about its holder, read once per
/// connection after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Every common name in the subject (matching needs exactly one).
    pub common_names: Vec<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub not_after: SystemTime,
}

impl ClientCert {
    /// Reads the leaf (DER). `None` if it cannot be parsed, which after
    /// rustls verified it means an extension we do not read: no mapping
    /// then, never a guess.
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut common_names = Vec::new();
        for cn in cert.subject().iter_common_name() {
            common_names.push(cn.as_str().ok()?.to_string());
        }
        let mut dns_names = Vec::new();
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    _ => {}
                }
            }
        }
        let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Some(ClientCert {
            common_names,
            dns_names,
            uris,
            not_after: UNIX_EPOCH + Duration::from_secs(secs),
        })
    }
}

impl CertPrincipals {
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The app principal for a verified certificate: named `cert:<name>`
    /// (no HSM user name has a `:`), valid until the certificate expires.
    pub fn principal(&self, cert: &ClientCert) -> Option<Principal> {
        let m = self.mappings.iter().find(|m| match &m.matcher {
            CertMatch::SubjectCn(cn) => cert.common_names.len() == 1 && cert.common_names[0] == *cn,
            CertMatch::SanDns(d) => cert.dns_names.iter().any(|n| n.eq_ignore_ascii_case(d)),
            CertMatch::SanUri(u) => cert.uris.iter().any(|n| n == u),
        })?;
        Some(Principal::app(
            format!("cert:{}", m.name),
            m.policies.clone(),
            cert.not_after,
        ))
    }
}

/// Validates every `[[cert_principal]]`: a unique name, exactly one of
/// `subject_cn`, `san_dns`, `san_uri`.
pub(crate) fn load_cert_principals(
    main: &Source<'_>,
    raw: &[Spanned<RawCertPrincipal>],
    errors: &mut Vec<ConfigError>,
) -> CertPrincipals {
    let mut mappings: Vec<CertMapping> = Vec::new();
    for spanned in raw {
        let r = spanned.get_ref();
        let name = r.name.get_ref().clone();
        let at = |span, msg: &str| main.error_at(span, format!("cert_principal {name:?}: {msg}"));
        if name.is_empty()
            || name.len() > 64
            || name.contains(':')
            || mappings.iter().any(|m| m.name == name)
        {
            errors.push(at(
                r.name.span(),
                "name must be unique, 1 to 64 characters, without ':'",
            ));
        }
        let given: Vec<(CertMatch, &Spanned<String>)> = [
            r.subject_cn
                .as_ref()
                .map(|v| (CertMatch::SubjectCn(v.get_ref().clone()), v)),
            r.san_dns
                .as_ref()
                .map(|v| (CertMatch::SanDns(v.get_ref().clone()), v)),
            r.san_uri
                .as_ref()
                .map(|v| (CertMatch::SanUri(v.get_ref().clone()), v)),
        ]
        .into_iter()
        .flatten()
        .collect();
        match given.as_slice() {
            [(matcher, value)] if !value.get_ref().is_empty() => {
                if mappings.iter().any(|m| m.matcher == *matcher) {
                    errors.push(at(
                        value.span(),
                        "another cert_principal already matches this subject",
                    ));
                }
                mappings.push(CertMapping {
                    name,
                    matcher: matcher.clone(),
                    policies: r.policies.iter().map(|p| p.get_ref().clone()).collect(),
                });
            }
            [(_, value)] => errors.push(at(value.span(), "the subject to match must not be empty")),
            _ => errors.push(at(
                spanned.span(),
                "set exactly one of subject_cn, san_dns, san_uri",
            )),
        }
    }
    CertPrincipals { mappings }
}
