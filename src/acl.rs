//! What an authenticated principal may do on the Transit API: Vault-style
//! path/capability policies (ACLs) from `[[policy]]` tables in `policies/`.
//!
//! A policy is a list of path rules, each granting capabilities (`create`,
//! `read`, `update`, `patch`, `delete`, `list`, `sudo`) or `deny`. A
//! principal carries policy names (a JWT role's `policies`, a crypto user's
//! `[[user_policy]]` binding, a client-certificate subject's mapping); a
//! request is allowed when the principal's policies, taken together, grant
//! the capability the request needs on its path. The rules:
//!
//! 1. **Default deny.** No matching rule, no policies, an unknown method or
//!    a path that is not in canonical form: denied.
//! 2. **Explicit deny wins over everything.** If any rule of any of the
//!    principal's policies that matches the path holds `deny`, the request
//!    is denied, however specific a grant elsewhere is. (Stricter than
//!    Vault, where a more specific grant beats a less specific deny: here a
//!    `deny` can be relied on as a hard floor.)
//! 3. **Most specific match wins** among the other rules, by Vault's
//!    priority order; rules with the same path string in several policies
//!    are merged (their capabilities united), as Vault does.
//!
//! Path patterns: `*` only as the last character (a prefix match that may
//! span segments), `+` only as a whole segment (exactly one non-empty
//! segment). Patterns start with `transit/`: ACLs cover the Transit API
//! only (admin routes are guarded by role and network, token housekeeping is
//! open to any valid token).
//!
//! When no `[[policy]]` is declared at all, ACLs are off and Transit behaves
//! as before they existed (any crypto user or app may use any key); this is
//! [`Acl::enabled`]. `hsmgate check` says which mode a config is in.
//!
//! Compiled once per config snapshot; the merged rule set of each distinct
//! combination of policy names is built on first use and cached for the
//! snapshot's life, so a check is one hash lookup for exact paths plus a
//! scan of that combination's wildcard rules, most specific first.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hyper::Method;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, Source};
use crate::engine::Principal;

/// Longest path pattern; request paths longer than this never match a rule.
const MAX_PATH_LEN: usize = 512;
/// Longest policy name; names appear in audit records and logs.
const MAX_NAME_LEN: usize = 64;
/// Distinct policy-name combinations whose merged rules are cached per
/// snapshot; beyond this they are merged per request (correct, slower).
const MAX_CACHED_SETS: usize = 4096;
/// Names that mean something else already: Vault's built-ins and hsmgate's
/// role names (which lookup-self lists beside the policies).
const RESERVED: [&str; 4] = ["root", "default", "crypto-user", "crypto-officer"];

// ---------------------------------------------------------------------------
// Capabilities

/// One capability, as written in a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Sudo,
    Deny,
}

impl Capability {
    const ALL: [Capability; 8] = [
        Capability::Create,
        Capability::Read,
        Capability::Update,
        Capability::Patch,
        Capability::Delete,
        Capability::List,
        Capability::Sudo,
        Capability::Deny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Patch => "patch",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Deny => "deny",
        }
    }

    fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of capabilities.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps(u8);

impl Caps {
    fn with(self, c: Capability) -> Caps {
        Caps(self.0 | c.bit())
    }
    fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }
    pub fn contains(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }
}

impl fmt::Debug for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                Capability::ALL
                    .iter()
                    .filter(|c| self.contains(**c))
                    .map(|c| c.as_str()),
            )
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Path patterns

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `+`: exactly one non-empty segment.
    Any,
}

/// A compiled rule path.
#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    /// Whole segments, matched one to one.
    segments: Vec<Segment>,
    /// `Some(prefix)` when the pattern ends in `*`: after the segments, the
    /// rest of the path must start with `prefix` (and may contain `/`).
    glob: Option<String>,
    /// Byte offset of the first `+` or `*`; `usize::MAX` for exact paths.
    first_wildcard: usize,
    plus_count: usize,
}

