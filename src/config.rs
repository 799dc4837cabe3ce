//! Configuration: the main file (`config/hsmgate.toml`) and the security
//! groups in `policies/`, parsed and validated as a whole into one immutable
//! [`Config`].
//!
//! Three phases, and every phase reports every problem it can find instead of
//! stopping at the first:
//!
//! 1. **parse**: serde structs that mirror the files (`deny_unknown_fields`),
//!    with [`toml::Spanned`] on every value a later check may point at;
//! 2. **validate**: ranges, names, CIDR syntax, and references between files
//!    (a listener naming a group that no policy file defines);
//! 3. **build**: the typed [`Config`], only when there was no error at all.
//!
//! A structural error (TOML syntax, a misspelled key, a value of the wrong
//! type) stops serde inside *that* file; the other files are still checked.
//! Every [`ConfigError`] names its file and, where it has one, a 1-based line
//! and column. Messages name the key and the problem; they never echo a raw
//! line of the file, only the offending value when it is a short, public
//! thing such as an address.
//!
//! Security groups are default deny: a peer may connect to a listener only
//! if some rule of some group attached to it covers the peer (and the rule's
//! port range, if any, holds the listener's port), and no attached deny list
//! covers it. Prefix lists name reusable network sets, inline or in text
//! files of one CIDR per line. [`crate::netfilter`] compiles all of it into
//! lookup tables. docs/CONFIGURATION.md is the reference.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use crate::engine::Channel;
use toml::Spanned;

/// A validated configuration snapshot. Built only by [`load`] and
/// [`load_from_str`] (or by hand in tests); never changed afterwards: a reload
/// builds a new one and swaps it in whole.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main config file, as given: error messages and `check` name it.
    pub source_path: PathBuf,
    /// Where the engine keeps its store, as written (relative paths are
    /// relative to the working directory; the CLI's `--data-dir` overrides it).
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
    pub tls: TlsConfig,
    pub limits: Limits,
    /// In file order; [`crate::netfilter::Netfilter`] keeps the same order.
    pub listeners: Vec<ListenerConfig>,
    /// Every group defined in any policy file, by name.
    pub groups: BTreeMap<String, SecurityGroup>,
    /// Every prefix list defined in any policy file, by name.
    pub prefix_lists: BTreeMap<String, PrefixList>,
    /// Every deny list defined in any policy file, by name.
    pub deny_lists: BTreeMap<String, DenyList>,
    /// Deny lists checked on every listener (top-level `deny_lists`), before
    /// each listener's own.
    pub global_deny_lists: Vec<String>,
    /// App JWT issuers (`[[jwt_issuer]]`), their keys loaded; see [`crate::auth`].
    pub jwt: crate::auth::JwtIssuers,
    /// Client-certificate subjects mapped to app principals
    /// (`[[cert_principal]]`); see [`crate::auth::CertPrincipals`].
    pub cert_principals: crate::auth::CertPrincipals,
    /// `[audit]`: where the audit log lives, how it syncs, what it records.
    pub audit: crate::audit::AuditConfig,
    /// `[metrics]`: the Prometheus listener.
    pub metrics: crate::metrics::MetricsConfig,
    /// `[[policy]]` and `[[user_policy]]` from the policy files, compiled;
    /// see [`crate::acl`]. Off (no policies) unless some file declares one.
    pub acl: crate::acl::Acl,
    /// `[bench] dangerous_unfenced_listener`: a benchmark-only plain-HTTP
    /// listener serving Transit WITHOUT the fence (see
    /// [`crate::gateway::dangerous_unfenced_bench`]). `None` unless set;
    /// validation admits only loopback addresses.
    pub dangerous_unfenced_listener: Option<SocketAddr>,
    /// `[cluster]`: this node is a member of a replicated cluster of engine
    /// nodes (see [`crate::cluster`], docs/CLUSTER.md). `None`: a single node.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// `[upstream]`: this server is a gateway without an engine, forwarding
    /// to remote engine nodes (see [`crate::upstream`]). `None`: the
    /// built-in engine answers.
    pub upstream: Option<crate::upstream::UpstreamConfig>,
}

/// Login-failure thresholds and session lifetime for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The Nth consecutive failed crypto-officer login zeroizes the engine.
    /// Small on purpose: this is the HSM behaviour hsmgate exists to guard.
    pub zeroize_after_failures: u32,
    /// The Nth consecutive failed crypto-user login locks that user.
    pub lock_user_after_failures: u32,
    /// The login guard: once a crypto officer has this many attempts (or
    /// fewer) left before zeroization, front-door logins are refused
    /// unchecked and only break-glass may spend the rest. Always below
    /// `zeroize_after_failures`; 0 turns the guard off.
    pub login_guard_reserve: u32,
    /// How long an HSM session token stays valid.
    pub session_ttl: Duration,
    /// The password policy's minimum length (characters). Never below
    /// [`crate::engine::users::MIN_PASSWORD_LEN`]: below that an offline
    /// guess of a stolen hash is cheap even with argon2id.
    pub min_password_length: usize,
    /// Where the store's key-encryption key comes from (`seal`,
    /// `shamir_threshold`, `shamir_shares`); see `crate::engine::seal`.
    pub seal: crate::engine::seal::SealMode,
    /// `[backup]`: who backups are for and whose backups restore.
    pub backup: BackupConfig,
    /// `non_exportable_is_final`: a key created without `exportable` (or
    /// `allow_plaintext_backup`) can never be given it later, as PKCS#11's
    /// `CKA_EXTRACTABLE = false`. Off by default: Vault lets
    /// `keys/:name/config` turn both on.
    pub non_exportable_is_final: bool,
    /// `auto_rotate_check_seconds`: how often the server looks for keys
    /// whose `auto_rotate_period` has elapsed. A key rotates at most this
    /// long after it is due; periods are at least an hour, so the bound
    /// keeps the delay small against any period.
    pub auto_rotate_check_interval: Duration,
}

/// `[backup]` (docs/BACKUP.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// The custodian's X25519 public key: backups are encrypted to it.
    pub custodian_public_key: Option<[u8; 32]>,
    /// Ed25519 PKCS#8 file (0600) this server signs backups with.
    pub signing_key_file: Option<PathBuf>,
    /// Ed25519 public keys whose backups this server restores (pinned).
    pub trusted_signers: Vec<[u8; 32]>,
    /// Scheduled backups: write one into this directory every `interval`.
    pub schedule_dir: Option<PathBuf>,
    pub schedule_interval: Duration,
    /// How many scheduled backups to keep (oldest removed first).
    pub schedule_keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            custodian_public_key: None,
            signing_key_file: None,
            trusted_signers: Vec::new(),
            schedule_dir: None,
            schedule_interval: Duration::from_secs(86_400),
            schedule_keep: 7,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            zeroize_after_failures: 3,
            lock_user_after_failures: 5,
            login_guard_reserve: 1,
            session_ttl: Duration::from_secs(3600),
            min_password_length: crate::engine::users::MIN_PASSWORD_LEN,
            seal: crate::engine::seal::SealMode::Auto,
            backup: BackupConfig::default(),
            non_exportable_is_final: false,
            auto_rotate_check_interval: Duration::from_secs(60),
        }
    }
}

/// Where the listeners' certificate comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, resolved against the config file's directory.
    /// `None` (together with `key_file`): a self-signed certificate is
    /// generated in the data dir.
    pub cert_file: Option<PathBuf>,
    /// PEM private key, resolved against the config file's directory. Config
    /// holds the path, never the key; whoever reads it checks its permissions.
    pub key_file: Option<PathBuf>,
}

/// Bounds on what an (admitted) peer may make the server hold or wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted; bounds memory per request.
    pub max_body_bytes: usize,
    /// Largest request head accepted; bounds memory before routing.
    pub max_header_bytes: usize,
    /// Time allowed to send the request head (slowloris).
    pub header_read_timeout: Duration,
    /// Time allowed to finish the TLS handshake after accept.
    pub tls_handshake_timeout: Duration,
    /// Rate limits, connection caps and the idle timeout, from the policy
    /// file with `[rate_limits]` (see [`crate::ratelimit`]).
    pub rate: crate::ratelimit::RateLimitPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            rate: crate::ratelimit::RateLimitPolicy::default(),
        }
    }
}

/// One listening socket and the groups that guard it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique; names the listener in logs and metrics.
    pub name: String,
    /// An IP literal and port; never a host name, so what is bound is what
    /// was reviewed.
    pub address: SocketAddr,
    /// Who may connect at all: the union of these groups' rules. Never empty.
    pub security_groups: Vec<String>,
    /// Who may use admin routes and log in as crypto officer. A peer must
    /// also be admitted by `security_groups` (it has to connect first), so
    /// the effective admin networks are the intersection of the two.
    pub admin_groups: Vec<String>,
    /// Which door this is. Logins through a break-glass listener may spend
    /// the attempts the login guard keeps back from the front door.
    pub channel: Channel,
    /// Per-route-class narrowing (`None`: every peer the listener admits).
    /// The admin class is `admin_groups` above.
    pub transit_groups: Option<Vec<String>>,
    pub login_groups: Option<Vec<String>>,
    pub health_groups: Option<Vec<String>>,
    /// Deny lists checked on this listener, after the global ones and before
    /// any allow rule: a listed peer is refused whatever the groups say.
    pub deny_lists: Vec<String>,
    /// Groups naming the proxies whose word about the client address is
    /// believed (`forwarded` says how they give it). Empty: nobody's.
    pub trusted_proxy_groups: Vec<String>,
    /// How a trusted proxy passes the client address on this listener.
    pub forwarded: Forwarded,
    /// Mutual TLS: the CA that signs client certificates and whether one is
    /// required. `None`: no client certificate is asked for.
    pub client_auth: Option<ClientAuth>,
}

/// How trusted proxies pass on the client's address. One mechanism per
/// listener, so there is never a question which of two claims wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forwarded {
    /// Neither: the TCP peer is the client.
    #[default]
    None,
    /// `X-Forwarded-For` from a trusted proxy: the client is the address
    /// `hops` from the right (the last `hops - 1` entries were appended by
    /// further trusted proxies in the chain).
    XForwardedFor { hops: u8 },
    /// A PROXY protocol v1/v2 header, read before the TLS handshake.
    ProxyProtocol,
}

/// A listener's client-certificate requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM file of the CA certificate(s) client certificates must chain to,
    /// resolved against the config file's directory.
    pub ca_file: PathBuf,
    /// `true` (`client_auth = "required"`): no certificate, no handshake.
    /// `false` (`"optional"`): a certificate, when sent, must still verify.
    pub required: bool,
}

/// A named set of allow rules (AWS-style security group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroup {
    pub name: String,
    pub description: String,
    /// May be empty: such a group simply admits nobody.
    pub rules: Vec<Rule>,
}

/// One rule of a security group (allow) or a deny list (deny): a source,
/// optionally limited to listeners bound to some ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub source: RuleSource,
    /// AWS-style: the rule applies only on listeners whose bound port is in
    /// this range. `None`: every listener the group is attached to.
    pub ports: Option<PortRange>,
    /// Why this network is allowed (or denied); for the reader and the audit trail.
    pub description: String,
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// A network without host bits. Never an IPv4-mapped IPv6 network: peers
    /// of that form are matched as IPv4, so rules are written as IPv4.
    Net(IpNet),
    /// Every network of the named prefix list (validated to exist).
    PrefixList(String),
}

/// The network itself, or `prefix_list:<name>`.
impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSource::Net(net) => write!(f, "{net}"),
            RuleSource::PrefixList(name) => write!(f, "prefix_list:{name}"),
        }
    }
}

/// An inclusive range of TCP ports, `first <= last`, both non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A named, reusable set of networks: written inline (`cidrs`) or kept in a
/// plain-text file of one CIDR per line (`file`), for imported lists of
/// millions of entries.
#[derive(Clone, PartialEq, Eq)]
pub struct PrefixList {
    pub name: String,
    pub description: String,
    /// The text file it was read from, if any (for messages).
    pub file: Option<PathBuf>,
    /// Validated networks (no host bits, no mapped form). Shared: a list of a
    /// million entries is not copied when the config is.
    pub nets: std::sync::Arc<[IpNet]>,
}

/// Counts only: a list can hold millions of networks.
impl fmt::Debug for PrefixList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixList")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("nets", &self.nets.len())
            .finish()
    }
}

/// A named list of deny rules (like a network ACL), checked before any
/// allow rule: a peer it covers is refused even inside an allowed network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyList {
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
}

/// Every problem found in a config tree; `Display` prints one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ConfigError::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem, with its position. `Display`: `path:line:column: message`,
/// or `path: message` when the problem has no position (an unreadable file).
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "{file}:{line}:{column}: {}", self.message),
            (Some(line), None) => write!(f, "{file}:{line}: {}", self.message),
            _ => write!(f, "{file}: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Loads the config file and every policy file it points at, validates all
/// of it, and returns every error found (not just the first).
///
/// `policies_dir` is resolved against the config file's directory; every
/// `*.toml` in it (not recursive, dotfiles skipped) that has a `[group.*]`
/// table is read as a security-group file. Other `*.toml` files there belong
/// to other parts of hsmgate and are only checked for TOML syntax.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    let main = Source { path, text: &text };
    let mut errors = Vec::new();
    let raw = parse::<RawConfig>(&main, &mut errors);
    let mut policies = Vec::new();
    let mut policies_complete = true;
    if let Some(raw) = &raw {
        policies_complete = match &raw.policies_dir {
            None => {
                errors.push(main.error(
                    "policies_dir is required: the directory holding the security groups \
                     (relative to this file's directory)",
                ));
                false
            }
            Some(dir) => read_policies_dir(&main, dir, &mut policies, &mut errors),
        };
    }
    assemble(
        &main,
        raw,
        &policies,
        policies_complete,
        FsChecks::Yes,
        errors,
    )
}

/// Same as [`load`], for config text already in memory plus policy files
/// given as `(path for messages, text)`. `policies_dir` is ignored; TLS file
/// paths are resolved but not checked on disk.
pub fn load_from_str(
    path_for_messages: &Path,
    text: &str,
    policies: &[(PathBuf, String)],
) -> Result<Config, ConfigErrors> {
    let main = Source {
        path: path_for_messages,
        text,
    };
    let mut errors = Vec::new();
    let raw = parse::<RawConfig>(&main, &mut errors);
    assemble(&main, raw, policies, true, FsChecks::No, errors)
}