/// Bytes a path segment may hold: those of key names (and of the fixed
/// Transit route words).
fn segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("path must not be empty".into());
        }
        if text.len() > MAX_PATH_LEN {
            return Err(format!("path is longer than {MAX_PATH_LEN} bytes"));
        }
        if let Some(rest) = text.strip_prefix('/') {
            let rest = rest.strip_prefix("v1/").unwrap_or(rest);
            return Err(format!(
                "path must not start with `/`: rules name API paths without `/v1/`, e.g. `{}`",
                rest.chars().take(60).collect::<String>()
            ));
        }
        if let Some(rest) = text.strip_prefix("v1/") {
            return Err(format!(
                "path must not start with `v1/`: rules name API paths without it, e.g. `{}`",
                rest.chars().take(60).collect::<String>()
            ));
        }
        if !text.starts_with("transit/") {
            return Err(
                "path must start with `transit/`: access policies cover the Transit API only"
                    .into(),
            );
        }
        let (body, glob) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err("`*` is allowed only as the last character of a path".into());
        }
        let pieces: Vec<&str> = body.split('/').collect();
        let (full, partial) = if glob {
            // The last piece is the glob's literal prefix (may be empty).
            let (last, full) = pieces
                .split_last()
                .expect("split yields at least one piece");
            (full, Some(*last))
        } else {
            (&pieces[..], None)
        };
        let mut segments = Vec::with_capacity(full.len());
        let mut plus_count = 0;
        for (i, piece) in full.iter().enumerate() {
            let last = i + 1 == full.len() && !glob;
            if *piece == "+" {
                plus_count += 1;
                segments.push(Segment::Any);
                continue;
            }
            if piece.is_empty() && !last {
                return Err("path has an empty segment (`//`)".into());
            }
            check_literal(piece)?;
            segments.push(Segment::Literal(piece.to_string()));
        }
        if let Some(prefix) = partial {
            if prefix == "+" {
                return Err("`+*` is ambiguous: write `+/*` or `*`".into());
            }
            check_literal(prefix)?;
        }
        let first_wildcard = text.find(['+', '*']).unwrap_or(usize::MAX);
        Ok(Pattern {
            text: text.to_string(),
            segments,
            glob: partial.map(str::to_string),
            first_wildcard,
            plus_count,
        })
    }

    fn is_exact(&self) -> bool {
        self.first_wildcard == usize::MAX
    }

    /// Vault's priority order, higher is more specific: the first wildcard
    /// later; no trailing `*`; fewer `+` segments; longer; lexically larger.
    fn priority(&self) -> (usize, bool, std::cmp::Reverse<usize>, usize, &str) {
        (
            self.first_wildcard,
            self.glob.is_none(),
            std::cmp::Reverse(self.plus_count),
            self.text.len(),
            &self.text,
        )
    }

    fn matches(&self, path: &str) -> bool {
        // Quick reject on the literal text before the first wildcard.
        let literal = &self.text[..self.first_wildcard.min(self.text.len())];
        if !path.starts_with(literal) {
            return false;
        }
        let mut rest = Some(path);
        for seg in &self.segments {
            let Some(r) = rest else { return false };
            let (head, tail) = match r.split_once('/') {
                Some((h, t)) => (h, Some(t)),
                None => (r, None),
            };
            let ok = match seg {
                Segment::Literal(l) => head == l,
                Segment::Any => !head.is_empty(),
            };
            if !ok {
                return false;
            }
            rest = tail;
        }
        match (&self.glob, rest) {
            (Some(prefix), Some(r)) => r.starts_with(prefix.as_str()),
            (Some(_), None) => false,
            (None, rest) => rest.is_none(),
        }
    }
}

fn check_literal(piece: &str) -> Result<(), String> {
    if piece.contains('+') {
        return Err("`+` is a wildcard only as a whole segment (`a/+/b`)".into());
    }
    if piece == "." || piece == ".." {
        return Err("path segments `.` and `..` never match: requests are not normalised".into());
    }
    if !piece.bytes().all(segment_byte) {
        return Err(
            "path segments hold only A-Z a-z 0-9 - _ . (key names and route words), `+` and a \
             final `*`"
                .into(),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Policies and the compiled ACL

#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    caps: Caps,
}

#[derive(Debug, Clone)]
struct Policy {
    rules: Vec<Rule>,
}

/// One rule of a merged set: a path string, the union of its capabilities
/// across the principal's policies, and which policies contributed.
#[derive(Debug)]
struct MergedRule {
    pattern: Pattern,
    caps: Caps,
    policies: Vec<String>,
}

/// The rules of one combination of policies.
#[derive(Debug, Default)]
struct Merged {
    exact: HashMap<String, usize>,
    /// Indices into `rules` of wildcard rules, most specific first.
    wildcards: Vec<usize>,
    /// Indices of every rule (exact or not) that holds `deny`.
    denies: Vec<usize>,
    rules: Vec<MergedRule>,
}

/// The ACL of one config snapshot. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Acl {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    policies: BTreeMap<String, Policy>,
    /// `[[user_policy]]`: HSM user name → policy names.
    users: HashMap<String, Vec<String>>,
    /// Merged rule sets by their sorted policy names joined with `\n`.
    cache: RwLock<HashMap<String, Arc<Merged>>>,
}

impl fmt::Debug for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acl")
            .field("policies", &self.inner.policies.keys().collect::<Vec<_>>())
            .field("user_bindings", &self.inner.users.len())
            .finish()
    }
}

/// What a request needs: a capability on a path (`transit/...`, without
/// `/v1/`). A list also accepts rules written without the trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRequest {
    pub path: String,
    pub capability: Capability,
}

/// Why a request was refused (closed set: it is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The principal carries no policy names.
    NoPolicies,
    /// No rule of its policies matches the path.
    NoMatchingRule,
    /// The most specific matching rule lacks the capability.
    CapabilityNotGranted,
    /// A matching rule holds `deny`.
    DenyRule,
    /// The path has `//`, `.`/`..` segments, `%`-escapes or other bytes no
    /// key name holds, or the method maps to no capability.
    NotCanonical,
}

impl DenyReason {
    pub const ALL: [DenyReason; 5] = [
        DenyReason::NoPolicies,
        DenyReason::NoMatchingRule,
        DenyReason::CapabilityNotGranted,
        DenyReason::DenyRule,
        DenyReason::NotCanonical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoPolicies => "no_policies",
            DenyReason::NoMatchingRule => "no_matching_rule",
            DenyReason::CapabilityNotGranted => "capability_not_granted",
            DenyReason::DenyRule => "deny_rule",
            DenyReason::NotCanonical => "not_canonical",
        }
    }
}

/// The verdict, with the rule that decided it (for the audit record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: String,
        policies: Vec<String>,
    },
    Deny {
        reason: DenyReason,
        /// The deciding rule's path, when one matched.
        rule: Option<String>,
        policies: Vec<String>,
    },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    fn deny(reason: DenyReason) -> Decision {
        Decision::Deny {
            reason,
            rule: None,
            policies: Vec::new(),
        }
    }
}

impl Acl {
    /// Whether any `[[policy]]` is declared. When not, Transit is not
    /// path-restricted (the behaviour before ACLs existed).
    pub fn enabled(&self) -> bool {
        !self.inner.policies.is_empty()
    }

    pub fn policy_count(&self) -> usize {
        self.inner.policies.len()
    }

    pub fn user_binding_count(&self) -> usize {
        self.inner.users.len()
    }

    /// The policy names a principal carries: those its JWT role (or
    /// certificate mapping) attached, plus its `[[user_policy]]` binding.
    /// App principals are named `jwt:...` and HSM user names hold no `:`,
    /// so a binding can never attach to an app by accident.
    pub fn policies_of(&self, principal: &Principal) -> Vec<String> {
        let mut names = principal.app_policies.clone();
        if let Some(bound) = self.inner.users.get(&principal.username) {
            names.extend(bound.iter().cloned());
        }
        names
    }

    /// Decides `request` for a principal carrying `policies`.
    pub fn check(&self, policies: &[String], request: &AclRequest) -> Decision {
        let mut known: Vec<&str> = policies
            .iter()
            .map(String::as_str)
            .filter(|p| self.inner.policies.contains_key(*p))
            .collect();
        if known.is_empty() {
            return Decision::deny(DenyReason::NoPolicies);
        }
        known.sort_unstable();
        known.dedup();
        // Policy names hold no newline (validated), so this is unambiguous.
        let merged = self.merged(known.join("\n"), &known);
        // Vault checks a list on `path/`, and since 1.15 also accepts rules
        // written without the slash.
        let bare = (request.capability == Capability::List)
            .then(|| request.path.strip_suffix('/'))
            .flatten();
        let candidates = std::iter::once(request.path.as_str()).chain(bare);
        // Explicit deny first: any matching deny rule, however general.
        for &i in &merged.denies {
            let rule = &merged.rules[i];
            if candidates.clone().any(|p| rule.pattern.matches(p)) {
                return Decision::Deny {
                    reason: DenyReason::DenyRule,
                    rule: Some(rule.pattern.text.clone()),
                    policies: rule.policies.clone(),
                };
            }
        }
        let mut refusal: Option<Decision> = None;
        for path in candidates {
            let Some(rule) = merged.most_specific(path) else {
                continue;
            };
            if rule.caps.contains(request.capability) {
                return Decision::Allow {
                    rule: rule.pattern.text.clone(),
                    policies: rule.policies.clone(),
                };
            }
            refusal.get_or_insert(Decision::Deny {
                reason: DenyReason::CapabilityNotGranted,
                rule: Some(rule.pattern.text.clone()),
                policies: rule.policies.clone(),
            });
        }
        refusal.unwrap_or(Decision::deny(DenyReason::NoMatchingRule))
    }

    fn merged(&self, key: String, names: &[&str]) -> Arc<Merged> {
        let cache = &self.inner.cache;
        if let Some(m) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return m.clone();
        }
        let merged = Arc::new(self.merge(names));
        let mut cache = cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() < MAX_CACHED_SETS {
            cache.insert(key, merged.clone());
        }
        merged
    }

    fn merge(&self, names: &[&str]) -> Merged {
        let mut by_path: BTreeMap<&str, (Pattern, Caps, Vec<String>)> = BTreeMap::new();
        for &name in names {
            let Some(policy) = self.inner.policies.get(name) else {
                continue;
            };
            for rule in &policy.rules {
                let entry = by_path
                    .entry(rule.pattern.text.as_str())
                    .or_insert_with(|| (rule.pattern.clone(), Caps::default(), Vec::new()));
                entry.1 = entry.1.union(rule.caps);
                if !entry.2.iter().any(|n| n == name) {
                    entry.2.push(name.to_string());
                }
            }
        }
        let mut m = Merged::default();
        for (_, (pattern, caps, policies)) in by_path {
            let i = m.rules.len();
            if caps.contains(Capability::Deny) {
                m.denies.push(i);
            }
            if pattern.is_exact() {
                m.exact.insert(pattern.text.clone(), i);
            } else {
                m.wildcards.push(i);
            }
            m.rules.push(MergedRule {
                pattern,
                caps,
                policies,
            });
        }
        let rules = &m.rules;
        m.wildcards.sort_by(|a, b| {
            rules[*b]
                .pattern
                .priority()
                .cmp(&rules[*a].pattern.priority())
        });
        m
    }
}

impl Merged {
    fn most_specific(&self, path: &str) -> Option<&MergedRule> {
        if let Some(&i) = self.exact.get(path) {
            return Some(&self.rules[i]);
        }
        self.wildcards
            .iter()
            .map(|&i| &self.rules[i])
            .find(|r| r.pattern.matches(path))
    }
}

// ---------------------------------------------------------------------------
// From an HTTP request to what it needs