// ---------------------------------------------------------------------------
// Phase 1: the files, as serde sees them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    policies_dir: Option<Spanned<String>>,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    deny_lists: Vec<Spanned<String>>,
    #[serde(default)]
    jwt_issuer: Vec<Spanned<crate::auth::RawIssuer>>,
    #[serde(default)]
    cert_principal: Vec<Spanned<crate::auth::RawCertPrincipal>>,
    #[serde(default)]
    audit: RawAudit,
    /// Absent: no metrics listener (the shipped config has the section).
    metrics: Option<RawMetrics>,
    #[serde(default)]
    backup: RawBackup,
    #[serde(default)]
    bench: RawBench,
    cluster: Option<Spanned<RawCluster>>,
    upstream: Option<Spanned<RawUpstream>>,
}

/// `[upstream]`: a gateway without an engine, forwarding to engine nodes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    nodes: Spanned<Vec<Spanned<RawUpstreamNode>>>,
    ca_file: Spanned<String>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    health_interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamNode {
    id: Spanned<i64>,
    address: Spanned<String>,
    server_name: Option<Spanned<String>>,
}

/// `[cluster]`: engine-node membership of a replicated cluster.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    node_id: Spanned<i64>,
    address: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    ca_file: Spanned<String>,
    cert_file: Spanned<String>,
    key_file: Spanned<String>,
    security_groups: Spanned<Vec<Spanned<String>>>,
    heartbeat_ms: Option<Spanned<i64>>,
    election_timeout_ms: Option<Spanned<Vec<i64>>>,
}

/// `[bench]`: benchmark-only switches. Off unless set.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBench {
    dangerous_unfenced_listener: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    custodian_public_key: Option<Spanned<String>>,
    signing_key_file: Option<Spanned<String>>,
    #[serde(default)]
    trusted_signers: Vec<Spanned<String>>,
    schedule_dir: Option<Spanned<String>>,
    schedule_interval_seconds: Option<Spanned<i64>>,
    schedule_keep: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<Spanned<String>>,
    fsync: Option<Spanned<String>>,
    batch_interval_ms: Option<Spanned<i64>>,
    key_use: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    address: Option<Spanned<String>>,
    security_groups: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    data_dir: Option<Spanned<String>>,
    zeroize_after_failures: Option<Spanned<i64>>,
    lock_user_after_failures: Option<Spanned<i64>>,
    login_guard_reserve: Option<Spanned<i64>>,
    session_ttl_seconds: Option<Spanned<i64>>,
    min_password_length: Option<Spanned<i64>>,
    seal: Option<Spanned<String>>,
    shamir_threshold: Option<Spanned<i64>>,
    shamir_shares: Option<Spanned<i64>>,
    non_exportable_is_final: Option<bool>,
    auto_rotate_check_seconds: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<i64>>,
    header_read_timeout_ms: Option<Spanned<i64>>,
    tls_handshake_timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Spanned<String>,
    security_groups: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    admin_groups: Vec<Spanned<String>>,
    channel: Option<Spanned<String>>,
    transit_groups: Option<Vec<Spanned<String>>>,
    login_groups: Option<Vec<Spanned<String>>>,
    health_groups: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    deny_lists: Vec<Spanned<String>>,
    #[serde(default)]
    trusted_proxy_groups: Vec<Spanned<String>>,
    xff_hops: Option<Spanned<i64>>,
    proxy_protocol: Option<Spanned<bool>>,
    client_ca: Option<Spanned<String>>,
    client_auth: Option<Spanned<String>>,
}

/// A policy file that defines groups, prefix lists or deny lists. Strict at
/// the top level too: such a file holds these and nothing else, so a
/// misspelled section there is an error rather than silently ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyFile {
    #[serde(default)]
    group: BTreeMap<Spanned<String>, RawGroup>,
    #[serde(default)]
    prefix_list: BTreeMap<Spanned<String>, RawPrefixList>,
    #[serde(default)]
    deny_list: BTreeMap<Spanned<String>, RawGroup>,
}

/// The top-level tables that make a `policies/*.toml` file ours.
const FENCE_TABLES: [&str; 3] = ["group", "prefix_list", "deny_list"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    description: String,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    source: Option<Spanned<String>>,
    prefix_list: Option<Spanned<String>>,
    ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefixList {
    #[serde(default)]
    description: String,
    cidrs: Option<Vec<Spanned<String>>>,
    file: Option<Spanned<String>>,
}

/// One file's text, so spans can become line:column.
pub(crate) struct Source<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    pub(crate) fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub(crate) fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = position(self.text, span.start);
        ConfigError {
            file: self.path.to_path_buf(),
            line: Some(line),
            column: Some(column),
            message: message.into(),
        }
    }

    fn line_of(&self, span: Range<usize>) -> usize {
        position(self.text, span.start).0
    }

    /// toml's own `Display` quotes the source line; only its message is kept.
    pub(crate) fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let message = error.message().trim().replace('\n', "; ");
        match error.span() {
            Some(span) => self.error_at(span, message),
            None => self.error(message),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn parse<T: DeserializeOwned>(source: &Source<'_>, errors: &mut Vec<ConfigError>) -> Option<T> {
    match toml::from_str::<T>(source.text) {
        Ok(value) => Some(value),
        Err(e) => {
            errors.push(source.toml_error(&e));
            None
        }
    }
}

/// Reads every candidate policy file; problems with the directory itself are
/// reported at the `policies_dir` key, problems with a file against the file.
/// Returns whether every candidate was read.
fn read_policies_dir(
    main: &Source<'_>,
    dir: &Spanned<String>,
    policies: &mut Vec<(PathBuf, String)>,
    errors: &mut Vec<ConfigError>,
) -> bool {
    let resolved = base_dir(main.path).join(dir.get_ref());
    let problem = match fs::metadata(&resolved) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some("is not a directory".to_string()),
        Err(e) => Some(format!("cannot be read: {e}")),
    };
    if let Some(problem) = problem {
        errors.push(main.error_at(
            dir.span(),
            format!(
                "policies_dir {} (resolved to {}) {problem}",
                quoted(dir.get_ref()),
                resolved.display()
            ),
        ));
        return false;
    }
    let entries = match fs::read_dir(&resolved) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(main.error_at(
                dir.span(),
                format!("policies_dir {}: cannot list: {e}", resolved.display()),
            ));
            return false;
        }
    };
    let mut complete = true;
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // Dotfiles include editor lock files such as Emacs's `.#x.toml`.
                if name.starts_with('.') || path.extension().is_none_or(|e| e != "toml") {
                    continue;
                }
                // A directory that happens to end in .toml is not a policy file.
                if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                paths.push(path);
            }
            Err(e) => {
                complete = false;
                errors.push(main.error_at(
                    dir.span(),
                    format!("policies_dir {}: cannot list: {e}", resolved.display()),
                ));
            }
        }
    }
    // Sorted, so errors and "already defined at" point the same way every run.
    paths.sort();
    for path in paths {
        match fs::read_to_string(&path) {
            Ok(text) => policies.push((path, text)),
            Err(e) => {
                complete = false;
                errors.push(ConfigError {
                    file: path,
                    line: None,
                    column: None,
                    message: format!("cannot read the policy file: {e}"),
                });
            }
        }
    }
    complete
}

/// The directory relative paths in the config file are resolved against.
fn base_dir(config_path: &Path) -> &Path {
    config_path.parent().unwrap_or(Path::new(""))
}

// ---------------------------------------------------------------------------
// Phases 2 and 3: validate, then build.

#[derive(Clone, Copy, PartialEq, Eq)]
enum FsChecks {
    /// Check that referenced files exist (`load`).
    Yes,
    /// Config text in memory: resolve paths but do not touch the disk.
    No,
}

const ZEROIZE_AFTER_FAILURES: RangeInclusive<i64> = 1..=10;
const LOGIN_GUARD_RESERVE: RangeInclusive<i64> = 0..=9;
const LOCK_USER_AFTER_FAILURES: RangeInclusive<i64> = 1..=100;
/// The longest a session token may live (`engine.session_ttl_seconds`).
pub const MAX_SESSION_TTL_SECS: u64 = 86_400;
const SESSION_TTL_SECONDS: RangeInclusive<i64> = 60..=MAX_SESSION_TTL_SECS as i64;
const MIN_PASSWORD_LENGTH: RangeInclusive<i64> = 8..=128;
/// Up to an hour (the shortest `auto_rotate_period`): a longer check would
/// let a key outlive its period by more than the period itself.
const AUTO_ROTATE_CHECK_SECONDS: RangeInclusive<i64> = 1..=3600;
const MAX_BODY_BYTES: RangeInclusive<i64> = 1..=67_108_864;
const MAX_HEADER_BYTES: RangeInclusive<i64> = 1024..=1_048_576;
const TIMEOUT_MS: RangeInclusive<i64> = 100..=600_000;

/// Longest listener or group name; names end up in logs and metric labels.
const MAX_NAME_LEN: usize = 64;

fn assemble(
    main: &Source<'_>,
    raw: Option<RawConfig>,
    policies: &[(PathBuf, String)],
    policies_complete: bool,
    fs_checks: FsChecks,
    mut errors: Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let (fence, parsed_all) = security_groups(policies, &mut errors);
    // Whether a group missing from `groups` is really undefined, rather than
    // in a file that could not be read or parsed.
    let groups_complete = policies_complete && parsed_all;
    let rate = rate_limit_policy(policies, &mut errors);
    let acl = crate::acl::load(policies, &mut errors);

    let config = raw.map(|raw| {
        let engine_defaults = EngineConfig::default();
        let limit_defaults = Limits::default();
        let e = &raw.engine;
        let engine = EngineConfig {
            zeroize_after_failures: bounded(
                main,
                &mut errors,
                "engine.zeroize_after_failures",
                &e.zeroize_after_failures,
                ZEROIZE_AFTER_FAILURES,
            )
            .unwrap_or(engine_defaults.zeroize_after_failures),
            lock_user_after_failures: bounded(
                main,
                &mut errors,
                "engine.lock_user_after_failures",
                &e.lock_user_after_failures,
                LOCK_USER_AFTER_FAILURES,
            )
            .unwrap_or(engine_defaults.lock_user_after_failures),
            login_guard_reserve: bounded(
                main,
                &mut errors,
                "engine.login_guard_reserve",
                &e.login_guard_reserve,
                LOGIN_GUARD_RESERVE,
            )
            .unwrap_or(engine_defaults.login_guard_reserve),
            session_ttl: bounded(
                main,
                &mut errors,
                "engine.session_ttl_seconds",
                &e.session_ttl_seconds,
                SESSION_TTL_SECONDS,
            )
            .map(Duration::from_secs)
            .unwrap_or(engine_defaults.session_ttl),
            min_password_length: bounded(
                main,
                &mut errors,
                "engine.min_password_length",
                &e.min_password_length,
                MIN_PASSWORD_LENGTH,
            )
            .unwrap_or(engine_defaults.min_password_length),
            seal: seal_mode(main, &mut errors, e),
            backup: backup_config(main, &mut errors, &raw.backup),
            non_exportable_is_final: e
                .non_exportable_is_final
                .unwrap_or(engine_defaults.non_exportable_is_final),
            auto_rotate_check_interval: bounded(
                main,
                &mut errors,
                "engine.auto_rotate_check_seconds",
                &e.auto_rotate_check_seconds,
                AUTO_ROTATE_CHECK_SECONDS,
            )
            .map(Duration::from_secs)
            .unwrap_or(engine_defaults.auto_rotate_check_interval),
        };
        if engine.login_guard_reserve >= engine.zeroize_after_failures {
            let span = e
                .login_guard_reserve
                .as_ref()
                .or(e.zeroize_after_failures.as_ref())
                .map(|v| v.span());
            let message = format!(
                "engine.login_guard_reserve ({}) must be below engine.zeroize_after_failures ({}): \
                 otherwise the front door could never log the crypto officer in",
                engine.login_guard_reserve, engine.zeroize_after_failures
            );
            errors.push(match span {
                Some(span) => main.error_at(span, message),
                None => main.error(message),
            });
        }
        let data_dir = match &e.data_dir {
            None => PathBuf::from("./data"),
            Some(dir) if dir.get_ref().trim().is_empty() => {
                errors.push(main.error_at(dir.span(), "engine.data_dir must not be empty"));
                PathBuf::new()
            }
            Some(dir) => PathBuf::from(dir.get_ref()),
        };

        let l = &raw.limits;
        let limits = Limits {
            max_body_bytes: bounded(
                main,
                &mut errors,
                "limits.max_body_bytes",
                &l.max_body_bytes,
                MAX_BODY_BYTES,
            )
            .unwrap_or(limit_defaults.max_body_bytes),
            max_header_bytes: bounded(
                main,
                &mut errors,
                "limits.max_header_bytes",
                &l.max_header_bytes,
                MAX_HEADER_BYTES,
            )
            .unwrap_or(limit_defaults.max_header_bytes),
            header_read_timeout: bounded(
                main,
                &mut errors,
                "limits.header_read_timeout_ms",
                &l.header_read_timeout_ms,
                TIMEOUT_MS,
            )
            .map(Duration::from_millis)
            .unwrap_or(limit_defaults.header_read_timeout),
            tls_handshake_timeout: bounded(
                main,
                &mut errors,
                "limits.tls_handshake_timeout_ms",
                &l.tls_handshake_timeout_ms,
                TIMEOUT_MS,
            )
            .map(Duration::from_millis)
            .unwrap_or(limit_defaults.tls_handshake_timeout),
            rate: rate.clone(),
        };
        let jwt = crate::auth::load_issuers(main, &raw.jwt_issuer, &mut errors);
        let mut policy_refs = crate::auth::policy_refs(&raw.jwt_issuer);
        policy_refs.extend(crate::auth::cert_policy_refs(&raw.cert_principal));
        let acl = acl.resolve(main, &policy_refs, &mut errors);

        let tls = tls(main, &raw.tls, fs_checks, &mut errors);
        let listeners = listeners(
            main,
            &raw.listener,
            &fence,
            groups_complete,
            fs_checks,
            &mut errors,
        );
        let cert_principals =
            crate::auth::load_cert_principals(main, &raw.cert_principal, &mut errors);
        if !cert_principals.is_empty() && listeners.iter().all(|l| l.client_auth.is_none()) {
            errors.push(main.error_at(
                raw.cert_principal[0].span(),
                "cert_principal is defined but no listener sets client_ca: \
                 no client certificate would ever be asked for",
            ));
        }
        let global_deny_lists = deny_list_refs(
            main,
            "deny_lists",
            &raw.deny_lists,
            &fence,
            groups_complete,
            &mut errors,
        );
        let audit = audit_section(main, &raw.audit, &mut errors);
        let dangerous_unfenced_listener = bench_section(main, &raw.bench, &mut errors);
        let cluster = raw.cluster.as_ref().and_then(|c| {
            cluster_section(
                main,
                c,
                &engine,
                &fence.groups,
                groups_complete,
                fs_checks,
                &mut errors,
            )
        });
        let upstream = raw.upstream.as_ref().and_then(|u| {
            let engine_side = [
                (
                    acl.enabled(),
                    "access policies ([[policy]], [[user_policy]])",
                ),
                (!jwt.is_empty(), "[[jwt_issuer]]"),
                (!cert_principals.is_empty(), "[[cert_principal]]"),
                (
                    dangerous_unfenced_listener.is_some(),
                    "[bench] dangerous_unfenced_listener",
                ),
            ];
            for (declared, what) in engine_side {
                if declared {
                    // Silently unenforced rules are worse than none.
                    errors.push(main.error_at(
                        u.span(),
                        format!(
                            "[upstream] with {what}: a gateway forwards identity to the engine \
                             nodes, which enforce it; declare it in the nodes' config"
                        ),
                    ));
                }
            }
            upstream_section(
                main,
                u,
                raw.cluster.is_some(),
                &listeners,
                fs_checks,
                &mut errors,
            )
        });
        let metrics = match &raw.metrics {
            Some(m) => metrics_section(main, m, &fence.groups, groups_complete, &mut errors),
            None => crate::metrics::MetricsConfig::default(),
        };
        Config {
            source_path: main.path.to_path_buf(),
            data_dir,
            engine,
            tls,
            limits,
            listeners,
            groups: BTreeMap::new(),
            prefix_lists: BTreeMap::new(),
            deny_lists: BTreeMap::new(),
            global_deny_lists,
            jwt,
            cert_principals,
            audit,
            metrics,
            acl,
            dangerous_unfenced_listener,
            cluster,
            upstream,
        }
    });

    if errors.is_empty() {
        if let Some(mut config) = config {
            config.groups = fence
                .groups
                .into_iter()
                .map(|(name, defined)| (name, defined.group))
                .collect();
            config.prefix_lists = fence
                .prefix_lists
                .into_iter()
                .map(|(name, (list, _, _))| (name, list))
                .collect();
            config.deny_lists = fence
                .deny_lists
                .into_iter()
                .map(|(name, (list, _, _))| (name, list))
                .collect();
            return Ok(config);
        }
    }
    sort_errors(&mut errors, main.path, policies);
    Err(ConfigErrors(errors))
}