/// The capability and path a Transit request needs, mirroring how
/// `api::transit::handle` routes it (so a capability can never buy a
/// different operation than the one checked). `path` is the raw request
/// path (`/v1/transit/...`); `list` is the handler's own reading of the
/// request as a list; `key_exists` is asked only for the two routes where
/// Vault distinguishes create from update (`keys/:name`, `encrypt/:name`).
///
/// `Err` when the path is not canonical (`//`, `.`/`..`, `%`-escapes, bytes
/// no key name holds) or the method maps to no capability: such requests are
/// denied before any rule is consulted.
pub fn transit_request(
    method: &Method,
    path: &str,
    list: bool,
    key_exists: impl Fn(&str) -> bool,
) -> Result<AclRequest, DenyReason> {
    let rest = path
        .strip_prefix("/v1/")
        .filter(|r| r.starts_with("transit/"))
        .ok_or(DenyReason::NotCanonical)?;
    if !canonical(rest) {
        return Err(DenyReason::NotCanonical);
    }
    let segments: Vec<&str> = rest["transit/".len()..].split('/').collect();
    let on_key_list = matches!(segments.as_slice(), ["keys"] | ["keys", ""]);
    let capability = if method.as_str() == "LIST" || (list && on_key_list) {
        Capability::List
    } else if *method == Method::GET || *method == Method::HEAD {
        Capability::Read
    } else if *method == Method::DELETE {
        Capability::Delete
    } else if *method == Method::PATCH {
        Capability::Patch
    } else if *method == Method::POST || *method == Method::PUT {
        match segments.as_slice() {
            ["keys" | "encrypt", name] if !name.is_empty() && !key_exists(name) => {
                Capability::Create
            }
            _ => Capability::Update,
        }
    } else {
        return Err(DenyReason::NotCanonical);
    };
    let mut path = rest.to_string();
    if capability == Capability::List && !path.ends_with('/') {
        path.push('/');
    }
    Ok(AclRequest { path, capability })
}

/// A request path (without `/v1/`) in the one form rules are written
/// against: segments of key-name bytes, none empty but a trailing one, no
/// `.` or `..`, at most [`MAX_PATH_LEN`] bytes.
fn canonical(path: &str) -> bool {
    if path.len() > MAX_PATH_LEN {
        return false;
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| {
        (i == last || !s.is_empty()) && *s != "." && *s != ".." && s.bytes().all(segment_byte)
    })
}

// ---------------------------------------------------------------------------
// `[[policy]]` and `[[user_policy]]` in policies/*.toml

/// The top-level tables that make a policy file an ACL file.
const ACL_TABLES: [&str; 2] = ["policy", "user_policy"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAclFile {
    #[serde(default)]
    policy: Vec<RawPolicy>,
    #[serde(default)]
    user_policy: Vec<RawUserPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // for people reading the file; kept out of the ACL
    description: String,
    #[serde(default)]
    path: Vec<RawPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    path: Spanned<String>,
    capabilities: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserPolicy {
    user: Spanned<String>,
    policies: Spanned<Vec<Spanned<String>>>,
}

/// A policy-name reference made elsewhere (a JWT role), for [`Loaded::resolve`].
pub(crate) struct PolicyRef<'a> {
    pub name: &'a str,
    pub span: std::ops::Range<usize>,
    /// Who refers, for the message: `jwt_issuer "ci" role "payments"`.
    pub owner: String,
}

/// The ACL files parsed and validated, before references from the main
/// file are resolved.
pub(crate) struct Loaded {
    policies: BTreeMap<String, (Policy, PathBuf, usize)>,
    users: HashMap<String, Vec<String>>,
    /// Whether every ACL file parsed: only then is a missing name missing.
    complete: bool,
}

/// Whether a policy file holds `[[policy]]` or `[[user_policy]]` tables.
/// (Broken TOML is reported by the security-group pass over every file.)
fn is_acl_file(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| ACL_TABLES.iter().any(|k| t.contains_key(*k)))
}