/// The rate-limit policy from the one policy file with `[rate_limits]`, or
/// the defaults; parsing lives in [`crate::ratelimit`].
fn rate_limit_policy(
    policies: &[(PathBuf, String)],
    errors: &mut Vec<ConfigError>,
) -> crate::ratelimit::RateLimitPolicy {
    let mut found: Option<&Path> = None;
    let mut policy = crate::ratelimit::RateLimitPolicy::default();
    for (path, text) in policies {
        if !crate::ratelimit::is_rate_limit_file(text) {
            continue;
        }
        let source = Source { path, text };
        if let Some(first) = found {
            errors.push(source.error(format!(
                "[rate_limits] is already defined in {}",
                first.display()
            )));
            continue;
        }
        found = Some(path);
        if let Some(p) = crate::ratelimit::load_policy(&source, errors) {
            policy = p;
        }
    }
    policy
}

/// `[backup]`: keys are base64 of the raw 32-byte public keys.
fn backup_config(
    main: &Source<'_>,
    errors: &mut Vec<ConfigError>,
    raw: &RawBackup,
) -> BackupConfig {
    use base64::Engine as _;
    let mut key32 = |what: &str, v: &Spanned<String>| -> Option<[u8; 32]> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v.get_ref().trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
        if decoded.is_none() {
            errors.push(main.error_at(
                v.span(),
                format!("backup.{what} must be base64 of a 32-byte public key (hsmgate backup-keygen prints it)"),
            ));
        }
        decoded
    };
    let custodian_public_key = raw
        .custodian_public_key
        .as_ref()
        .and_then(|v| key32("custodian_public_key", v));
    let trusted_signers = raw
        .trusted_signers
        .iter()
        .filter_map(|v| key32("trusted_signers", v))
        .collect();
    let signing_key_file = match &raw.signing_key_file {
        Some(v) if v.get_ref().trim().is_empty() => {
            errors.push(main.error_at(v.span(), "backup.signing_key_file must not be empty"));
            None
        }
        Some(v) => Some(base_dir(main.path).join(v.get_ref())),
        None => None,
    };
    let defaults = BackupConfig::default();
    let schedule_interval = bounded(
        main,
        errors,
        "backup.schedule_interval_seconds",
        &raw.schedule_interval_seconds,
        1..=31_536_000,
    )
    .map(Duration::from_secs)
    .unwrap_or(defaults.schedule_interval);
    let schedule_keep = bounded(
        main,
        errors,
        "backup.schedule_keep",
        &raw.schedule_keep,
        1..=10_000,
    )
    .unwrap_or(defaults.schedule_keep);
    let schedule_dir = match &raw.schedule_dir {
        Some(v) if v.get_ref().trim().is_empty() => {
            errors.push(main.error_at(v.span(), "backup.schedule_dir must not be empty"));
            None
        }
        Some(v) => {
            if custodian_public_key.is_none() || signing_key_file.is_none() {
                errors.push(main.error_at(
                    v.span(),
                    "backup.schedule_dir needs backup.custodian_public_key and backup.signing_key_file",
                ));
            }
            Some(base_dir(main.path).join(v.get_ref()))
        }
        None => {
            for v in [&raw.schedule_interval_seconds, &raw.schedule_keep]
                .into_iter()
                .flatten()
            {
                errors.push(main.error_at(v.span(), "backup.schedule_* needs backup.schedule_dir"));
            }
            None
        }
    };
    BackupConfig {
        custodian_public_key,
        signing_key_file,
        trusted_signers,
        schedule_dir,
        schedule_interval,
        schedule_keep,
    }
}

/// `[engine] seal`, `shamir_threshold`, `shamir_shares`.
fn seal_mode(
    main: &Source<'_>,
    errors: &mut Vec<ConfigError>,
    e: &RawEngine,
) -> crate::engine::seal::SealMode {
    use crate::engine::seal::SealMode;
    let shares: u8 = bounded(
        main,
        errors,
        "engine.shamir_shares",
        &e.shamir_shares,
        2..=16,
    )
    .unwrap_or(5);
    let threshold: u8 = bounded(
        main,
        errors,
        "engine.shamir_threshold",
        &e.shamir_threshold,
        2..=16,
    )
    .unwrap_or(3.min(shares));
    let mode = match e.seal.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("auto", _)) => SealMode::Auto,
        Some(("passphrase", _)) => SealMode::Passphrase,
        Some(("shamir", span)) => {
            if threshold > shares {
                errors.push(main.error_at(
                    span,
                    format!(
                        "engine.shamir_threshold ({threshold}) must not exceed \
                         engine.shamir_shares ({shares})"
                    ),
                ));
            }
            SealMode::Shamir { threshold, shares }
        }
        Some((other, span)) => {
            errors.push(main.error_at(
                span,
                format!(
                    "engine.seal must be \"auto\", \"passphrase\" or \"shamir\", not {other:?}"
                ),
            ));
            SealMode::Auto
        }
    };
    if !matches!(mode, SealMode::Shamir { .. }) {
        for v in [&e.shamir_threshold, &e.shamir_shares]
            .into_iter()
            .flatten()
        {
            errors.push(main.error_at(
                v.span(),
                "engine.shamir_threshold and engine.shamir_shares need seal = \"shamir\"",
            ));
        }
    }
    mode
}

/// The value of an integer key converted to the field's type: `None` when
/// the key is absent (the caller takes the default) or out of `range` (an
/// error is recorded).
fn bounded<T: TryFrom<i64>>(
    source: &Source<'_>,
    errors: &mut Vec<ConfigError>,
    key: &str,
    value: &Option<Spanned<i64>>,
    range: RangeInclusive<i64>,
) -> Option<T> {
    let value = value.as_ref()?;
    let n = *value.get_ref();
    if range.contains(&n) {
        if let Ok(converted) = T::try_from(n) {
            return Some(converted);
        }
    }
    errors.push(source.error_at(
        value.span(),
        format!(
            "{key} must be between {} and {}, not {n}",
            range.start(),
            range.end()
        ),
    ));
    None
}

fn tls(
    main: &Source<'_>,
    raw: &RawTls,
    fs_checks: FsChecks,
    errors: &mut Vec<ConfigError>,
) -> TlsConfig {
    let mut resolve = |key: &str, value: &Option<Spanned<String>>| {
        let value = value.as_ref()?;
        if value.get_ref().trim().is_empty() {
            errors.push(main.error_at(value.span(), format!("tls.{key} must not be empty")));
            return None;
        }
        let path = base_dir(main.path).join(value.get_ref());
        if fs_checks == FsChecks::Yes {
            let problem = match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => None,
                Ok(_) => Some("is not a file".to_string()),
                Err(e) => Some(format!("cannot be read: {e}")),
            };
            if let Some(problem) = problem {
                errors.push(main.error_at(
                    value.span(),
                    format!("tls.{key} {} {problem}", path.display()),
                ));
            }
        }
        Some((path, value.span()))
    };
    let cert = resolve("cert_file", &raw.cert_file);
    let key = resolve("key_file", &raw.key_file);
    match (&cert, &key) {
        (Some((_, span)), None) if raw.key_file.is_none() => errors.push(main.error_at(
            span.clone(),
            "tls.cert_file is set but tls.key_file is not: set both, or neither \
             to use a generated self-signed certificate",
        )),
        (None, Some((_, span))) if raw.cert_file.is_none() => errors.push(main.error_at(
            span.clone(),
            "tls.key_file is set but tls.cert_file is not: set both, or neither \
             to use a generated self-signed certificate",
        )),
        _ => {}
    }
    TlsConfig {
        cert_file: cert.map(|(path, _)| path),
        key_file: key.map(|(path, _)| path),
    }
}

fn listeners(
    main: &Source<'_>,
    raw: &[Spanned<RawListener>],
    fence: &Fence,
    groups_complete: bool,
    fs_checks: FsChecks,
    errors: &mut Vec<ConfigError>,
) -> Vec<ListenerConfig> {
    if raw.is_empty() {
        errors.push(
            main.error("no [[listener]] is defined: hsmgate would accept no connections at all"),
        );
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut addresses: BTreeMap<SocketAddr, &str> = BTreeMap::new();
    let mut listeners = Vec::with_capacity(raw.len());
    for spanned in raw {
        let l = spanned.get_ref();
        let name = l.name.get_ref().as_str();
        if let Err(problem) = check_name(name) {
            errors.push(main.error_at(l.name.span(), format!("listener name {problem}")));
        } else if let Some(first) = names.get(name) {
            errors.push(main.error_at(
                l.name.span(),
                format!(
                    "listener name {} is already used at line {first}",
                    quoted(name)
                ),
            ));
        } else {
            names.insert(name, main.line_of(l.name.span()));
        }

        let address = match l.address.get_ref().parse::<SocketAddr>() {
            Ok(address) => address,
            Err(_) => {
                errors.push(main.error_at(
                    l.address.span(),
                    format!(
                        "listener {}: address {} is not an IP address and port \
                         (e.g. 127.0.0.1:8200 or [::1]:8200; host names are not accepted)",
                        quoted(name),
                        quoted(l.address.get_ref())
                    ),
                ));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        // Port 0 asks the OS for a free port, so it can be repeated (tests do).
        if address.port() != 0 {
            if let Some(other) = addresses.get(&address) {
                errors.push(main.error_at(
                    l.address.span(),
                    format!(
                        "listener {}: address {address} is already used by listener {}",
                        quoted(name),
                        quoted(other)
                    ),
                ));
            } else {
                addresses.insert(address, name);
            }
        }

        let security_groups = l.security_groups.as_ref().map_or(&[][..], |g| g.get_ref());
        if security_groups.is_empty() {
            let span = l
                .security_groups
                .as_ref()
                .map_or(spanned.span(), |g| g.span());
            errors.push(main.error_at(
                span,
                format!(
                    "listener {} needs at least one group in security_groups: \
                     the default is deny, so nobody could connect",
                    quoted(name)
                ),
            ));
        }
        let groups = &fence.groups;
        for (key, refs) in [
            ("security_groups", security_groups),
            ("admin_groups", &l.admin_groups[..]),
            ("transit_groups", class_refs(&l.transit_groups)),
            ("login_groups", class_refs(&l.login_groups)),
            ("health_groups", class_refs(&l.health_groups)),
            ("trusted_proxy_groups", &l.trusted_proxy_groups[..]),
        ] {
            for group in refs {
                // After a policy file failed to parse, its groups are unknown:
                // "not defined" would be noise, not news.
                if groups_complete && !groups.contains_key(group.get_ref()) {
                    errors.push(main.error_at(
                        group.span(),
                        format!(
                            "listener {}: {key} names group {}, which no policy file defines{}",
                            quoted(name),
                            quoted(group.get_ref()),
                            defined_list(groups)
                        ),
                    ));
                }
            }
        }
        let channel = match l.channel.as_ref().map(|c| (c.get_ref().as_str(), c.span())) {
            None | Some(("front-door", _)) => Channel::FrontDoor,
            Some(("break-glass", _)) => Channel::BreakGlass,
            Some((other, span)) => {
                errors.push(main.error_at(
                    span,
                    format!(
                        "listener {}: channel must be \"front-door\" or \"break-glass\", not {}",
                        quoted(name),
                        quoted(other)
                    ),
                ));
                Channel::FrontDoor
            }
        };
        let deny_lists = deny_list_refs(
            main,
            &format!("listener {}: deny_lists", quoted(name)),
            &l.deny_lists,
            fence,
            groups_complete,
            errors,
        );
        let forwarded = forwarded(main, name, l, channel, errors);
        let client_auth = client_auth(main, name, l, fs_checks, errors);
        listeners.push(ListenerConfig {
            name: name.to_string(),
            address,
            security_groups: dedup(security_groups),
            admin_groups: dedup(&l.admin_groups),
            channel,
            transit_groups: l.transit_groups.as_deref().map(dedup),
            login_groups: l.login_groups.as_deref().map(dedup),
            health_groups: l.health_groups.as_deref().map(dedup),
            deny_lists,
            trusted_proxy_groups: dedup(&l.trusted_proxy_groups),
            forwarded,
            client_auth,
        });
    }
    listeners
}

/// Longest accepted `xff_hops`: a longer chain of proxies is not a
/// deployment anyone reviews.
const XFF_HOPS: RangeInclusive<i64> = 1..=10;

/// The listener's `trusted_proxy_groups`, `xff_hops` and `proxy_protocol`,
/// checked to name exactly one mechanism, and never on break-glass.
fn forwarded(
    main: &Source<'_>,
    name: &str,
    l: &RawListener,
    channel: Channel,
    errors: &mut Vec<ConfigError>,
) -> Forwarded {
    let proxy_protocol = l.proxy_protocol.as_ref().filter(|p| *p.get_ref());
    let hops = bounded::<u8>(
        main,
        errors,
        &format!("listener {}: xff_hops", quoted(name)),
        &l.xff_hops,
        XFF_HOPS,
    );
    let trusted = l.trusted_proxy_groups.first();
    let mut fail = |span: Range<usize>, message: String| {
        errors.push(main.error_at(span, format!("listener {}: {message}", quoted(name))));
    };
    if channel == Channel::BreakGlass {
        // Break-glass judges the TCP peer alone: whoever holds the last
        // login attempts must be on the wire, not named by a proxy.
        let span = trusted
            .map(|g| g.span())
            .or(l.xff_hops.as_ref().map(|h| h.span()))
            .or(proxy_protocol.map(|p| p.span()));
        if let Some(span) = span {
            fail(
                span,
                "a break-glass listener trusts no proxy: remove trusted_proxy_groups, \
                 xff_hops and proxy_protocol (it judges the TCP peer alone)"
                    .into(),
            );
        }
        return Forwarded::None;
    }
    match (trusted, &l.xff_hops, proxy_protocol) {
        (_, Some(_), Some(p)) => {
            fail(
                p.span(),
                "set xff_hops or proxy_protocol, not both: one listener takes the client \
                 address from one place"
                    .into(),
            );
            Forwarded::None
        }
        (None, Some(h), None) => {
            fail(
                h.span(),
                "xff_hops needs trusted_proxy_groups: X-Forwarded-For is believed only \
                 from trusted proxies"
                    .into(),
            );
            Forwarded::None
        }
        (None, None, Some(p)) => {
            fail(
                p.span(),
                "proxy_protocol needs trusted_proxy_groups: a PROXY header is accepted \
                 only from trusted proxies"
                    .into(),
            );
            Forwarded::None
        }
        (Some(g), None, None) => {
            fail(
                g.span(),
                "trusted_proxy_groups needs xff_hops (X-Forwarded-For) or \
                 proxy_protocol = true: say how the proxies pass the client address"
                    .into(),
            );
            Forwarded::None
        }
        (Some(_), Some(_), None) => {
            hops.map_or(Forwarded::None, |hops| Forwarded::XForwardedFor { hops })
        }
        (Some(_), None, Some(_)) => Forwarded::ProxyProtocol,
        (None, None, None) => Forwarded::None,
    }
}

/// The listener's `client_ca` and `client_auth`. With `load`, the CA file
/// must hold at least one PEM certificate.
fn client_auth(
    main: &Source<'_>,
    name: &str,
    l: &RawListener,
    fs_checks: FsChecks,
    errors: &mut Vec<ConfigError>,
) -> Option<ClientAuth> {
    let required = match l
        .client_auth
        .as_ref()
        .map(|c| (c.get_ref().as_str(), c.span()))
    {
        None | Some(("required", _)) => true,
        Some(("optional", _)) => false,
        Some((other, span)) => {
            errors.push(main.error_at(
                span,
                format!(
                    "listener {}: client_auth must be \"required\" or \"optional\", not {}",
                    quoted(name),
                    quoted(other)
                ),
            ));
            true
        }
    };
    let Some(ca) = &l.client_ca else {
        if let Some(c) = &l.client_auth {
            errors.push(main.error_at(
                c.span(),
                format!(
                    "listener {}: client_auth needs client_ca, the CA file client \
                     certificates are checked against",
                    quoted(name)
                ),
            ));
        }
        return None;
    };
    if ca.get_ref().trim().is_empty() {
        errors.push(main.error_at(
            ca.span(),
            format!("listener {}: client_ca must not be empty", quoted(name)),
        ));
        return None;
    }
    let ca_file = base_dir(main.path).join(ca.get_ref());
    if fs_checks == FsChecks::Yes {
        if let Err(problem) = crate::gateway::tls::read_client_ca(&ca_file) {
            errors.push(main.error_at(
                ca.span(),
                format!("listener {}: client_ca: {problem}", quoted(name)),
            ));
        }
    }
    Some(ClientAuth { ca_file, required })
}

fn class_refs(groups: &Option<Vec<Spanned<String>>>) -> &[Spanned<String>] {
    groups.as_deref().unwrap_or(&[])
}

/// Checks that every name refers to a defined deny list; returns the names
/// in order, repeats dropped.
fn deny_list_refs(
    main: &Source<'_>,
    key: &str,
    refs: &[Spanned<String>],
    fence: &Fence,
    complete: bool,
    errors: &mut Vec<ConfigError>,
) -> Vec<String> {
    for name in refs {
        if complete && !fence.deny_lists.contains_key(name.get_ref()) {
            errors.push(main.error_at(
                name.span(),
                format!(
                    "{key} names deny list {}, which no policy file defines",
                    quoted(name.get_ref())
                ),
            ));
        }
    }
    dedup(refs)
}

const AUDIT_BATCH_INTERVAL_MS: RangeInclusive<i64> = 10..=60_000;

/// `[audit]`: relative paths are relative to the data dir's parent working
/// directory, as `engine.data_dir` is; absent means `<data dir>/audit.log`.
fn audit_section(
    main: &Source<'_>,
    raw: &RawAudit,
    errors: &mut Vec<ConfigError>,
) -> crate::audit::AuditConfig {
    use crate::audit::{AuditConfig, FsyncPolicy, KeyUseLevel};
    let path = match &raw.path {
        Some(p) if p.get_ref().trim().is_empty() => {
            errors.push(main.error_at(p.span(), "audit.path must not be empty"));
            None
        }
        Some(p) => Some(PathBuf::from(p.get_ref())),
        None => None,
    };
    let interval = bounded::<u64>(
        main,
        errors,
        "audit.batch_interval_ms",
        &raw.batch_interval_ms,
        AUDIT_BATCH_INTERVAL_MS,
    )
    .map_or(Duration::from_secs(1), Duration::from_millis);
    let fsync = match raw.fsync.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
        None | Some(("every", _)) => FsyncPolicy::Every,
        Some(("batched", _)) => FsyncPolicy::Batched { interval },
        Some((other, span)) => {
            errors.push(main.error_at(
                span,
                format!(
                    "audit.fsync must be \"every\" or \"batched\", not {}",
                    quoted(other)
                ),
            ));
            FsyncPolicy::Every
        }
    };
    let key_use = match raw
        .key_use
        .as_ref()
        .map(|v| (v.get_ref().as_str(), v.span()))
    {
        None | Some(("all", _)) => KeyUseLevel::All,
        Some(("per_minute", _)) => KeyUseLevel::PerMinute,
        Some(("off", _)) => KeyUseLevel::Off,
        Some((other, span)) => {
            errors.push(main.error_at(
                span,
                format!(
                    "audit.key_use must be \"all\", \"per_minute\" or \"off\", not {}",
                    quoted(other)
                ),
            ));
            KeyUseLevel::All
        }
    };
    AuditConfig {
        path,
        fsync,
        key_use,
    }
}

/// `[bench] dangerous_unfenced_listener`: an IP literal and port on
/// loopback (127.0.0.0/8 or ::1), nothing else. The listener it opens skips
/// security groups, deny lists, TLS, route-class groups, source rate limits
/// and access policies, so it must never be reachable from another host.
fn bench_section(
    main: &Source<'_>,
    raw: &RawBench,
    errors: &mut Vec<ConfigError>,
) -> Option<SocketAddr> {
    let a = raw.dangerous_unfenced_listener.as_ref()?;
    match a.get_ref().parse::<SocketAddr>() {
        Ok(address) if crate::netfilter::canonical(address.ip()).is_loopback() => Some(address),
        Ok(_) => {
            errors.push(main.error_at(
                a.span(),
                format!(
                    "bench.dangerous_unfenced_listener {} is not a loopback address: this \
                     benchmark-only listener serves the engine without the fence, so only \
                     127.0.0.0/8 or [::1] is accepted",
                    quoted(a.get_ref())
                ),
            ));
            None
        }
        Err(_) => {
            errors.push(main.error_at(
                a.span(),
                format!(
                    "bench.dangerous_unfenced_listener {} is not an IP address and port \
                     (e.g. 127.0.0.1:18200)",
                    quoted(a.get_ref())
                ),
            ));
            None
        }
    }
}

/// `[cluster]`: node id ≥ 1, the cluster port's address (default
/// 127.0.0.1:8201), the cluster CA and this node's certificate and key
/// (relative to the config file), security groups for the cluster port
/// (at least one, all defined), optional Raft timing. Cluster members use
/// seal = "auto" in this version.
fn cluster_section(
    main: &Source<'_>,
    raw: &Spanned<RawCluster>,
    engine: &EngineConfig,
    groups: &BTreeMap<String, DefinedGroup>,
    groups_complete: bool,
    fs_checks: FsChecks,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::cluster::ClusterConfig> {
    let c = raw.get_ref();
    let before = errors.len();
    let node_id = *c.node_id.get_ref();
    if node_id < 1 {
        errors.push(main.error_at(
            c.node_id.span(),
            format!("cluster.node_id must be 1 or more (found {node_id})"),
        ));
    }
    let address = match &c.address {
        None => SocketAddr::from(([127, 0, 0, 1], crate::cluster::DEFAULT_PORT)),
        Some(a) => match a.get_ref().parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                errors.push(main.error_at(
                    a.span(),
                    format!(
                        "cluster.address {} is not an IP address and port (e.g. 127.0.0.1:8201)",
                        quoted(a.get_ref())
                    ),
                ));
                SocketAddr::from(([127, 0, 0, 1], crate::cluster::DEFAULT_PORT))
            }
        },
    };
    let advertise = match &c.advertise {
        None => address.to_string(),
        Some(a) => {
            let ok = a
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                errors.push(main.error_at(
                    a.span(),
                    format!(
                        "cluster.advertise {} is not host:port (the address other members dial)",
                        quoted(a.get_ref())
                    ),
                ));
            }
            a.get_ref().clone()
        }
    };
    if engine.seal != crate::engine::seal::SealMode::Auto {
        errors.push(main.error_at(
            raw.span(),
            "[cluster] needs engine.seal = \"auto\" in this version: a joining node \
             receives the cluster key and keeps it wrapped under its own key file",
        ));
    }
    let mut file = |key: &str, v: &Spanned<String>| {
        if v.get_ref().trim().is_empty() {
            errors.push(main.error_at(v.span(), format!("cluster.{key} must not be empty")));
        }
        let path = base_dir(main.path).join(v.get_ref());
        if fs_checks == FsChecks::Yes && !path.is_file() {
            errors.push(main.error_at(
                v.span(),
                format!("cluster.{key}: {} cannot be read", path.display()),
            ));
        }
        path
    };
    let ca_file = file("ca_file", &c.ca_file);
    let cert_file = file("cert_file", &c.cert_file);
    let key_file = file("key_file", &c.key_file);
    if c.security_groups.get_ref().is_empty() {
        errors.push(main.error_at(
            c.security_groups.span(),
            "cluster.security_groups needs at least one group: the default is deny",
        ));
    }
    for group in c.security_groups.get_ref() {
        if groups_complete && !groups.contains_key(group.get_ref()) {
            errors.push(main.error_at(
                group.span(),
                format!(
                    "cluster.security_groups names group {}, which no policy file defines{}",
                    quoted(group.get_ref()),
                    defined_list(groups)
                ),
            ));
        }
    }
    let heartbeat_ms = match &c.heartbeat_ms {
        None => 250,
        Some(h) if (10..=10_000).contains(h.get_ref()) => *h.get_ref() as u64,
        Some(h) => {
            errors.push(main.error_at(
                h.span(),
                "cluster.heartbeat_ms must be between 10 and 10000",
            ));
            250
        }
    };
    let election_timeout_ms = match &c.election_timeout_ms {
        None => (1_500, 3_000),
        Some(e) => match e.get_ref().as_slice() {
            [lo, hi] if *lo as u64 > heartbeat_ms && lo < hi && *hi <= 60_000 => {
                (*lo as u64, *hi as u64)
            }
            _ => {
                errors.push(main.error_at(
                    e.span(),
                    "cluster.election_timeout_ms is [min, max] with heartbeat_ms < min < max <= 60000",
                ));
                (1_500, 3_000)
            }
        },
    };
    if errors.len() > before {
        return None;
    }
    Some(crate::cluster::ClusterConfig {
        node_id: node_id as u64,
        address,
        advertise,
        ca_file,
        cert_file,
        key_file,
        security_groups: dedup(c.security_groups.get_ref()),
        heartbeat_ms,
        election_timeout_ms,
    })
}