/// Reads every ACL file among the policy files; every problem goes to
/// `errors` with its file, line and column.
pub(crate) fn load(policies: &[(PathBuf, String)], errors: &mut Vec<ConfigError>) -> Loaded {
    let mut loaded = Loaded {
        policies: BTreeMap::new(),
        users: HashMap::new(),
        complete: true,
    };
    let mut files = Vec::new();
    for (path, text) in policies {
        if !is_acl_file(text) {
            continue;
        }
        let source = Source { path, text };
        match toml::from_str::<RawAclFile>(text) {
            Ok(raw) => files.push((source, raw)),
            Err(e) => {
                loaded.complete = false;
                errors.push(source.toml_error(&e));
            }
        }
    }
    for (source, raw) in &files {
        for p in &raw.policy {
            let name = p.name.get_ref();
            // Byte offsets, turned into lines only for a message: computing
            // a line scans the file, and doing it per rule is quadratic.
            let at = p.name.span().start;
            if let Err(problem) = check_policy_name(name) {
                errors.push(source.error_at(p.name.span(), format!("policy name {problem}")));
            }
            let mut rules: Vec<Rule> = Vec::with_capacity(p.path.len());
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for r in &p.path {
                let text = r.path.get_ref();
                let at =
                    |msg: String| source.error_at(r.path.span(), format!("policy `{name}`: {msg}"));
                let pattern = match Pattern::parse(text) {
                    Ok(p) => Some(p),
                    Err(msg) => {
                        errors.push(at(format!("path `{}`: {msg}", clip(text))));
                        None
                    }
                };
                if let Some(first) = seen.get(text.as_str()) {
                    errors.push(at(format!(
                        "path `{}` is already listed in this policy at line {}",
                        clip(text),
                        source_position(source, *first).0
                    )));
                }
                seen.insert(text, r.path.span().start);
                let mut caps = Caps::default();
                for c in r.capabilities.get_ref() {
                    match Capability::parse(c.get_ref()) {
                        Some(cap) => caps = caps.with(cap),
                        None => errors.push(source.error_at(
                            c.span(),
                            format!(
                                "policy `{name}`: unknown capability `{}` (use create, read, \
                                 update, patch, delete, list, sudo or deny)",
                                clip(c.get_ref())
                            ),
                        )),
                    }
                }
                if r.capabilities.get_ref().is_empty() {
                    errors.push(source.error_at(
                        r.capabilities.span(),
                        format!(
                            "policy `{name}`: capabilities must not be empty (write [\"deny\"] \
                             to forbid a path)"
                        ),
                    ));
                }
                if let Some(pattern) = pattern {
                    rules.push(Rule { pattern, caps });
                }
            }
            if let Some((_, first, first_at)) = loaded.policies.get(name) {
                errors.push(source.error_at(
                    p.name.span(),
                    format!(
                        "policy `{}` is already defined at {}:{}",
                        clip(name),
                        first.display(),
                        line_in(&files, first, *first_at)
                    ),
                ));
                continue;
            }
            loaded.policies.insert(
                name.clone(),
                (Policy { rules }, source.path.to_path_buf(), at),
            );
        }
    }
    // Bindings after every policy is known, whichever file defines it.
    let mut bound_at: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for (source, raw) in &files {
        for b in &raw.user_policy {
            let user = b.user.get_ref();
            let at = b.user.span().start;
            if crate::engine::users::validate_username(user).is_err() {
                errors.push(source.error_at(
                    b.user.span(),
                    format!(
                        "user_policy: user `{}` is not a valid HSM user name (1-64 characters \
                         of A-Z a-z 0-9 - _ .)",
                        clip(user)
                    ),
                ));
            }
            if let Some((file, first)) = bound_at.get(user) {
                errors.push(source.error_at(
                    b.user.span(),
                    format!(
                        "user_policy: user `{}` is already bound at {}:{}; list all of \
                         its policies in one binding",
                        clip(user),
                        file.display(),
                        line_in(&files, file, *first)
                    ),
                ));
                continue;
            }
            bound_at.insert(user.clone(), (source.path.to_path_buf(), at));
            if b.policies.get_ref().is_empty() {
                errors.push(source.error_at(
                    b.policies.span(),
                    format!("user_policy: user `{}` binds no policies", clip(user)),
                ));
            }
            let mut names = Vec::new();
            for p in b.policies.get_ref() {
                if !loaded.policies.contains_key(p.get_ref()) && loaded.complete {
                    errors.push(source.error_at(
                        p.span(),
                        format!(
                            "user_policy: user `{}`: unknown policy `{}`{}",
                            clip(user),
                            clip(p.get_ref()),
                            defined(&loaded.policies)
                        ),
                    ));
                }
                names.push(p.get_ref().clone());
            }
            loaded.users.insert(user.clone(), names);
        }
    }
    loaded
}

impl Loaded {
    /// Checks references made from the main file (JWT roles) and builds the
    /// snapshot's ACL. While ACLs are off (no `[[policy]]` at all), role
    /// policy names are labels and are not checked.
    pub(crate) fn resolve(
        self,
        main: &Source<'_>,
        refs: &[PolicyRef<'_>],
        errors: &mut Vec<ConfigError>,
    ) -> Acl {
        if !self.policies.is_empty() && self.complete {
            for r in refs {
                if !self.policies.contains_key(r.name) {
                    errors.push(main.error_at(
                        r.span.clone(),
                        format!(
                            "{}: unknown policy `{}`{}",
                            r.owner,
                            clip(r.name),
                            defined(&self.policies)
                        ),
                    ));
                }
            }
        }
        Acl {
            inner: Arc::new(Inner {
                policies: self
                    .policies
                    .into_iter()
                    .map(|(name, (policy, _, _))| (name, policy))
                    .collect(),
                users: self.users,
                cache: RwLock::new(HashMap::new()),
            }),
        }
    }
}

fn source_position(source: &Source<'_>, offset: usize) -> (usize, usize) {
    crate::config::position(source.text, offset)
}

/// The line of a byte offset in one of the ACL files.
fn line_in(files: &[(Source<'_>, RawAclFile)], path: &Path, offset: usize) -> usize {
    files
        .iter()
        .find(|(s, _)| s.path == path)
        .map_or(1, |(s, _)| source_position(s, offset).0)
}

fn check_policy_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "`{}` must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ .",
            clip(name)
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!(
            "`{name}` is reserved (root, default, crypto-user, crypto-officer): pick another name"
        ));
    }
    Ok(())
}

fn defined(policies: &BTreeMap<String, (Policy, PathBuf, usize)>) -> String {
    const SHOWN: usize = 10;
    if policies.is_empty() {
        return " (no policies are defined)".into();
    }
    let mut names: Vec<String> = policies
        .keys()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect();
    if policies.len() > SHOWN {
        names.push(format!("and {} more", policies.len() - SHOWN));
    }
    format!(" (defined: {})", names.join(", "))
}

/// A value for a message: control characters escaped, cut at 64 characters.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// One line saying which mode the ACL is in, for `hsmgate check` and the
/// startup log: deleting the last policy file switches enforcement off, and
/// an operator must be able to see that.
pub fn describe(acl: &Acl) -> String {
    if acl.enabled() {
        format!(
            "access policies: enforced on Transit ({} policies, {} user bindings; default deny)",
            acl.policy_count(),
            acl.user_binding_count()
        )
    } else {
        "access policies: none declared; Transit is not path-restricted (any crypto user or \
         app may use every key)"
            .to_string()
    }
}