/// `[upstream]`: at least one node (unique id ≥ 1, an IP literal and port),
/// the CA file the nodes' API certificates chain to, optionally this
/// gateway's client certificate and key (both or neither), timing. Not with
/// `[cluster]` (a gateway is not a node) nor with a break-glass listener
/// (break-glass reaches the nodes directly).
fn upstream_section(
    main: &Source<'_>,
    raw: &Spanned<RawUpstream>,
    has_cluster: bool,
    listeners: &[ListenerConfig],
    fs_checks: FsChecks,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::upstream::UpstreamConfig> {
    let u = raw.get_ref();
    let before = errors.len();
    if has_cluster {
        errors.push(main.error_at(
            raw.span(),
            "[upstream] and [cluster] exclude each other: a gateway forwards to engine \
             nodes and holds no engine itself",
        ));
    }
    if let Some(l) = listeners
        .iter()
        .find(|l| l.channel == crate::engine::Channel::BreakGlass)
    {
        errors.push(main.error_at(
            raw.span(),
            format!(
                "[upstream] with break-glass listener {}: a gateway has no break-glass door; \
                 officers reach the engine nodes' break-glass listeners directly",
                quoted(&l.name)
            ),
        ));
    }
    if u.nodes.get_ref().is_empty() {
        errors.push(main.error_at(
            u.nodes.span(),
            "upstream.nodes needs at least one engine node",
        ));
    }
    let mut nodes = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for n in u.nodes.get_ref() {
        let n = n.get_ref();
        let id = *n.id.get_ref();
        if id < 1 {
            errors.push(main.error_at(
                n.id.span(),
                format!("upstream node id must be 1 or more (found {id})"),
            ));
        } else if !ids.insert(id) {
            errors.push(main.error_at(n.id.span(), format!("upstream node id {id} appears twice")));
        }
        let address = match n.address.get_ref().parse::<SocketAddr>() {
            Ok(a) if !a.ip().is_unspecified() && a.port() != 0 => Some(a),
            _ => {
                errors.push(main.error_at(
                    n.address.span(),
                    format!(
                        "upstream node address {} is not an IP address and port of a node's \
                         API listener (e.g. 10.0.2.11:8200)",
                        quoted(n.address.get_ref())
                    ),
                ));
                None
            }
        };
        let server_name = match (&n.server_name, address) {
            (Some(name), _) => {
                if rustls_pki_types::ServerName::try_from(name.get_ref().as_str()).is_err() {
                    errors.push(main.error_at(
                        name.span(),
                        format!(
                            "upstream node server_name {} is not a DNS name or IP address",
                            quoted(name.get_ref())
                        ),
                    ));
                }
                name.get_ref().clone()
            }
            (None, Some(a)) => a.ip().to_string(),
            (None, None) => String::new(),
        };
        if let Some(address) = address {
            nodes.push(crate::upstream::UpstreamNode {
                id: id.max(0) as u64,
                address,
                server_name,
            });
        }
    }
    let mut file = |key: &str, v: &Spanned<String>| {
        if v.get_ref().trim().is_empty() {
            errors.push(main.error_at(v.span(), format!("upstream.{key} must not be empty")));
        }
        let path = base_dir(main.path).join(v.get_ref());
        if fs_checks == FsChecks::Yes && !path.is_file() {
            errors.push(main.error_at(
                v.span(),
                format!("upstream.{key}: {} cannot be read", path.display()),
            ));
        }
        path
    };
    let ca_file = file("ca_file", &u.ca_file);
    let client_cert = match (&u.cert_file, &u.key_file) {
        (Some(c), Some(k)) => Some((file("cert_file", c), file("key_file", k))),
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => {
            errors.push(main.error_at(
                v.span(),
                "upstream.cert_file and upstream.key_file go together (this gateway's client \
                 certificate for the nodes' mutual TLS)",
            ));
            None
        }
    };
    let mut millis = |v: &Option<Spanned<i64>>, key: &str, default: u64, range: (u64, u64)| match v
    {
        None => default,
        Some(x) if (range.0 as i64..=range.1 as i64).contains(x.get_ref()) => *x.get_ref() as u64,
        Some(x) => {
            errors.push(main.error_at(
                x.span(),
                format!("upstream.{key} must be between {} and {}", range.0, range.1),
            ));
            default
        }
    };
    let health_interval_ms = millis(
        &u.health_interval_ms,
        "health_interval_ms",
        1_000,
        (50, 60_000),
    );
    let timeout_ms = millis(&u.timeout_ms, "timeout_ms", 15_000, (100, 300_000));
    if errors.len() > before {
        return None;
    }
    Some(crate::upstream::UpstreamConfig {
        nodes,
        ca_file,
        client_cert,
        health_interval: Duration::from_millis(health_interval_ms),
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// `[metrics]`: present means enabled unless `enabled = false`; the
/// listener must name defined groups, like any listener.
fn metrics_section(
    main: &Source<'_>,
    raw: &RawMetrics,
    groups: &BTreeMap<String, DefinedGroup>,
    groups_complete: bool,
    errors: &mut Vec<ConfigError>,
) -> crate::metrics::MetricsConfig {
    let defaults = crate::metrics::MetricsConfig::default();
    let address = match &raw.address {
        None => defaults.address,
        Some(a) => match a.get_ref().parse::<SocketAddr>() {
            Ok(address) => address,
            Err(_) => {
                errors.push(main.error_at(
                    a.span(),
                    format!(
                        "metrics.address {} is not an IP address and port (e.g. 127.0.0.1:9464)",
                        quoted(a.get_ref())
                    ),
                ));
                defaults.address
            }
        },
    };
    let enabled = raw.enabled.unwrap_or(true);
    let security_groups = match &raw.security_groups {
        None => {
            let name = crate::metrics::DEFAULT_GROUP;
            if enabled && groups_complete && !groups.contains_key(name) {
                errors.push(main.error(format!(
                    "[metrics] is enabled with the default security group {}, which no policy \
                     file defines: define it, or set metrics.security_groups{}",
                    quoted(name),
                    defined_list(groups)
                )));
            }
            vec![name.to_string()]
        }
        Some(list) => {
            if list.get_ref().is_empty() {
                errors.push(main.error_at(
                    list.span(),
                    "metrics.security_groups needs at least one group: the default is deny",
                ));
            }
            for group in list.get_ref() {
                if groups_complete && !groups.contains_key(group.get_ref()) {
                    errors.push(main.error_at(
                        group.span(),
                        format!(
                            "metrics.security_groups names group {}, which no policy file defines{}",
                            quoted(group.get_ref()),
                            defined_list(groups)
                        ),
                    ));
                }
            }
            dedup(list.get_ref())
        }
    };
    crate::metrics::MetricsConfig {
        enabled,
        address,
        security_groups,
    }
}

/// Group names in file order, repeats dropped (a repeat adds nothing).
fn dedup(names: &[Spanned<String>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !out.contains(name.get_ref()) {
            out.push(name.get_ref().clone());
        }
    }
    out
}

fn defined_list(groups: &BTreeMap<String, DefinedGroup>) -> String {
    const SHOWN: usize = 10;
    if groups.is_empty() {
        return " (no groups are defined)".to_string();
    }
    let mut names: Vec<String> = groups.keys().take(SHOWN).map(|n| quoted(n)).collect();
    if groups.len() > SHOWN {
        names.push(format!("and {} more", groups.len() - SHOWN));
    }
    format!(" (defined: {})", names.join(", "))
}

/// A group and where it was first defined, for "already defined at".
struct DefinedGroup {
    group: SecurityGroup,
    file: PathBuf,
    line: usize,
}

/// Everything the policy files define for the fence.
#[derive(Default)]
struct Fence {
    groups: BTreeMap<String, DefinedGroup>,
    prefix_lists: BTreeMap<String, (PrefixList, PathBuf, usize)>,
    deny_lists: BTreeMap<String, (DenyList, PathBuf, usize)>,
}

/// Reads the groups, prefix lists and deny lists of every policy file. The
/// flag says whether every file parsed, i.e. whether a missing name is really
/// missing.
fn security_groups(policies: &[(PathBuf, String)], errors: &mut Vec<ConfigError>) -> (Fence, bool) {
    let mut fence = Fence::default();
    let mut complete = true;
    let mut files = Vec::new();
    for (path, text) in policies {
        let source = Source { path, text };
        // First as plain TOML: a file without our tables belongs to another
        // part of hsmgate, but broken TOML anywhere in policies/ is still an error.
        let Some(table) = parse::<toml::Table>(&source, errors) else {
            complete = false;
            continue;
        };
        if !FENCE_TABLES.iter().any(|t| table.contains_key(*t)) {
            continue;
        }
        let Some(file) = parse::<RawPolicyFile>(&source, errors) else {
            complete = false;
            continue;
        };
        files.push((source, file));
    }
    // Prefix lists first: rules in any file may name them.
    for (source, file) in &mut files {
        for (name, raw) in std::mem::take(&mut file.prefix_list) {
            let line = source.line_of(name.span());
            if let Err(problem) = check_name(name.get_ref()) {
                errors.push(source.error_at(name.span(), format!("prefix list name {problem}")));
            }
            let list = prefix_list(source, &name, raw, errors);
            if let Some((_, first, first_line)) = fence.prefix_lists.get(name.get_ref()) {
                errors.push(source.error_at(
                    name.span(),
                    format!(
                        "prefix list {} is already defined at {}:{first_line}",
                        quoted(name.get_ref()),
                        first.display()
                    ),
                ));
                continue;
            }
            fence
                .prefix_lists
                .insert(name.into_inner(), (list, source.path.to_path_buf(), line));
        }
    }
    for (source, file) in files {
        for (name, raw) in file.group {
            let line = source.line_of(name.span());
            if let Err(problem) = check_name(name.get_ref()) {
                errors.push(source.error_at(name.span(), format!("group name {problem}")));
            }
            let what = format!("group {}", quoted(name.get_ref()));
            let rules = rules(&source, &what, raw.rules, &fence, complete, errors);
            if let Some(first) = fence.groups.get(name.get_ref()) {
                errors.push(source.error_at(
                    name.span(),
                    format!(
                        "group {} is already defined at {}:{}",
                        quoted(name.get_ref()),
                        first.file.display(),
                        first.line
                    ),
                ));
                continue;
            }
            let name = name.into_inner();
            fence.groups.insert(
                name.clone(),
                DefinedGroup {
                    group: SecurityGroup {
                        name,
                        description: raw.description,
                        rules,
                    },
                    file: source.path.to_path_buf(),
                    line,
                },
            );
        }
        for (name, raw) in file.deny_list {
            let line = source.line_of(name.span());
            if let Err(problem) = check_name(name.get_ref()) {
                errors.push(source.error_at(name.span(), format!("deny list name {problem}")));
            }
            let what = format!("deny list {}", quoted(name.get_ref()));
            let rules = rules(&source, &what, raw.rules, &fence, complete, errors);
            if let Some((_, first, first_line)) = fence.deny_lists.get(name.get_ref()) {
                errors.push(source.error_at(
                    name.span(),
                    format!(
                        "deny list {} is already defined at {}:{first_line}",
                        quoted(name.get_ref()),
                        first.display()
                    ),
                ));
                continue;
            }
            let name = name.into_inner();
            let list = DenyList {
                name: name.clone(),
                description: raw.description,
                rules,
            };
            fence
                .deny_lists
                .insert(name, (list, source.path.to_path_buf(), line));
        }
    }
    (fence, complete)
}

/// Validates the rules of one group or deny list.
fn rules(
    source: &Source<'_>,
    what: &str,
    raw: Vec<Spanned<RawRule>>,
    fence: &Fence,
    complete: bool,
    errors: &mut Vec<ConfigError>,
) -> Vec<Rule> {
    let mut rules = Vec::with_capacity(raw.len());
    for spanned in raw {
        let span = spanned.span();
        let rule = spanned.into_inner();
        let ports = match &rule.ports {
            None => Ok(None),
            Some(ports) => parse_ports(ports.get_ref()).map(Some).map_err(|problem| {
                errors.push(source.error_at(ports.span(), format!("{what}: {problem}")))
            }),
        };
        let target = match (&rule.source, &rule.prefix_list) {
            (Some(net), None) => {
                parse_source(net.get_ref())
                    .map(RuleSource::Net)
                    .map_err(|problem| {
                        errors.push(source.error_at(net.span(), format!("{what}: {problem}")))
                    })
            }
            (None, Some(list)) => {
                // After a policy file failed to parse, its lists are unknown.
                if complete && !fence.prefix_lists.contains_key(list.get_ref()) {
                    errors.push(source.error_at(
                        list.span(),
                        format!(
                            "{what}: prefix_list names {}, which no policy file defines",
                            quoted(list.get_ref())
                        ),
                    ));
                    Err(())
                } else {
                    Ok(RuleSource::PrefixList(list.get_ref().clone()))
                }
            }
            _ => {
                errors.push(source.error_at(
                    span,
                    format!("{what}: a rule needs exactly one of `source` or `prefix_list`"),
                ));
                Err(())
            }
        };
        if let (Ok(ports), Ok(target)) = (ports, target) {
            rules.push(Rule {
                source: target,
                ports,
                description: rule.description,
            });
        }
    }
    rules
}

/// `ports = 8200` or `ports = "8200-8210"`.
fn parse_ports(value: &toml::Value) -> Result<PortRange, String> {
    const HINT: &str = "ports must be a port (8200) or an inclusive range (\"8200-8210\") \
                        of ports from 1 to 65535";
    let port = |n: i64| u16::try_from(n).ok().filter(|p| *p != 0);
    let text_port = |t: &str| {
        t.trim()
            .parse::<i64>()
            .ok()
            .filter(|_| t.trim().bytes().all(|b| b.is_ascii_digit()))
            .and_then(port)
    };
    let range = match value {
        toml::Value::Integer(n) => port(*n).map(|p| (p, p)),
        toml::Value::String(t) => match t.split_once('-') {
            Some((a, b)) => text_port(a).zip(text_port(b)),
            None => text_port(t).map(|p| (p, p)),
        },
        _ => None,
    };
    match range {
        Some((first, last)) if first <= last => Ok(PortRange { first, last }),
        Some((first, last)) => Err(format!(
            "ports range {first}-{last} is empty: write the lower port first"
        )),
        None => Err(HINT.to_string()),
    }
}

/// Most errors reported for one prefix-list file: a file of a million bad
/// lines must not become a million lines of errors.
const MAX_ERRORS_PER_LIST_FILE: usize = 20;

fn prefix_list(
    source: &Source<'_>,
    name: &Spanned<String>,
    raw: RawPrefixList,
    errors: &mut Vec<ConfigError>,
) -> PrefixList {
    let what = format!("prefix list {}", quoted(name.get_ref()));
    let mut nets = Vec::new();
    let mut file = None;
    match (raw.cidrs, raw.file) {
        (Some(cidrs), None) => {
            nets.reserve(cidrs.len());
            for cidr in cidrs {
                match parse_source(cidr.get_ref()) {
                    Ok(net) => nets.push(net),
                    Err(problem) => {
                        errors.push(source.error_at(cidr.span(), format!("{what}: {problem}")))
                    }
                }
            }
        }
        (None, Some(path)) => {
            if path.get_ref().trim().is_empty() {
                errors
                    .push(source.error_at(path.span(), format!("{what}: file must not be empty")));
            } else {
                // Relative to the policy file's directory: the policies dir.
                let resolved = base_dir(source.path).join(path.get_ref());
                match fs::read(&resolved) {
                    Ok(bytes) => nets = read_prefix_file(&resolved, &bytes, errors),
                    Err(e) => errors.push(source.error_at(
                        path.span(),
                        format!("{what}: file {} cannot be read: {e}", resolved.display()),
                    )),
                }
                file = Some(resolved);
            }
        }
        _ => errors.push(source.error_at(
            name.span(),
            format!("{what} needs exactly one of `cidrs` (inline) or `file` (one CIDR per line)"),
        )),
    }
    PrefixList {
        name: name.get_ref().clone(),
        description: raw.description,
        file,
        nets: nets.into(),
    }
}

/// Parses a prefix-list text file: one CIDR (or address) per line, `#`
/// starts a comment, blank lines are skipped. Errors name the file and line
/// and at most a short excerpt of the value, never the line itself.
pub fn read_prefix_file(path: &Path, bytes: &[u8], errors: &mut Vec<ConfigError>) -> Vec<IpNet> {
    // A rough guess (~16 bytes a line) saves most re-allocations on big files.
    let mut nets = Vec::with_capacity(bytes.len() / 16);
    let mut bad = 0usize;
    let mut report = |line: usize, message: String, errors: &mut Vec<ConfigError>| {
        bad += 1;
        if bad <= MAX_ERRORS_PER_LIST_FILE {
            errors.push(ConfigError {
                file: path.to_path_buf(),
                line: Some(line),
                column: None,
                message,
            });
        }
    };
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let content = match raw.iter().position(|&b| b == b'#') {
            Some(i) => &raw[..i],
            None => raw,
        };
        let content = content.trim_ascii();
        if content.is_empty() {
            continue;
        }
        let Ok(text) = std::str::from_utf8(content) else {
            report(line, "not UTF-8 text: expected one CIDR".into(), errors);
            continue;
        };
        if text.split_ascii_whitespace().nth(1).is_some() {
            report(
                line,
                "expected one CIDR per line (put notes after `#`)".into(),
                errors,
            );
            continue;
        }
        match parse_source(text) {
            Ok(net) => nets.push(net),
            Err(problem) => report(line, problem, errors),
        }
    }
    if bad > MAX_ERRORS_PER_LIST_FILE {
        errors.push(ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: format!(
                "{} more invalid lines not shown ({bad} in all)",
                bad - MAX_ERRORS_PER_LIST_FILE
            ),
        });
    }
    nets
}

/// Parses a rule's `source`: a CIDR, or a bare address meaning one host.
/// Strict, because a rule that means something other than what its author
/// thought is an open door:
/// - host bits set (`10.0.0.1/8`) is refused: the author meant either the
///   network or the host, and we cannot tell which;
/// - leading zeros in IPv4 octets are refused (some parsers read `010` as
///   octal 8);
/// - IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) are refused: mapped
///   peers are matched as IPv4 (see [`crate::netfilter::canonical`]), so the
///   rule is written as the IPv4 network it means;
/// - host names are never accepted.
fn parse_source(text: &str) -> Result<IpNet, String> {
    let (addr_text, len_text) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        format!(
            "source {} is not an IP network: write a CIDR such as 10.0.0.0/8 or \
             2001:db8::/32, or a single address (host names are not accepted)",
            quoted(text)
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len_text {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= max && len.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                format!(
                    "source {}: the prefix length must be a number from 0 to {max}",
                    quoted(text)
                )
            })?,
    };
    let net = IpNet::new(addr, len).map_err(|_| {
        format!(
            "source {}: the prefix length must be a number from 0 to {max}",
            quoted(text)
        )
    })?;
    if net.addr() != net.network() {
        return Err(format!(
            "source {} has host bits set: write {} for the network, or {}/{max} for the single host",
            quoted(text),
            net.trunc(),
            net.addr()
        ));
    }
    if let IpNet::V6(v6) = net {
        if let (true, Some(v4)) = (v6.prefix_len() >= 96, v6.network().to_ipv4_mapped()) {
            let suggestion = Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map_or_else(|_| v4.to_string(), |n| n.to_string());
            return Err(format!(
                "source {} is an IPv4-mapped IPv6 network; such peers are matched as \
                 IPv4, so write {suggestion}",
                quoted(text)
            ));
        }
    }
    Ok(net)
}

/// Listener and group names end up in logs and metric labels: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    if name.chars().count() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{} must be at most {MAX_NAME_LEN} characters from A-Z a-z 0-9 - _ .",
            quoted(name)
        ));
    }
    Ok(())
}

/// A value for an error message: escaped (no control characters reach the
/// terminal) and cut short (no pasting of whole lines).
fn quoted(value: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = value
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > MAX {
        out.push('…');
    }
    format!("`{out}`")
}

/// Main file first, then policy files in the order read; by position within
/// each file (file-level errors first).
fn sort_errors(errors: &mut [ConfigError], main: &Path, policies: &[(PathBuf, String)]) {
    let rank = |file: &Path| -> usize {
        if file == main {
            0
        } else {
            policies
                .iter()
                .position(|(p, _)| p == file)
                .map_or(usize::MAX, |i| i + 1)
        }
    };
    errors.sort_by(|a, b| {
        rank(&a.file)
            .cmp(&rank(&b.file))
            .then_with(|| a.file.cmp(&b.file))
            .then_with(|| a.line.cmp(&b.line))
            .then_with(|| a.column.cmp(&b.column))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUPS: &str = r#"
[group.apps]
description = "apps"
rules = [ { source = "10.0.0.0/8", description = "app network" } ]

[group.admins]
rules = [ { source = "10.9.9.9" }, { source = "2001:db8::/32" } ]
"#;

    const MAIN: &str = r#"
[[listener]]
name = "api"
address = "127.0.0.1:8200"
security_groups = ["apps", "admins"]
admin_groups = ["admins"]
"#;

    fn policies(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        files
            .iter()
            .map(|(path, text)| (PathBuf::from(path), text.to_string()))
            .collect()
    }

    fn load_ok(main: &str, groups: &str) -> Config {
        match load_from_str(
            Path::new("hsmgate.toml"),
            main,
            &policies(&[("sg.toml", groups)]),
        ) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    /// The errors as `file:line: message` without columns, for short asserts.
    fn errors(main: &str, files: &[(&str, &str)]) -> Vec<(String, Option<usize>, String)> {
        match load_from_str(Path::new("hsmgate.toml"), main, &policies(files)) {
            Ok(_) => panic!("expected errors, config was accepted"),
            Err(ConfigErrors(errors)) => errors
                .into_iter()
                .map(|e| (e.file.display().to_string(), e.line, e.message))
                .collect(),
        }
    }

    #[test]
    fn engine_seal_modes_parse_and_bad_ones_are_refused() {
        use crate::engine::seal::SealMode;
        assert_eq!(load_ok(MAIN, GROUPS).engine.seal, SealMode::Auto);
        let c = load_ok(&format!("[engine]\nseal = \"passphrase\"\n{MAIN}"), GROUPS);
        assert_eq!(c.engine.seal, SealMode::Passphrase);
        let c = load_ok(&format!("[engine]\nseal = \"shamir\"\n{MAIN}"), GROUPS);
        assert_eq!(
            c.engine.seal,
            SealMode::Shamir {
                threshold: 3,
                shares: 5
            }
        );
        let c = load_ok(
            &format!(
                "[engine]\nseal = \"shamir\"\nshamir_threshold = 2\nshamir_shares = 2\n{MAIN}"
            ),
            GROUPS,
        );
        assert_eq!(
            c.engine.seal,
            SealMode::Shamir {
                threshold: 2,
                shares: 2
            }
        );
        assert_one_error(
            &format!("[engine]\nseal = \"hsm\"\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            2,
            "engine.seal must be",
        );
        assert_one_error(
            &format!(
                "[engine]\nseal = \"shamir\"\nshamir_threshold = 4\nshamir_shares = 3\n{MAIN}"
            ),
            GROUPS,
            "hsmgate.toml",
            2,
            "must not exceed",
        );
        assert_one_error(
            &format!("[engine]\nshamir_shares = 3\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            2,
            "need seal = \"shamir\"",
        );
        assert_one_error(
            &format!("[engine]\nseal = \"shamir\"\nshamir_shares = 1\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            3,
            "between 2 and 16",
        );
    }

    #[test]
    fn backup_keys_and_schedule_are_validated() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let c = load_ok(
            &format!(
                "[backup]\ncustodian_public_key = \"{key}\"\nsigning_key_file = \"s.key\"\n\
                 trusted_signers = [\"{key}\"]\nschedule_dir = \"b\"\nschedule_keep = 3\n{MAIN}"
            ),
            GROUPS,
        );
        assert_eq!(c.engine.backup.custodian_public_key.unwrap()[1], 1);
        assert_eq!(c.engine.backup.trusted_signers.len(), 1);
        assert_eq!(c.engine.backup.schedule_keep, 3);
        assert_eq!(
            c.engine.backup.schedule_interval,
            Duration::from_secs(86_400)
        );
        assert_one_error(
            &format!("[backup]\ncustodian_public_key = \"c2hvcnQ=\"\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            2,
            "32-byte public key",
        );
        assert_one_error(
            &format!("[backup]\nschedule_dir = \"b\"\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            2,
            "needs backup.custodian_public_key",
        );
        assert_one_error(
            &format!("[backup]\nschedule_keep = 3\n{MAIN}"),
            GROUPS,
            "hsmgate.toml",
            2,
            "needs backup.schedule_dir",
        );
    }

    /// Asserts exactly one error, in `file` at `line`, whose message contains `needle`.
    fn assert_one_error(main: &str, groups: &str, file: &str, line: usize, needle: &str) {
        let found = errors(main, &[("sg.toml", groups)]);
        assert_eq!(found.len(), 1, "expected one error, got {found:#?}");
        let (f, l, message) = &found[0];
        assert_eq!((f.as_str(), *l), (file, Some(line)), "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hsmgate.toml")
    }

    #[test]
    fn shipped_default_loads_and_matches_the_built_in_defaults() {
        let config = load(&shipped()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.engine, EngineConfig::default());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.tls, TlsConfig::default());
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.listeners.len(), 2, "api and break-glass");
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.listeners[1].channel, Channel::BreakGlass);
        assert!(config.metrics.enabled);
        assert_eq!(config.metrics.address, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(config.metrics.security_groups, ["monitoring"]);
        assert_eq!(config.audit, crate::audit::AuditConfig::default());
        let api = &config.listeners[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.address, "127.0.0.1:8200".parse().unwrap());
        assert!(api.address.ip().is_loopback());
        assert_eq!(api.security_groups, ["apps", "admins"]);
        assert_eq!(api.admin_groups, ["admins"]);
        assert_eq!(api.channel, Channel::FrontDoor);
        let bg = &config.listeners[1];
        assert_eq!(bg.address, "127.0.0.1:8210".parse().unwrap());
        assert_eq!(bg.channel, Channel::BreakGlass);
        assert_eq!(bg.security_groups, ["break-glass"]);
        assert_eq!(
            config.groups.keys().collect::<Vec<_>>(),
            ["admins", "apps", "break-glass", "monitoring"]
        );
        for group in config.groups.values() {
            let sources: Vec<String> = group.rules.iter().map(|r| r.source.to_string()).collect();
            assert_eq!(sources, ["127.0.0.1/32", "::1/128"], "group {}", group.name);
            assert!(group
                .rules
                .iter()
                .all(|r| matches!(r.source, RuleSource::Net(n) if n.addr().is_loopback())));
        }
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = load_ok(MAIN, GROUPS);
        assert_eq!(config.engine, EngineConfig::default());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.source_path, PathBuf::from("hsmgate.toml"));
    }

    #[test]
    fn values_are_converted_to_their_types() {
        let main = format!(
            "[engine]\ndata_dir = \"/var/lib/hsmgate\"\nzeroize_after_failures = 10\n\
             lock_user_after_failures = 1\nsession_ttl_seconds = 60\n\
             non_exportable_is_final = true\nauto_rotate_check_seconds = 3600\n\
             [limits]\nmax_body_bytes = 1\nmax_header_bytes = 1024\n\
             header_read_timeout_ms = 100\ntls_handshake_timeout_ms = 600000\n{MAIN}"
        );
        let config = load_ok(&main, GROUPS);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/hsmgate"));
        assert_eq!(
            config.engine,
            EngineConfig {
                zeroize_after_failures: 10,
                lock_user_after_failures: 1,
                login_guard_reserve: 1,
                session_ttl: Duration::from_secs(60),
                min_password_length: 8,
                seal: crate::engine::seal::SealMode::Auto,
                backup: BackupConfig::default(),
                non_exportable_is_final: true,
                auto_rotate_check_interval: Duration::from_secs(3600),
            }
        );
        assert_eq!(
            config.limits,
            Limits {
                max_body_bytes: 1,
                max_header_bytes: 1024,
                header_read_timeout: Duration::from_millis(100),
                tls_handshake_timeout: Duration::from_secs(600),
                rate: crate::ratelimit::RateLimitPolicy::default(),
            }
        );
    }

    #[test]
    fn tls_paths_resolve_against_the_config_directory() {
        let main =
            format!("[tls]\ncert_file = \"tls/cert.pem\"\nkey_file = \"/abs/key.pem\"\n{MAIN}");
        let config = load_from_str(
            Path::new("/etc/hsmgate/hsmgate.toml"),
            &main,
            &policies(&[("sg.toml", GROUPS)]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.tls.cert_file,
            Some(PathBuf::from("/etc/hsmgate/tls/cert.pem"))
        );
        assert_eq!(config.tls.key_file, Some(PathBuf::from("/abs/key.pem")));
    }

    #[test]
    fn bare_addresses_are_single_hosts() {
        let config = load_ok(MAIN, GROUPS);
        let admins: Vec<String> = config.groups["admins"]
            .rules
            .iter()
            .map(|r| r.source.to_string())
            .collect();
        assert_eq!(admins, ["10.9.9.9/32", "2001:db8::/32"]);
        let single_v6 = "[group.apps]\nrules = [{ source = \"2001:db8::1\" }]\n\
                         [group.admins]\nrules = []\n";
        let config = load_ok(MAIN, single_v6);
        assert_eq!(
            config.groups["apps"].rules[0].source.to_string(),
            "2001:db8::1/128"
        );
        assert!(
            config.groups["admins"].rules.is_empty(),
            "empty groups are allowed"
        );
    }

    #[test]
    fn unknown_key_is_reported_at_its_line() {
        let main = format!("[engine]\nzeroize_after_failure = 3\n{MAIN}");
        assert_one_error(&main, GROUPS, "hsmgate.toml", 2, "zeroize_after_failure");
        let groups = "[group.apps]\ndescripton = \"x\"\n[group.admins]\n";
        assert_one_error(MAIN, groups, "sg.toml", 2, "descripton");
        let groups = "[group.apps]\nrules = [\n  { source = \"10.0.0.0/8\", port = 1 },\n]\n";
        assert_one_error(MAIN, groups, "sg.toml", 3, "port");
    }

    #[test]
    fn toml_syntax_error_is_reported_at_its_line() {
        let main = format!("{MAIN}\nsecurity_groups = [\"apps\"\n");
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].0, "hsmgate.toml");
        assert!(found[0].1.is_some());
    }

    #[test]
    fn wrong_type_is_reported_at_its_line() {
        let main = format!("[limits]\n\nmax_body_bytes = \"1MB\"\n{MAIN}");
        assert_one_error(&main, GROUPS, "hsmgate.toml", 3, "i64");
    }

    #[test]
    fn the_guard_reserve_must_stay_below_the_zeroization_threshold() {
        let main = format!("[engine]\nzeroize_after_failures = 3\nlogin_guard_reserve = 3\n{MAIN}");
        assert_one_error(
            &main,
            GROUPS,
            "hsmgate.toml",
            3,
            "must be below engine.zeroize_after_failures",
        );
        // The default reserve (1) with a threshold of 1 is refused too: the
        // operator has to turn the guard off explicitly.
        let main = format!("[engine]\nzeroize_after_failures = 1\n{MAIN}");
        assert_one_error(&main, GROUPS, "hsmgate.toml", 2, "login_guard_reserve (1)");
        let main = format!("[engine]\nzeroize_after_failures = 1\nlogin_guard_reserve = 0\n{MAIN}");
        assert_eq!(load_ok(&main, GROUPS).engine.login_guard_reserve, 0);
        let main = format!("[engine]\nzeroize_after_failures = 5\nlogin_guard_reserve = 2\n{MAIN}");
        assert_eq!(load_ok(&main, GROUPS).engine.login_guard_reserve, 2);
    }

    #[test]
    fn audit_and_metrics_sections_are_parsed_and_validated() {
        use crate::audit::{FsyncPolicy, KeyUseLevel};
        let config = load_ok(MAIN, GROUPS);
        assert_eq!(config.audit, crate::audit::AuditConfig::default());
        assert!(!config.metrics.enabled, "no [metrics] section: no listener");
        let main = format!(
            "{MAIN}\n[audit]\nfsync = \"batched\"\nbatch_interval_ms = 250\nkey_use = \"off\"\n\
             [metrics]\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"admins\"]\n"
        );
        let config = load_ok(&main, GROUPS);
        assert_eq!(
            config.audit.fsync,
            FsyncPolicy::Batched {
                interval: Duration::from_millis(250)
            }
        );
        assert_eq!(config.audit.key_use, KeyUseLevel::Off);
        assert!(config.metrics.enabled);
        assert_eq!(config.metrics.security_groups, ["admins"]);
        let bad = format!(
            "{MAIN}\n[audit]\nfsync = \"sometimes\"\n[metrics]\nsecurity_groups = [\"nope\"]\n"
        );
        let found = errors(&bad, &[("sg.toml", GROUPS)]);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].2.contains("audit.fsync must be"), "{found:#?}");
        assert!(found[0].1.is_some() && found[1].1.is_some(), "{found:#?}");
        assert!(
            found[1].2.contains("metrics.security_groups names group"),
            "{found:#?}"
        );
        // The default group must exist when metrics are on.
        let found = errors(&format!("{MAIN}\n[metrics]\n"), &[("sg.toml", GROUPS)]);
        assert!(found[0].2.contains("`monitoring`"), "{found:#?}");
    }

    #[test]
    fn upstream_section_is_validated_at_its_lines() {
        assert_eq!(load_ok(MAIN, GROUPS).upstream, None);
        let upstream = |nodes: &str, extra: &str| {
            format!("{MAIN}\n[upstream]\nca_file = \"c/ca.pem\"\n{extra}nodes = [\n{nodes}]\n")
        };
        let two = "{ id = 1, address = \"10.0.2.11:8200\" },\n\
                   { id = 2, address = \"10.0.2.12:8200\", server_name = \"node-2.example\" },\n";
        // Allowed: defaults filled in, the server name defaults to the IP.
        let u = load_ok(&upstream(two, ""), GROUPS).upstream.unwrap();
        assert_eq!(u.nodes.len(), 2);
        assert_eq!(u.nodes[0].server_name, "10.0.2.11");
        assert_eq!(u.nodes[1].server_name, "node-2.example");
        assert_eq!(u.health_interval, Duration::from_millis(1000));
        assert_eq!(u.client_cert, None);
        let with_cert = upstream(
            two,
            "cert_file = \"c/gw.pem\"\nkey_file = \"c/gw-key.pem\"\n",
        );
        assert!(load_ok(&with_cert, GROUPS)
            .upstream
            .unwrap()
            .client_cert
            .is_some());
        // Denied, each at its line.
        for (nodes, extra, needle) in [
            ("", "", "at least one engine node"),
            ("{ id = 0, address = \"10.0.2.11:8200\" },\n", "", "node id must be 1"),
            (
                "{ id = 1, address = \"10.0.2.11:8200\" },\n{ id = 1, address = \"10.0.2.12:8200\" },\n",
                "",
                "appears twice",
            ),
            ("{ id = 1, address = \"node1:8200\" },\n", "", "not an IP address"),
            ("{ id = 1, address = \"0.0.0.0:8200\" },\n", "", "not an IP address"),
            (two, "cert_file = \"c/gw.pem\"\n", "go together"),
            (two, "health_interval_ms = 5\n", "health_interval_ms"),
            (two, "timeout_ms = 0\n", "timeout_ms"),
        ] {
            let found = errors(&upstream(nodes, extra), &[("sg.toml", GROUPS)]);
            assert!(
                found.iter().any(|e| e.2.contains(needle) && e.1.is_some()),
                "{nodes}{extra}: {found:#?}"
            );
        }
        // Denied: rules a gateway would not enforce, and a break-glass door.
        let jwt_free_conflicts = [
            (
                "[[listener]]\nname = \"bg\"\naddress = \"127.0.0.1:8210\"\n\
                 security_groups = [\"admins\"]\nadmin_groups = [\"admins\"]\n\
                 channel = \"break-glass\"\n",
                "no break-glass door",
            ),
            (
                "[bench]\ndangerous_unfenced_listener = \"127.0.0.1:18200\"\n",
                "dangerous_unfenced_listener",
            ),
        ];
        for (extra, needle) in jwt_free_conflicts {
            let main = format!("{extra}{}", upstream(two, ""));
            let found = errors(&main, &[("sg.toml", GROUPS)]);
            assert!(found.iter().any(|e| e.2.contains(needle)), "{found:#?}");
        }
        let policy = "[[policy]]\nname = \"p\"\n[[policy.path]]\npath = \"transit/encrypt/p\"\n\
                      capabilities = [\"update\"]\n";
        let found = errors(
            &upstream(two, ""),
            &[("sg.toml", GROUPS), ("acl.toml", policy)],
        );
        assert!(
            found.iter().any(|e| e.2.contains("access policies")),
            "{found:#?}"
        );
    }

    #[test]
    fn cluster_section_is_validated_at_its_lines() {
        assert_eq!(load_ok(MAIN, GROUPS).cluster, None);
        let cluster = |extra: &str| {
            format!(
                "{MAIN}\n[cluster]\nnode_id = 2\nca_file = \"c/ca.pem\"\ncert_file = \"c/n.pem\"\n\
                 key_file = \"c/n-key.pem\"\nsecurity_groups = [\"admins\"]\n{extra}"
            )
        };
        // Allowed: the defaults filled in.
        let c = load_ok(&cluster(""), GROUPS).cluster.unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.address, "127.0.0.1:8201".parse().unwrap());
        assert_eq!(c.advertise, "127.0.0.1:8201");
        assert_eq!(c.election_timeout_ms, (1500, 3000));
        // Denied, each at its line: node 0, a bad address, an undefined
        // group, an inverted timeout, a sealed engine.
        for (extra, needle) in [
            ("node_id = 0\n", "cluster.node_id"),
            ("address = \"localhost\"\n", "cluster.address"),
            ("advertise = \"nohost\"\n", "cluster.advertise"),
            (
                "election_timeout_ms = [3000, 1000]\n",
                "election_timeout_ms",
            ),
            ("heartbeat_ms = 0\n", "heartbeat_ms"),
        ] {
            let main = cluster(extra).replacen(
                "node_id = 2\n",
                "",
                usize::from(extra.starts_with("node_id")),
            );
            let found = errors(&main, &[("sg.toml", GROUPS)]);
            assert!(
                found.iter().any(|e| e.2.contains(needle) && e.1.is_some()),
                "{extra}: {found:#?}"
            );
        }
        let main = cluster("").replace(
            "security_groups = [\"admins\"]\n",
            "security_groups = [\"nobody\"]\n",
        );
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].2.contains("cluster.security_groups"), "{found:#?}");
        let main = format!("[engine]\nseal = \"passphrase\"\n{}", cluster(""));
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert!(
            found.iter().any(|e| e.2.contains("seal = \"auto\"")),
            "{found:#?}"
        );
    }

    #[test]
    fn dangerous_unfenced_listener_is_off_by_default_and_loopback_only() {
        assert_eq!(load_ok(MAIN, GROUPS).dangerous_unfenced_listener, None);
        // Allowed: loopback, IPv4 and IPv6.
        for ok in ["127.0.0.1:18200", "127.0.0.2:0", "[::1]:18200"] {
            let main = format!("{MAIN}\n[bench]\ndangerous_unfenced_listener = \"{ok}\"\n");
            assert_eq!(
                load_ok(&main, GROUPS).dangerous_unfenced_listener,
                Some(ok.parse().unwrap()),
                "{ok}"
            );
        }
        // Denied: anything another host could reach, and non-addresses.
        for bad in [
            "0.0.0.0:18200",
            "10.0.0.1:18200",
            "[::]:18200",
            "[::ffff:10.0.0.1]:18200",
            "[2001:db8::1]:18200",
            "localhost:18200",
            "127.0.0.1",
        ] {
            let main = format!("{MAIN}\n[bench]\ndangerous_unfenced_listener = \"{bad}\"\n");
            let found = errors(&main, &[("sg.toml", GROUPS)]);
            assert_eq!(found.len(), 1, "{bad}: {found:#?}");
            assert!(
                found[0].2.contains("bench.dangerous_unfenced_listener"),
                "{bad}: {found:#?}"
            );
            assert!(found[0].1.is_some(), "{bad}: a line number: {found:#?}");
        }
        // Unknown keys in [bench] are errors like everywhere else.
        let main = format!("{MAIN}\n[bench]\nunfenced = \"127.0.0.1:1\"\n");
        assert_eq!(errors(&main, &[("sg.toml", GROUPS)]).len(), 1);
    }

    #[test]
    fn listener_channel_is_front_door_by_default_and_validated() {
        let config = load_ok(MAIN, GROUPS);
        assert!(config
            .listeners
            .iter()
            .all(|l| l.channel == Channel::FrontDoor));
        let main = MAIN.replace(
            "admin_groups = [\"admins\"]",
            "admin_groups = [\"admins\"]\nchannel = \"break-glass\"",
        );
        assert_eq!(
            load_ok(&main, GROUPS).listeners[0].channel,
            Channel::BreakGlass
        );
        let main = MAIN.replace(
            "admin_groups = [\"admins\"]",
            "admin_groups = [\"admins\"]\nchannel = \"back-door\"",
        );
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].2.contains("channel must be"), "{found:#?}");
    }

    #[test]
    fn forwarding_is_one_mechanism_from_trusted_proxies_and_never_on_break_glass() {
        let with = |keys: &str| {
            MAIN.replace(
                "admin_groups = [\"admins\"]",
                &format!("admin_groups = [\"admins\"]\n{keys}"),
            )
        };
        assert_eq!(
            load_ok(MAIN, GROUPS).listeners[0].forwarded,
            Forwarded::None
        );
        let ok = load_ok(
            &with("trusted_proxy_groups = [\"apps\"]\nxff_hops = 2"),
            GROUPS,
        );
        assert_eq!(
            ok.listeners[0].forwarded,
            Forwarded::XForwardedFor { hops: 2 }
        );
        assert_eq!(ok.listeners[0].trusted_proxy_groups, ["apps"]);
        let ok = load_ok(
            &with("trusted_proxy_groups = [\"apps\"]\nproxy_protocol = true"),
            GROUPS,
        );
        assert_eq!(ok.listeners[0].forwarded, Forwarded::ProxyProtocol);
        for (keys, message) in [
            ("xff_hops = 1", "xff_hops needs trusted_proxy_groups"),
            (
                "proxy_protocol = true",
                "proxy_protocol needs trusted_proxy_groups",
            ),
            ("trusted_proxy_groups = [\"apps\"]", "needs xff_hops"),
            (
                "trusted_proxy_groups = [\"apps\"]\nxff_hops = 1\nproxy_protocol = true",
                "not both",
            ),
            (
                "trusted_proxy_groups = [\"apps\"]\nxff_hops = 0",
                "xff_hops must be between",
            ),
            (
                "trusted_proxy_groups = [\"nope\"]\nxff_hops = 1",
                "no policy file defines",
            ),
            (
                "channel = \"break-glass\"\ntrusted_proxy_groups = [\"apps\"]\nxff_hops = 1",
                "break-glass listener trusts no proxy",
            ),
            ("client_auth = \"required\"", "client_auth needs client_ca"),
            (
                "client_ca = \"ca.pem\"\nclient_auth = \"sometimes\"",
                "must be \"required\" or \"optional\"",
            ),
        ] {
            let found = errors(&with(keys), &[("sg.toml", GROUPS)]);
            assert!(
                found.iter().any(|f| f.2.contains(message) && f.1.is_some()),
                "{keys}: {found:#?}"
            );
        }
        let ok = load_ok(&with("client_ca = \"ca.pem\""), GROUPS);
        let auth = ok.listeners[0].client_auth.as_ref().unwrap();
        assert!(auth.required, "client_auth defaults to required");
        // A mapping with no listener asking for certificates is an error.
        let main = format!("{MAIN}\n[[cert_principal]]\nname = \"p\"\nsubject_cn = \"svc\"\n");
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert!(
            found
                .iter()
                .any(|f| f.2.contains("no listener sets client_ca")),
            "{found:#?}"
        );
    }

    /// A certificate mapping's policy names are checked like a JWT role's:
    /// with access policies on, an undeclared name is an error at its line;
    /// a declared one loads.
    #[test]
    fn cert_principal_policies_must_be_declared_when_acls_are_on() {
        let acl = "[[policy]]\nname = \"payments\"\n[[policy.path]]\npath = \"transit/encrypt/p\"\ncapabilities = [\"update\"]\n";
        let main = format!(
            "{MAIN}client_ca = \"ca.pem\"\n\n[[cert_principal]]\nname = \"svc\"\nsubject_cn = \"svc\"\npolicies = [\"payments\", \"nope\"]\n"
        );
        let found = errors(&main, &[("sg.toml", GROUPS), ("acl.toml", acl)]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].2.contains("nope") && found[0].2.contains("cert_principal"),
            "{found:#?}"
        );
        assert_eq!(found[0].1, Some(12), "{found:#?}");
        let ok = main.replace(", \"nope\"", "");
        if let Err(e) = load_from_str(
            Path::new("hsmgate.toml"),
            &ok,
            &policies(&[("sg.toml", GROUPS), ("acl.toml", acl)]),
        ) {
            panic!("expected a valid config, got:\n{e}");
        }
    }

    #[test]
    fn out_of_range_values_are_reported_at_their_lines() {
        for (key, table, bad, good) in [
            ("zeroize_after_failures", "engine", "0", "2"),
            ("zeroize_after_failures", "engine", "11", "10"),
            ("login_guard_reserve", "engine", "-1", "0"),
            ("login_guard_reserve", "engine", "10", "2"),
            ("lock_user_after_failures", "engine", "101", "100"),
            ("session_ttl_seconds", "engine", "59", "60"),
            ("session_ttl_seconds", "engine", "86401", "86400"),
            ("auto_rotate_check_seconds", "engine", "0", "1"),
            ("auto_rotate_check_seconds", "engine", "3601", "3600"),
            ("auto_rotate_check_seconds", "engine", "-60", "60"),
            ("max_body_bytes", "limits", "0", "67108864"),
            ("max_body_bytes", "limits", "-1", "1"),
            ("max_header_bytes", "limits", "1023", "1048576"),
            ("header_read_timeout_ms", "limits", "99", "600000"),
            ("tls_handshake_timeout_ms", "limits", "600001", "100"),
        ] {
            let main = format!("[{table}]\n{key} = {bad}\n{MAIN}");
            assert_one_error(&main, GROUPS, "hsmgate.toml", 2, &format!("{table}.{key}"));
            load_ok(&format!("[{table}]\n{key} = {good}\n{MAIN}"), GROUPS);
        }
    }

    #[test]
    fn listener_problems_are_reported_at_their_lines() {
        let dup = format!("{MAIN}\n[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:8201\"\nsecurity_groups = [\"apps\"]\n");
        assert_one_error(&dup, GROUPS, "hsmgate.toml", 9, "already used at line 3");

        let empty = MAIN.replace("name = \"api\"", "name = \"\"");
        assert_one_error(&empty, GROUPS, "hsmgate.toml", 3, "must not be empty");

        let spaces = MAIN.replace("name = \"api\"", "name = \"my api\"");
        assert_one_error(&spaces, GROUPS, "hsmgate.toml", 3, "characters from");

        let host = MAIN.replace("127.0.0.1:8200", "localhost:8200");
        assert_one_error(
            &host,
            GROUPS,
            "hsmgate.toml",
            4,
            "host names are not accepted",
        );
        let no_port = MAIN.replace("127.0.0.1:8200", "127.0.0.1");
        assert_one_error(&no_port, GROUPS, "hsmgate.toml", 4, "IP address and port");
        let v6 = MAIN.replace("127.0.0.1:8200", "[::1]:8200");
        assert_eq!(
            load_ok(&v6, GROUPS).listeners[0].address,
            "[::1]:8200".parse().unwrap()
        );

        let same_address = format!("{MAIN}[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:8200\"\nsecurity_groups = [\"apps\"]\n");
        assert_one_error(
            &same_address,
            GROUPS,
            "hsmgate.toml",
            9,
            "already used by listener `api`",
        );
        let port_zero = concat!(
            "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"apps\"]\n",
            "[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"apps\"]\n"
        );
        assert_eq!(load_ok(port_zero, GROUPS).listeners.len(), 2);

        let no_groups = MAIN.replace(
            "security_groups = [\"apps\", \"admins\"]",
            "security_groups = []",
        );
        assert_one_error(&no_groups, GROUPS, "hsmgate.toml", 5, "at least one group");
        let missing_groups = MAIN.replace("security_groups = [\"apps\", \"admins\"]\n", "");
        assert_one_error(
            &missing_groups,
            GROUPS,
            "hsmgate.toml",
            2,
            "at least one group",
        );

        let none = errors("", &[("sg.toml", GROUPS)]);
        assert_eq!(none.len(), 1, "{none:#?}");
        assert!(none[0].2.contains("no [[listener]]"));
    }

    #[test]
    fn undefined_groups_are_reported_at_the_name() {
        let main = MAIN.replace("[\"apps\", \"admins\"]", "[\"apps\",\n  \"apss\"]");
        assert_one_error(
            &main,
            GROUPS,
            "hsmgate.toml",
            6,
            "`apss`, which no policy file defines",
        );
        let main = MAIN.replace("admin_groups = [\"admins\"]", "admin_groups = [\"root\"]");
        let found = errors(&main, &[("sg.toml", GROUPS)]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].1, Some(6));
        assert!(
            found[0].2.contains("admin_groups names group `root`"),
            "{}",
            found[0].2
        );
        assert!(
            found[0].2.contains("defined: `admins`, `apps`"),
            "{}",
            found[0].2
        );
    }

    #[test]
    fn a_broken_policy_file_does_not_cascade_into_undefined_groups() {
        let found = errors(MAIN, &[("sg.toml", "[group.apps\n")]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!((found[0].0.as_str(), found[0].1), ("sg.toml", Some(1)));
    }

    #[test]
    fn bad_sources_are_reported_at_their_lines() {
        let cases = [
            (
                "10.0.0.1/8",
                "write 10.0.0.0/8 for the network, or 10.0.0.1/32",
            ),
            (
                "2001:db8::1/32",
                "write 2001:db8::/32 for the network, or 2001:db8::1/128",
            ),
            ("10.0.0.0/33", "from 0 to 32"),
            ("10.0.0.0/", "from 0 to 32"),
            ("10.0.0.0/+8", "from 0 to 32"),
            ("::/129", "from 0 to 128"),
            ("010.0.0.0/8", "not an IP network"),
            ("db.example.com", "host names are not accepted"),
            ("10.0.0.0/8 ", "from 0 to 32"),
            ("", "not an IP network"),
            ("::ffff:10.0.0.0/104", "write 10.0.0.0/8"),
            ("::ffff:10.1.2.3", "write 10.1.2.3/32"),
        ];
        for (source, needle) in cases {
            let groups = format!(
                "[group.admins]\n[group.apps]\nrules = [\n  {{ source = \"10.0.0.0/8\" }},\n  {{ source = \"{source}\" }},\n]\n"
            );
            assert_one_error(MAIN, &groups, "sg.toml", 5, needle);
        }
        // Wider IPv6 networks that merely contain the mapped range are fine.
        load_ok(
            MAIN,
            "[group.admins]\n[group.apps]\nrules = [{ source = \"::/0\" }]\n",
        );
    }

    #[test]
    fn group_name_problems_are_reported() {
        let dup = errors(
            MAIN,
            &[
                ("a.toml", GROUPS),
                ("b.toml", "# b\n[group.apps]\nrules = []\n"),
            ],
        );
        assert_eq!(dup.len(), 1, "{dup:#?}");
        assert_eq!((dup[0].0.as_str(), dup[0].1), ("b.toml", Some(2)));
        assert!(
            dup[0].2.contains("already defined at a.toml:2"),
            "{}",
            dup[0].2
        );

        let bad_name = format!("{GROUPS}[group.\"a b\"]\n");
        assert_one_error(MAIN, &bad_name, "sg.toml", 8, "group name");

        let stray = format!("{GROUPS}[groups.other]\n");
        assert_one_error(MAIN, &stray, "sg.toml", 8, "unknown field `groups`");
    }

    #[test]
    fn files_without_groups_are_left_to_others() {
        let config = load_from_str(
            Path::new("hsmgate.toml"),
            MAIN,
            &policies(&[
                ("sg.toml", GROUPS),
                ("rate.toml", "[rate_limit.login]\nburst = 3\n"),
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.groups.len(), 2);
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let cert_only = format!("[tls]\ncert_file = \"cert.pem\"\n{MAIN}");
        assert_one_error(&cert_only, GROUPS, "hsmgate.toml", 2, "tls.key_file is not");
        let key_only = format!("[tls]\n\nkey_file = \"key.pem\"\n{MAIN}");
        assert_one_error(&key_only, GROUPS, "hsmgate.toml", 3, "tls.cert_file is not");
    }

    #[test]
    fn several_errors_are_reported_at_once_in_file_order() {
        let main = format!(
            "[engine]\nzeroize_after_failures = 0\nsession_ttl_seconds = 1\n{}",
            MAIN.replace("127.0.0.1:8200", "nowhere")
                .replace("\"admins\"]\n", "\"nobody\"]\n")
        );
        let groups = format!("{GROUPS}[group.bad]\nrules = [{{ source = \"10.0.0.1/8\" }}]\n");
        let found = errors(&main, &[("sg.toml", &groups)]);
        let positions: Vec<(&str, Option<usize>)> =
            found.iter().map(|(f, l, _)| (f.as_str(), *l)).collect();
        assert_eq!(
            positions,
            [
                ("hsmgate.toml", Some(2)),
                ("hsmgate.toml", Some(3)),
                ("hsmgate.toml", Some(7)),
                ("hsmgate.toml", Some(8)),
                ("hsmgate.toml", Some(9)),
                ("sg.toml", Some(9)),
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn display_is_path_line_column_message() {
        let main = format!("[engine]\n  zeroize_after_failures = 11\n{MAIN}");
        let err = load_from_str(
            Path::new("conf/h.toml"),
            &main,
            &policies(&[("sg.toml", GROUPS)]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "conf/h.toml:2:28: engine.zeroize_after_failures must be between 1 and 10, not 11"
        );
        let no_position = ConfigError {
            file: PathBuf::from("x.toml"),
            line: None,
            column: None,
            message: "cannot read".into(),
        };
        assert_eq!(no_position.to_string(), "x.toml: cannot read");
        let two = ConfigErrors(vec![no_position.clone(), no_position]);
        assert_eq!(two.to_string(), "x.toml: cannot read\nx.toml: cannot read");
    }

    #[test]
    fn messages_do_not_echo_raw_lines() {
        let secretish = "[group.admins]\n[group.apps]\nrules = [{ source = \"10.0.0.0/8\", description = \"hunter2\", oops = 1 }]\n";
        let found = errors(MAIN, &[("sg.toml", secretish)]);
        assert_eq!(found.len(), 1);
        assert!(!found[0].2.contains("hunter2"), "{}", found[0].2);
        assert!(!found[0].2.contains('\n'));
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(position("ab\ncé d", 8), (2, 5));
        assert_eq!(position("x", 0), (1, 1));
        assert_eq!(position("x\n", 99), (2, 1));
    }

    #[test]
    fn load_reads_the_policies_dir_and_reports_file_problems() {
        let dir = tempfile::tempdir().unwrap();
        let main_path = dir.path().join("hsmgate.toml");
        let missing = format!("policies_dir = \"nope\"\n{MAIN}");
        std::fs::write(&main_path, &missing).unwrap();
        let err = load(&main_path).unwrap_err().0;
        assert_eq!(err.len(), 1, "{err:#?}");
        assert_eq!(err[0].line, Some(1));
        assert!(
            err[0].message.contains("policies_dir `nope`"),
            "{}",
            err[0].message
        );

        std::fs::write(dir.path().join("nope"), "").unwrap();
        let err = load(&main_path).unwrap_err().0;
        assert!(
            err[0].message.contains("is not a directory"),
            "{}",
            err[0].message
        );

        let policies = dir.path().join("pol");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(policies.join("sg.toml"), GROUPS).unwrap();
        std::fs::write(policies.join("notes.txt"), "not toml [").unwrap();
        std::fs::write(policies.join(".#sg.toml"), "editor junk [").unwrap();
        std::fs::create_dir(policies.join("old.toml")).unwrap();
        let main = format!("policies_dir = \"pol\"\n{MAIN}");
        std::fs::write(&main_path, &main).unwrap();
        let config = load(&main_path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.groups.len(), 2);
        assert_eq!(config.source_path, main_path);

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("gone", policies.join("broken.toml")).unwrap();
            let err = load(&main_path).unwrap_err().0;
            assert_eq!(err.len(), 1, "{err:#?}");
            assert_eq!(err[0].file, policies.join("broken.toml"));
            assert_eq!(err[0].line, None);
            std::fs::remove_file(policies.join("broken.toml")).unwrap();
        }

        let tls = format!(
            "policies_dir = \"pol\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{MAIN}"
        );
        std::fs::write(&main_path, &tls).unwrap();
        std::fs::write(dir.path().join("c.pem"), "").unwrap();
        let err = load(&main_path).unwrap_err().0;
        assert_eq!(err.len(), 1, "{err:#?}");
        assert_eq!(err[0].line, Some(4));
        assert!(
            err[0].message.starts_with("tls.key_file"),
            "{}",
            err[0].message
        );

        let no_dir = MAIN.to_string();
        std::fs::write(&main_path, &no_dir).unwrap();
        let err = load(&main_path).unwrap_err().0;
        assert!(
            err[0].message.contains("policies_dir is required"),
            "{}",
            err[0].message
        );

        let err = load(&dir.path().join("absent.toml")).unwrap_err().0;
        assert_eq!(err.len(), 1);
        assert!(err[0].message.contains("cannot read the config file"));
    }
}