/// Builds an ACL from policy files in memory (tests, benchmarks).
pub fn from_files(files: &[(&Path, &str)]) -> Result<Acl, Vec<ConfigError>> {
    let owned: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (p.to_path_buf(), t.to_string()))
        .collect();
    let mut errors = Vec::new();
    let loaded = load(&owned, &mut errors);
    let main = Source {
        path: Path::new("-"),
        text: "",
    };
    let acl = loaded.resolve(&main, &[], &mut errors);
    if errors.is_empty() {
        Ok(acl)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> Acl {
        from_files(&[(Path::new("acl.toml"), text)]).unwrap_or_else(|e| {
            panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    fn errors(text: &str) -> Vec<String> {
        match from_files(&[(Path::new("acl.toml"), text)]) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn req(path: &str, capability: Capability) -> AclRequest {
        AclRequest {
            path: path.into(),
            capability,
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn allowed(acl: &Acl, policies: &[&str], path: &str, cap: Capability) -> bool {
        acl.check(&names(policies), &req(path, cap)).allowed()
    }

    const APP: &str = r#"
[[policy]]
name = "app"
[[policy.path]]
path = "transit/encrypt/payments-*"
capabilities = ["update"]
[[policy.path]]
path = "transit/decrypt/payments-eu"
capabilities = ["update"]
[[policy.path]]
path = "transit/keys/+"
capabilities = ["read"]
[[policy.path]]
path = "transit/+/+/rotate"
capabilities = ["update"]
"#;

    #[test]
    fn exact_glob_and_segment_wildcards_match() {
        let a = acl(APP);
        use Capability::*;
        assert!(allowed(&a, &["app"], "transit/encrypt/payments-eu", Update));
        assert!(allowed(&a, &["app"], "transit/encrypt/payments-", Update));
        // `*` spans segments, as in Vault.
        assert!(allowed(
            &a,
            &["app"],
            "transit/encrypt/payments-x/y",
            Update
        ));
        assert!(!allowed(&a, &["app"], "transit/encrypt/payment", Update));
        assert!(!allowed(&a, &["app"], "transit/encrypt/other", Update));
        assert!(allowed(&a, &["app"], "transit/decrypt/payments-eu", Update));
        assert!(!allowed(
            &a,
            &["app"],
            "transit/decrypt/payments-eu2",
            Update
        ));
        assert!(!allowed(&a, &["app"], "transit/decrypt/payments-e", Update));
        // `+` is exactly one non-empty segment.
        assert!(allowed(&a, &["app"], "transit/keys/k1", Read));
        assert!(!allowed(&a, &["app"], "transit/keys/k1/rotate", Read));
        assert!(!allowed(&a, &["app"], "transit/keys/", Read));
        assert!(!allowed(&a, &["app"], "transit/keys", Read));
        assert!(allowed(&a, &["app"], "transit/keys/k1/rotate", Update));
        // Capabilities are per rule.
        assert!(!allowed(&a, &["app"], "transit/keys/k1", Update));
        assert!(!allowed(&a, &["app"], "transit/encrypt/payments-eu", Read));
    }

    #[test]
    fn default_deny_without_policies_or_rules() {
        let a = acl(APP);
        let d = a.check(&[], &req("transit/encrypt/payments-eu", Capability::Update));
        assert_eq!(d, Decision::deny(DenyReason::NoPolicies));
        // Unknown names add nothing.
        let d = a.check(
            &names(&["nope"]),
            &req("transit/encrypt/payments-eu", Capability::Update),
        );
        assert_eq!(d, Decision::deny(DenyReason::NoPolicies));
        let d = a.check(&names(&["app"]), &req("transit/hmac/k", Capability::Update));
        assert_eq!(d, Decision::deny(DenyReason::NoMatchingRule));
    }

    #[test]
    fn most_specific_rule_wins_by_vault_priority() {
        let a = acl(r#"
[[policy]]
name = "p"
[[policy.path]]
path = "transit/*"
capabilities = ["update"]
[[policy.path]]
path = "transit/encrypt/*"
capabilities = ["read"]
[[policy.path]]
path = "transit/encrypt/k"
capabilities = ["create"]
[[policy.path]]
path = "transit/+/j"
capabilities = ["list"]
[[policy.path]]
path = "transit/encrypt/+"
capabilities = ["patch"]
"#);
        use Capability::*;
        // Exact beats everything.
        assert!(allowed(&a, &["p"], "transit/encrypt/k", Create));
        assert!(!allowed(&a, &["p"], "transit/encrypt/k", Patch));
        // First wildcard later wins: `transit/encrypt/+` (at 16) over
        // `transit/+/j` (at 8) and the globs.
        assert!(allowed(&a, &["p"], "transit/encrypt/j", Patch));
        assert!(!allowed(&a, &["p"], "transit/encrypt/j", List));
        // Same first-wildcard position: no trailing `*` wins.
        assert!(allowed(&a, &["p"], "transit/sign/j", List));
        assert!(!allowed(&a, &["p"], "transit/sign/j", Update));
        // `transit/encrypt/*` beats `transit/*` on deeper paths.
        assert!(allowed(&a, &["p"], "transit/encrypt/a/b", Read));
        assert!(!allowed(&a, &["p"], "transit/encrypt/a/b", Update));
        assert!(allowed(&a, &["p"], "transit/hmac/x", Update));
    }

    #[test]
    fn priority_order_follows_vault_rules() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        let higher = |a: &str, b: &str| p(a).priority() > p(b).priority();
        // 1. the first wildcard later
        assert!(higher("transit/keys/+", "transit/+/keys"));
        // 2. not ending in `*`
        assert!(higher("transit/keys/+/a", "transit/keys/*"));
        assert!(higher("transit/keys/a", "transit/keys/a*"));
        // 3. fewer `+`
        assert!(higher("transit/+/a/b", "transit/+/+/b"));
        // 4. longer
        assert!(higher("transit/+/abc", "transit/+/ab"));
        // 5. lexically larger
        assert!(higher("transit/+/b", "transit/+/a"));
    }

    #[test]
    fn explicit_deny_wins_over_everything() {
        let a = acl(r#"
[[policy]]
name = "broad"
[[policy.path]]
path = "transit/export/*"
capabilities = ["deny"]
[[policy.path]]
path = "transit/keys/*"
capabilities = ["read", "update"]

[[policy]]
name = "specific"
[[policy.path]]
path = "transit/export/encryption-key/k"
capabilities = ["read"]
[[policy.path]]
path = "transit/keys/k"
capabilities = ["read", "deny"]
"#);
        use Capability::*;
        // Allowed without the deny: the grant is there.
        assert!(allowed(
            &a,
            &["specific"],
            "transit/export/encryption-key/k",
            Read
        ));
        // A broad deny in another policy beats the exact grant.
        let d = a.check(
            &names(&["specific", "broad"]),
            &req("transit/export/encryption-key/k", Read),
        );
        assert_eq!(
            d,
            Decision::Deny {
                reason: DenyReason::DenyRule,
                rule: Some("transit/export/*".into()),
                policies: names(&["broad"]),
            }
        );
        // Deny merged into the same path string denies every capability.
        assert!(allowed(&a, &["broad"], "transit/keys/k", Read));
        assert!(!allowed(&a, &["broad", "specific"], "transit/keys/k", Read));
        assert!(!allowed(
            &a,
            &["broad", "specific"],
            "transit/keys/k",
            Update
        ));
        assert!(allowed(
            &a,
            &["broad", "specific"],
            "transit/keys/j",
            Update
        ));
    }

    #[test]
    fn same_path_in_several_policies_is_merged() {
        let a = acl(r#"
[[policy]]
name = "enc"
[[policy.path]]
path = "transit/+/k"
capabilities = ["update"]
[[policy.path]]
path = "transit/*"
capabilities = ["delete"]
[[policy]]
name = "dec"
[[policy.path]]
path = "transit/+/k"
capabilities = ["read"]
"#);
        assert!(allowed(
            &a,
            &["enc", "dec"],
            "transit/encrypt/k",
            Capability::Update
        ));
        assert!(allowed(
            &a,
            &["enc", "dec"],
            "transit/encrypt/k",
            Capability::Read
        ));
        assert!(!allowed(
            &a,
            &["dec"],
            "transit/encrypt/k",
            Capability::Update
        ));
        // Order and repeats of names do not matter (one cached set).
        assert!(allowed(
            &a,
            &["dec", "enc", "dec"],
            "transit/encrypt/k",
            Capability::Update
        ));
    }

    #[test]
    fn list_matches_with_or_without_the_trailing_slash() {
        for rule in [
            "transit/keys",
            "transit/keys/",
            "transit/keys/*",
            "transit/+/",
        ] {
            let a = acl(&format!(
                "[[policy]]\nname = \"l\"\n[[policy.path]]\npath = \"{rule}\"\ncapabilities = [\"list\"]\n"
            ));
            let r = transit_request(
                &Method::from_bytes(b"LIST").unwrap(),
                "/v1/transit/keys",
                false,
                |_| true,
            )
            .unwrap();
            assert_eq!(r, req("transit/keys/", Capability::List));
            assert!(a.check(&names(&["l"]), &r).allowed(), "{rule}");
            // A list grant is not a read grant.
            assert!(
                !allowed(&a, &["l"], "transit/keys/k", Capability::Read),
                "{rule}"
            );
        }
    }

    #[test]
    fn requests_map_to_vaults_capabilities() {
        let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
        let r = |method: &str, path: &str, list: bool, exists: bool| {
            transit_request(&m(method), path, list, |_| exists)
        };
        let ok = |path: &str, c: Capability| Ok(req(path, c));
        use Capability::*;
        assert_eq!(
            r("POST", "/v1/transit/encrypt/k", false, true),
            ok("transit/encrypt/k", Update)
        );
        assert_eq!(
            r("POST", "/v1/transit/encrypt/k", false, false),
            ok("transit/encrypt/k", Create)
        );
        assert_eq!(
            r("PUT", "/v1/transit/keys/k", false, false),
            ok("transit/keys/k", Create)
        );
        assert_eq!(
            r("POST", "/v1/transit/keys/k", false, true),
            ok("transit/keys/k", Update)
        );
        assert_eq!(
            r("POST", "/v1/transit/keys/k/rotate", false, false),
            ok("transit/keys/k/rotate", Update)
        );
        assert_eq!(
            r("GET", "/v1/transit/keys/k", false, true),
            ok("transit/keys/k", Read)
        );
        assert_eq!(
            r("DELETE", "/v1/transit/keys/k", false, true),
            ok("transit/keys/k", Delete)
        );
        assert_eq!(
            r("GET", "/v1/transit/keys", true, true),
            ok("transit/keys/", List)
        );
        assert_eq!(
            r("LIST", "/v1/transit/keys/", false, true),
            ok("transit/keys/", List)
        );
        // `?list=true` on a key is a read, because the handler reads it:
        // a list grant must never buy a read.
        assert_eq!(
            r("GET", "/v1/transit/keys/k", true, true),
            ok("transit/keys/k", Read)
        );
        assert_eq!(
            r("GET", "/v1/transit/export/encryption-key/k/1", false, true),
            ok("transit/export/encryption-key/k/1", Read)
        );
        assert_eq!(
            r("OPTIONS", "/v1/transit/keys/k", false, true),
            Err(DenyReason::NotCanonical)
        );
    }

    #[test]
    fn non_canonical_request_paths_are_refused() {
        for path in [
            "/v1/transit/encrypt/a/../b",
            "/v1/transit/encrypt/./b",
            "/v1/transit/encrypt//b",
            "/v1/transit//encrypt/b",
            "/v1/transit/encrypt/a%2Fb",
            "/v1/transit/encrypt/%62",
            "/v1/transit/encrypt/b\\x",
            "/v1/transit/encrypt/b;x",
            "/v1//transit/encrypt/b",
            "/v1/sys/health",
        ] {
            assert_eq!(
                transit_request(&Method::POST, path, false, |_| true),
                Err(DenyReason::NotCanonical),
                "{path}"
            );
        }
        assert!(transit_request(&Method::POST, "/v1/transit/encrypt/b", false, |_| true).is_ok());
    }

    #[test]
    fn case_is_significant() {
        let a = acl(APP);
        assert!(!allowed(
            &a,
            &["app"],
            "transit/encrypt/PAYMENTS-eu",
            Capability::Update
        ));
        assert!(!allowed(
            &a,
            &["app"],
            "transit/Encrypt/payments-eu",
            Capability::Update
        ));
    }

    #[test]
    fn user_bindings_attach_policies_to_hsm_users_only() {
        let a = acl(&format!(
            "{APP}\n[[user_policy]]\nuser = \"alice\"\npolicies = [\"app\"]\n"
        ));
        let alice = Principal::app("alice".into(), Vec::new(), std::time::SystemTime::now());
        assert_eq!(a.policies_of(&alice), names(&["app"]));
        let bob = Principal::app("bob".into(), Vec::new(), std::time::SystemTime::now());
        assert!(a.policies_of(&bob).is_empty());
        let jwt = Principal::app(
            "jwt:ci:r:alice".into(),
            names(&["x"]),
            std::time::SystemTime::now(),
        );
        assert_eq!(a.policies_of(&jwt), names(&["x"]));
    }

    #[test]
    fn invalid_policies_are_reported_at_their_lines() {
        let found = errors(
            r#"[[policy]]
name = "a"
[[policy.path]]
path = "transit/encrypt/*/x"
capabilities = ["update"]
[[policy.path]]
path = "transit/encrypt/a+b"
capabilities = ["write"]
[[policy.path]]
path = "/v1/transit/encrypt/k"
capabilities = []
[[policy]]
name = "a"
[[policy]]
name = "default"
[[user_policy]]
user = "alice"
policies = ["nope"]
[[policy.path]]
path = "sys/health"
capabilities = ["read"]
"#,
        );
        let joined = found.join("\n");
        for needle in [
            "acl.toml:4:8: policy `a`: path `transit/encrypt/*/x`: `*` is allowed only as the last",
            "acl.toml:7:8: policy `a`: path `transit/encrypt/a+b`: `+` is a wildcard only",
            "acl.toml:8:17: policy `a`: unknown capability `write`",
            "acl.toml:10:8: policy `a`: path `/v1/transit/encrypt/k`: path must not start with `/`",
            "acl.toml:11:16: policy `a`: capabilities must not be empty",
            "acl.toml:13:8: policy `a` is already defined at acl.toml:2",
            "acl.toml:15:8: policy name `default` is reserved",
            "acl.toml:18:13: user_policy: user `alice`: unknown policy `nope`",
            "acl.toml:20:8: policy `default`: path `sys/health`: path must start with `transit/`",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn bad_globs_are_errors() {
        for (path, needle) in [
            ("transit/enc*rypt", "`*` is allowed only as the last"),
            ("transit/+*", "`+*` is ambiguous"),
            ("transit/a//b", "empty segment"),
            ("transit/../keys", "`.` and `..`"),
            ("transit/a%2Fb", "path segments hold only"),
            ("v1/transit/a", "must not start with `v1/`"),
            ("secret/data/x", "must start with `transit/`"),
            ("", "must not be empty"),
        ] {
            let e = Pattern::parse(path).unwrap_err();
            assert!(e.contains(needle), "{path}: {e}");
        }
        for ok in [
            "transit/*",
            "transit/+/k",
            "transit/keys/",
            "transit/+/+/rotate",
            "transit/encrypt/p-*",
        ] {
            assert!(Pattern::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_user_may_be_bound_once() {
        let found = errors(&format!(
            "{APP}\n[[user_policy]]\nuser = \"al ice\"\npolicies = [\"app\"]\n\
             [[user_policy]]\nuser = \"bob\"\npolicies = [\"app\"]\n\
             [[user_policy]]\nuser = \"bob\"\npolicies = []\n"
        ));
        let joined = found.join("\n");
        assert!(joined.contains("not a valid HSM user name"), "{joined}");
        assert!(
            joined.contains("user `bob` is already bound at acl.toml:"),
            "{joined}"
        );
    }
}
