//! Decides whether a peer address may connect to a listener, and whether it
//! may use admin routes (and log in as crypto officer) there.
//!
//! This is the first decision on every connection, taken before TLS or HTTP:
//! a peer it refuses never reaches code that could spend a login attempt.
//! It is default deny (AWS security-group semantics): a listener admits the
//! union of the rules of the groups attached to it, and nothing else. Deny
//! lists (like network ACLs) are checked first: a deny beats any allow.
//! Rules may carry a port range: they then apply only on listeners bound to
//! a port in it. Route classes (transit, login, admin, health) may narrow
//! further per listener ([`ListenerFilter::check_class`]).
//!
//! The rules of each listener are compiled once per config snapshot into
//! prefix tries (one for IPv4, one for IPv6), so a lookup walks at most 32 or
//! 128 levels however many rules there are: imported lists of a million
//! networks are a normal size. A prefix list is compiled once per snapshot
//! and shared by every listener and rule that names it.
//!
//! Every denial is counted per listener and reason ([`deny_counts`], for the
//! metrics exporter) and folded into bounded per-source summaries that are
//! logged once per interval ([`DenySummary`]): a flood never becomes a log
//! flood.
//!
//! ## IPv4-mapped IPv6
//!
//! A dual-stack socket reports IPv4 clients as `::ffff:a.b.c.d`. Such a peer
//! is the IPv4 client `a.b.c.d` and is matched as that, by IPv4 rules only:
//! [`canonical`] is applied inside [`CidrSet::contains`], so no caller can
//! forget it. The consequence for IPv6 rules: `::/0` means "every IPv6
//! client" and does *not* admit IPv4 clients, whichever socket they arrive
//! on. Config validation refuses rules written in the mapped form
//! (`::ffff:10.0.0.0/104`) and asks for the IPv4 form; [`CidrSet::from_nets`],
//! which does not go through validation, converts them to the IPv4 network
//! they denote, so both spellings mean the same thing everywhere.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixSet;

use crate::config::{Config, PortRange, Rule, RuleSource};

/// The IPv4 address for an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`);
/// every other address unchanged.
///
/// Deliberately not `Ipv6Addr::to_ipv4`, which also converts the deprecated
/// IPv4-compatible form and so would turn `::1` into `0.0.0.1`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// One compiled set of networks: longest-prefix tries for IPv4 and IPv6,
/// built once per config snapshot, so lookup cost does not grow with the
/// number of rules.
#[derive(Clone, Default)]
pub struct CidrSet {
    v4: PrefixSet<Ipv4Net>,
    v6: PrefixSet<Ipv6Net>,
    /// A flat, cache-friendly copy of `v4` for membership tests, built by
    /// [`CidrSet::from_nets`]; `None` after [`CidrSet::insert`] (the trie
    /// then answers).
    v4_index: Option<Arc<V4Index>>,
}

/// IPv4 networks as merged, sorted, disjoint ranges, with a 65,536-entry
/// table indexed by an address's top 16 bits pointing at the ranges that
/// start inside that /16: a lookup is one table read and a binary search
/// over a handful of ranges, instead of a walk through a trie too large for
/// the cache (see docs/BENCHMARKS.md).
struct V4Index {
    starts: Vec<u32>,
    ends: Vec<u32>,
    /// `buckets[b]`: the first range whose start is at or after `b << 16`.
    buckets: Vec<u32>,
}

impl V4Index {
    fn build(trie: &PrefixSet<Ipv4Net>) -> V4Index {
        let mut ranges: Vec<(u32, u32)> = trie
            .iter()
            .map(|net| (u32::from(net.network()), u32::from(net.broadcast())))
            .collect();
        ranges.sort_unstable();
        Self::from_sorted(&ranges)
    }

    /// From `(first, last)` address ranges sorted by `first`.
    fn from_sorted(ranges: &[(u32, u32)]) -> V4Index {
        let mut starts: Vec<u32> = Vec::with_capacity(ranges.len());
        let mut ends: Vec<u32> = Vec::with_capacity(ranges.len());
        for &(start, end) in ranges {
            match ends.last_mut() {
                // Overlapping or adjacent: extend the previous range.
                Some(last) if start <= last.saturating_add(1) => *last = (*last).max(end),
                _ => {
                    starts.push(start);
                    ends.push(end);
                }
            }
        }
        let mut buckets = Vec::with_capacity(65_537);
        let mut i = 0usize;
        for b in 0..=65_536u64 {
            while i < starts.len() && u64::from(starts[i]) < (b << 16) {
                i += 1;
            }
            buckets.push(i as u32);
        }
        V4Index {
            starts,
            ends,
            buckets,
        }
    }

    fn contains(&self, ip: u32) -> bool {
        let b = (ip >> 16) as usize;
        let (lo, hi) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        // The last range starting at or before `ip`: inside this bucket, or
        // else the last one starting before it (it may span into it).
        let found = lo + self.starts[lo..hi].partition_point(|s| *s <= ip);
        found > 0 && ip <= self.ends[found - 1]
    }
}

impl CidrSet {
    /// The empty set: admits nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compiles `nets`. Host bits are ignored (validated config has none);
    /// IPv4-mapped IPv6 networks become the IPv4 networks they denote.
    ///
    /// The networks are sorted (and exact duplicates dropped) before they go
    /// into the tries: neighbouring inserts then walk the same, cache-warm
    /// trie nodes, and the IPv4 index is built from the same sorted order
    /// without walking the trie and sorting again. At a million networks
    /// this is about 4× faster than inserting in input order
    /// (docs/BENCHMARKS.md).
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut v4: Vec<Ipv4Net> = Vec::new();
        let mut v6: Vec<Ipv6Net> = Vec::new();
        for net in nets {
            match canonical_net(net) {
                IpNet::V4(net) => v4.push(net),
                IpNet::V6(net) => v6.push(net),
            }
        }
        // Ipv4Net orders by network address, then prefix length.
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        let mut set = Self::new();
        for net in &v4 {
            set.v4.insert(*net);
        }
        for net in v6 {
            set.v6.insert(net);
        }
        let ranges: Vec<(u32, u32)> = v4
            .iter()
            .map(|net| (u32::from(net.network()), u32::from(net.broadcast())))
            .collect();
        set.v4_index = Some(Arc::new(V4Index::from_sorted(&ranges)));
        set
    }

    /// The same set built one [`insert`](Self::insert) at a time in the
    /// given order, then [`seal`](Self::seal)ed: the way `from_nets` worked
    /// before it sorted. Kept for the build benchmark's comparison.
    pub fn from_nets_unsorted(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut set = Self::new();
        for net in nets {
            set.insert(net);
        }
        set.seal();
        set
    }

    /// Builds the flat IPv4 index; call after the last `insert`.
    pub fn seal(&mut self) {
        self.v4_index = Some(Arc::new(V4Index::build(&self.v4)));
    }

    /// Adds one network (host bits ignored, mapped form folded to IPv4).
    pub fn insert(&mut self, net: IpNet) {
        self.v4_index = None;
        match canonical_net(net) {
            IpNet::V4(net) => self.v4.insert(net),
            IpNet::V6(net) => self.v6.insert(net),
        };
    }

    /// Whether some network in the set covers `ip` (after [`canonical`]).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(v4) => match &self.v4_index {
                Some(index) => index.contains(u32::from(v4)),
                None => self.v4.is_covered(&Ipv4Net::from(v4)),
            },
            IpAddr::V6(v6) => self.v6.is_covered(&Ipv6Net::from(v6)),
        }
    }

    /// The most specific network in the set that covers `ip` (after
    /// [`canonical`]): the rule to name in a log line saying why a peer was
    /// admitted.
    pub fn longest_match(&self, ip: IpAddr) -> Option<IpNet> {
        match canonical(ip) {
            IpAddr::V4(v4) => self.v4.get_lpm(&Ipv4Net::from(v4)).map(IpNet::V4),
            IpAddr::V6(v6) => self.v6.get_lpm(&Ipv6Net::from(v6)).map(IpNet::V6),
        }
    }

    /// Number of distinct networks (duplicates across groups count once).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<IpNet> for CidrSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        Self::from_nets(nets)
    }
}

/// Counts only: a set can hold millions of networks.
impl fmt::Debug for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CidrSet")
            .field("v4", &self.v4.len())
            .field("v6", &self.v6.len())
            .finish()
    }
}

/// `::ffff:a.b.c.d/n` (n ≥ 96) is the IPv4 network `a.b.c.d/(n-96)`; peers of
/// that form are looked up as IPv4, so the network has to live there too.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                if let Ok(v4) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(v4.trunc());
                }
            }
        }
    }
    net.trunc()
}

/// Why a peer was refused. Also the `reason` label of the deny counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// A deny list (global or the listener's) covers the peer.
    DenyList,
    /// No rule of the listener's security groups covers the peer.
    NotInGroups,
    /// Admitted by the listener, but not by the route class's groups.
    NotInTransitGroups,
    NotInLoginGroups,
    NotInAdminGroups,
    NotInHealthGroups,
    /// A PROXY protocol header from a peer outside the trusted-proxy groups:
    /// an attempt to choose its own client address.
    ProxyHeaderUntrusted,
    /// A trusted proxy on a `proxy_protocol` listener sent no valid header
    /// in time (garbage, none, too long, or a revoked proxy's connection).
    ProxyHeaderInvalid,
}

impl DenyReason {
    pub const ALL: [DenyReason; 8] = [
        DenyReason::DenyList,
        DenyReason::NotInGroups,
        DenyReason::NotInTransitGroups,
        DenyReason::NotInLoginGroups,
        DenyReason::NotInAdminGroups,
        DenyReason::NotInHealthGroups,
        DenyReason::ProxyHeaderUntrusted,
        DenyReason::ProxyHeaderInvalid,
    ];

    /// Stable, metric-label friendly.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyList => "deny-list",
            DenyReason::NotInGroups => "not-in-groups",
            DenyReason::NotInTransitGroups => "not-in-transit-groups",
            DenyReason::NotInLoginGroups => "not-in-login-groups",
            DenyReason::NotInAdminGroups => "not-in-admin-groups",
            DenyReason::NotInHealthGroups => "not-in-health-groups",
            DenyReason::ProxyHeaderUntrusted => "proxy-header-untrusted",
            DenyReason::ProxyHeaderInvalid => "proxy-header-invalid",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The route classes that may demand their own networks. The gateway maps
/// its routes onto these; netfilter knows nothing of paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetClass {
    Transit,
    Login,
    Admin,
    Health,
}

/// A set of rules compiled for lookup: each part is one trie pair and an
/// optional port range. Inline networks with the same port range share one
/// part; each prefix list is its own part, compiled once per snapshot and
/// shared by every listener using it. Lookup cost is one trie walk per part:
/// it grows with the number of distinct prefix lists and port ranges a
/// listener uses, never with the number of networks.
#[derive(Debug, Clone, Default)]
struct Matcher {
    parts: Vec<(Option<PortRange>, Arc<CidrSet>)>,
}

impl Matcher {
    /// `ip` is already canonical.
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.parts
            .iter()
            .any(|(ports, set)| ports.is_none_or(|r| r.contains(port)) && set.contains(ip))
    }

    fn len(&self) -> usize {
        self.parts.iter().map(|(_, s)| s.len()).sum()
    }
}

/// Compiles rules into [`Matcher`]s, building each prefix list's set once.
struct Compiler<'a> {
    config: &'a Config,
    lists: HashMap<&'a str, Arc<CidrSet>>,
}

impl<'a> Compiler<'a> {
    fn list(&mut self, name: &'a str) -> Arc<CidrSet> {
        if let Some(set) = self.lists.get(name) {
            return set.clone();
        }
        let set = Arc::new(match self.config.prefix_lists.get(name) {
            Some(list) => CidrSet::from_nets(list.nets.iter().copied()),
            // Unvalidated config: an unknown list contributes nothing (for an
            // allow rule, the failure mode is to admit fewer peers).
            None => CidrSet::new(),
        });
        self.lists.insert(name, set.clone());
        set
    }

    fn compile(&mut self, rules: impl Iterator<Item = &'a Rule>) -> Matcher {
        let mut inline: Vec<(Option<PortRange>, CidrSet)> = Vec::new();
        let mut parts: Vec<(Option<PortRange>, Arc<CidrSet>)> = Vec::new();
        for rule in rules {
            match &rule.source {
                RuleSource::Net(net) => match inline.iter_mut().find(|(p, _)| *p == rule.ports) {
                    Some((_, set)) => set.insert(*net),
                    None => inline.push((rule.ports, CidrSet::from_nets([*net]))),
                },
                RuleSource::PrefixList(name) => {
                    let set = self.list(name);
                    if !parts
                        .iter()
                        .any(|(p, s)| *p == rule.ports && Arc::ptr_eq(s, &set))
                    {
                        parts.push((rule.ports, set));
                    }
                }
            }
        }
        let mut all: Vec<_> = inline
            .into_iter()
            .map(|(p, mut s)| {
                s.seal();
                (p, Arc::new(s))
            })
            .collect();
        all.extend(parts);
        Matcher { parts: all }
    }

    fn groups(&mut self, names: &'a [String]) -> Matcher {
        let config = self.config;
        self.compile(
            names
                .iter()
                .filter_map(|name| config.groups.get(name))
                .flat_map(|group| group.rules.iter()),
        )
    }

    fn deny_lists(&mut self, names: impl Iterator<Item = &'a String>) -> Matcher {
        let config = self.config;
        self.compile(
            names
                .filter_map(|name| config.deny_lists.get(name))
                .flat_map(|list| list.rules.iter()),
        )
    }
}

/// The decisions for one listener.
#[derive(Debug, Clone)]
pub struct ListenerFilter {
    pub name: String,
    /// Global deny lists, then the listener's own.
    deny: Matcher,
    /// Union of the listener's `security_groups`.
    connect: Matcher,
    /// Union of the listener's `admin_groups`.
    admin: Matcher,
    /// Per-class narrowing; `None`: whoever may connect.
    transit: Option<Matcher>,
    login: Option<Matcher>,
    health: Option<Matcher>,
    /// Union of the listener's `trusted_proxy_groups`: peers whose
    /// `X-Forwarded-For` or PROXY header is believed. Empty: nobody's.
    proxies: Matcher,
    counters: Arc<ListenerCounters>,
}

impl ListenerFilter {
    /// For callers that compile their own sets (tests, benchmarks): `connect`
    /// and `admin` apply on every port; no deny list, no class narrowing.
    pub fn new(name: impl Into<String>, connect: CidrSet, admin: CidrSet) -> Self {
        let name = name.into();
        let whole = |set: CidrSet| Matcher {
            parts: vec![(None, Arc::new(set))],
        };
        ListenerFilter {
            counters: counters_for(&name),
            name,
            deny: Matcher::default(),
            connect: whole(connect),
            admin: whole(admin),
            transit: None,
            login: None,
            health: None,
            proxies: Matcher::default(),
        }
    }

    /// Trusts `proxies` (every port) to name the client (tests, benchmarks).
    pub fn with_proxies(mut self, proxies: CidrSet) -> Self {
        self.proxies = Matcher {
            parts: vec![(None, Arc::new(proxies))],
        };
        self
    }

    /// Whether `peer` is one of the listener's trusted proxies (and on no
    /// deny list): only then is its word about the client believed.
    pub fn is_trusted_proxy(&self, peer: IpAddr, port: u16) -> bool {
        let peer = canonical(peer);
        !self.deny.matches(peer, port) && self.proxies.matches(peer, port)
    }

    /// The accept-time decision for the TCP peer: deny lists first; then a
    /// trusted proxy is admitted to speak for its clients (each of whom is
    /// judged by the groups once named); anyone else by the security groups.
    pub fn check_accept(&self, peer: IpAddr, port: u16) -> Result<(), DenyReason> {
        if self.is_trusted_proxy(peer, port) {
            return Ok(());
        }
        self.check_connect(peer, port)
    }

    /// Counts and summarises a denial decided outside this module (the
    /// PROXY header checks in `gateway::listener`).
    pub fn count_denial(&self, peer: IpAddr, reason: DenyReason) {
        self.denied(peer, reason);
    }

    /// The connection decision, with no side effect: deny lists first (a
    /// deny beats any allow), then the union of the security groups.
    /// `port` is the listener's bound port (port-range rules).
    pub fn decide_connect(&self, peer: IpAddr, port: u16) -> Result<(), DenyReason> {
        let peer = canonical(peer);
        if self.deny.matches(peer, port) {
            Err(DenyReason::DenyList)
        } else if self.connect.matches(peer, port) {
            Ok(())
        } else {
            Err(DenyReason::NotInGroups)
        }
    }

    /// [`decide_connect`](Self::decide_connect), counting and logging a
    /// denial. Checked at accept, before any byte is read, and again per
    /// request.
    pub fn check_connect(&self, peer: IpAddr, port: u16) -> Result<(), DenyReason> {
        self.decide_connect(peer, port)
            .inspect_err(|reason| self.denied(peer, *reason))
    }

    /// Whether `peer` may open a connection at all (no counting).
    pub fn may_connect(&self, peer: IpAddr, port: u16) -> bool {
        self.decide_connect(peer, port).is_ok()
    }

    /// Whether `peer` may use admin routes and log in as crypto officer.
    /// Also requires [`may_connect`](Self::may_connect): admin networks narrow
    /// the listener's networks, they never widen them, so this holds even for
    /// a caller that forgot the accept-time check.
    pub fn is_admin(&self, peer: IpAddr, port: u16) -> bool {
        self.may_connect(peer, port) && self.admin.matches(canonical(peer), port)
    }

    /// The per-request decision for a route class, counted and logged when
    /// it denies: the connection check again (a reload may have revoked the
    /// peer), then the class's groups. The caller passes the TCP peer: admin
    /// and login decisions never trust a forwarded address.
    pub fn check_class(&self, class: NetClass, peer: IpAddr, port: u16) -> Result<(), DenyReason> {
        self.check_connect(peer, port)?;
        let ip = canonical(peer);
        let (narrowing, reason) = match class {
            NetClass::Admin => (Some(&self.admin), DenyReason::NotInAdminGroups),
            NetClass::Transit => (self.transit.as_ref(), DenyReason::NotInTransitGroups),
            NetClass::Login => (self.login.as_ref(), DenyReason::NotInLoginGroups),
            NetClass::Health => (self.health.as_ref(), DenyReason::NotInHealthGroups),
        };
        match narrowing {
            Some(m) if !m.matches(ip, port) => {
                self.denied(peer, reason);
                Err(reason)
            }
            _ => Ok(()),
        }
    }

    fn denied(&self, peer: IpAddr, reason: DenyReason) {
        self.counters.by_reason[reason.index()].fetch_add(1, Ordering::Relaxed);
        DENY_LOG.record(&self.name, canonical(peer), reason);
    }

    /// Networks compiled for this listener (allow, admin, deny), for `check`.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.connect.len(), self.admin.len(), self.deny.len())
    }
}

/// The compiled filters of one config snapshot, one per listener.
#[derive(Debug, Clone)]
pub struct Netfilter {
    /// Same order as `config.listeners`.
    listeners: Vec<ListenerFilter>,
}

impl Netfilter {
    /// Compiles every listener's groups and deny lists. A name the config
    /// does not define (possible only for a hand-built, unvalidated `Config`)
    /// contributes nothing.
    pub fn build(config: &Config) -> Netfilter {
        let mut compiler = Compiler {
            config,
            lists: HashMap::new(),
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerFilter {
                name: l.name.clone(),
                deny: compiler.deny_lists(config.global_deny_lists.iter().chain(&l.deny_lists)),
                connect: compiler.groups(&l.security_groups),
                admin: compiler.groups(&l.admin_groups),
                transit: l.transit_groups.as_deref().map(|g| compiler.groups(g)),
                login: l.login_groups.as_deref().map(|g| compiler.groups(g)),
                health: l.health_groups.as_deref().map(|g| compiler.groups(g)),
                proxies: compiler.groups(&l.trusted_proxy_groups),
                counters: counters_for(&l.name),
            })
            .collect();
        Netfilter { listeners }
    }

    /// The filter of `config.listeners[index]`.
    ///
    /// # Panics
    /// If `index` is out of range: indices come from the same snapshot's
    /// `config.listeners`, so that is a bug in the caller.
    pub fn listener(&self, index: usize) -> &ListenerFilter {
        &self.listeners[index]
    }

    /// All filters, in `config.listeners` order.
    pub fn listeners(&self) -> &[ListenerFilter] {
        &self.listeners
    }
}

// ---------------------------------------------------------------------------
// Deny counters and summaries.

/// Denials of one listener, by reason. Lives for the process, keyed by
/// listener name, so counts survive reloads (snapshots come and go).
#[derive(Debug, Default)]
struct ListenerCounters {
    by_reason: [AtomicU64; DenyReason::ALL.len()],
}

/// Listener names come from config files, so this map stays small.
static COUNTERS: Mutex<BTreeMap<String, Arc<ListenerCounters>>> = Mutex::new(BTreeMap::new());

fn counters_for(listener: &str) -> Arc<ListenerCounters> {
    let mut map = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(listener.to_string()).or_default().clone()
}

/// One deny counter: how many peers `listener` refused for `reason` since
/// the process started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyCount {
    pub listener: String,
    pub reason: DenyReason,
    pub count: u64,
}

/// Every deny counter, by listener name then reason (zeros included, so a
/// metrics exporter shows every series from the start). For the metrics
/// module: monotonic per process, untouched by reloads.
pub fn deny_counts() -> Vec<DenyCount> {
    let map = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    map.iter()
        .flat_map(|(listener, c)| {
            DenyReason::ALL.iter().map(move |reason| DenyCount {
                listener: listener.clone(),
                reason: *reason,
                count: c.by_reason[reason.index()].load(Ordering::Relaxed),
            })
        })
        .collect()
}

/// How long denials are gathered before a summary is logged.
pub const DENY_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct sources tracked per interval; more are only counted in total, so
/// a flood from millions of addresses costs bounded memory and log lines.
pub const DENY_SUMMARY_MAX_SOURCES: usize = 1024;
/// Sources named in one summary (the busiest).
pub const DENY_SUMMARY_TOP: usize = 20;

/// Per-source denial summaries: one log line per busy source per interval
/// instead of one per connection.
pub struct DenySummary {
    inner: Mutex<SummaryState>,
}

struct SummaryState {
    started: Option<Instant>,
    sources: HashMap<(IpAddr, String, DenyReason), u64>,
    /// Denials whose source did not fit in `sources`.
    untracked: u64,
    total: u64,
    /// Intervals that ended at a denial, waiting for the server's timer to
    /// log and audit them ([`take_deny_summaries`]).
    pending: Vec<Summary>,
}

/// Ended intervals kept for the timer; more (a stalled timer) are logged
/// at once instead and do not reach the audit log.
const DENY_SUMMARY_PENDING: usize = 6;

/// One line of a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDenials {
    pub source: IpAddr,
    pub listener: String,
    pub reason: DenyReason,
    pub count: u64,
}

/// What one interval saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The busiest sources, most denials first, at most [`DENY_SUMMARY_TOP`].
    pub top: Vec<SourceDenials>,
    /// Distinct (source, listener, reason) entries tracked.
    pub tracked: usize,
    pub untracked: u64,
    pub total: u64,
}

static DENY_LOG: LazyLock<DenySummary> = LazyLock::new(DenySummary::new);

impl DenySummary {
    pub fn new() -> Self {
        DenySummary {
            inner: Mutex::new(SummaryState {
                started: None,
                sources: HashMap::new(),
                untracked: 0,
                total: 0,
                pending: Vec::new(),
            }),
        }
    }

    /// Counts a denial. An interval that ends here waits for
    /// [`DenySummary::take`] (the server's timer), which logs and audits it.
    pub fn record(&self, listener: &str, source: IpAddr, reason: DenyReason) {
        if let Some(summary) = self.record_at(Instant::now(), listener, source, reason) {
            let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if state.pending.len() < DENY_SUMMARY_PENDING {
                state.pending.push(summary);
            } else {
                drop(state);
                log_summary(&summary);
            }
        }
    }

    /// Every ended interval not yet taken, then the current one (ended now).
    pub fn take(&self) -> Vec<Summary> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::mem::take(&mut state.pending);
        state.started = None;
        let current = state.take();
        if current.total > 0 {
            out.push(current);
        }
        out
    }

    /// [`record`](Self::record) with an injected clock; returns the summary
    /// to log, if an interval just ended.
    pub fn record_at(
        &self,
        now: Instant,
        listener: &str,
        source: IpAddr,
        reason: DenyReason,
    ) -> Option<Summary> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let started = *state.started.get_or_insert(now);
        let finished = if now.duration_since(started) >= DENY_SUMMARY_INTERVAL {
            let summary = state.take();
            state.started = Some(now);
            Some(summary)
        } else {
            None
        };
        state.total += 1;
        let key = (source, listener.to_string(), reason);
        if let Some(n) = state.sources.get_mut(&key) {
            *n += 1;
        } else if state.sources.len() < DENY_SUMMARY_MAX_SOURCES {
            state.sources.insert(key, 1);
        } else {
            state.untracked += 1;
        }
        finished
    }

    /// Ends the current interval now and returns what it saw (for a timer or
    /// shutdown; also what `record` logs).
    pub fn flush(&self) -> Summary {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        state.started = None;
        state.take()
    }
}

impl Default for DenySummary {
    fn default() -> Self {
        Self::new()
    }
}

impl SummaryState {
    fn take(&mut self) -> Summary {
        let tracked = self.sources.len();
        let mut all: Vec<SourceDenials> = self
            .sources
            .drain()
            .map(|((source, listener, reason), count)| SourceDenials {
                source,
                listener,
                reason,
                count,
            })
            .collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then(a.source.cmp(&b.source)));
        all.truncate(DENY_SUMMARY_TOP);
        // Give back what a flood made the map grow to.
        self.sources.shrink_to(DENY_SUMMARY_MAX_SOURCES / 8);
        let summary = Summary {
            top: all,
            tracked,
            untracked: self.untracked,
            total: self.total,
        };
        self.untracked = 0;
        self.total = 0;
        summary
    }
}

pub fn log_summary(summary: &Summary) {
    for s in &summary.top {
        tracing::warn!(
            target: "hsmgate::netfilter",
            source = %s.source,
            listener = %s.listener,
            reason = %s.reason,
            denials = s.count,
            "connections or requests denied by the security groups"
        );
    }
    tracing::warn!(
        target: "hsmgate::netfilter",
        total = summary.total,
        sources = summary.tracked,
        untracked = summary.untracked,
        interval_secs = DENY_SUMMARY_INTERVAL.as_secs(),
        "denial summary"
    );
}

/// The process-wide denial summaries that ended, and the current one: the
/// server's timer (every [`DENY_SUMMARY_INTERVAL`], and at shutdown) logs
/// them and writes their `connection.denied.summary` audit records.
pub fn take_deny_summaries() -> Vec<Summary> {
    DENY_LOG.take()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{EngineConfig, Limits, ListenerConfig, SecurityGroup, TlsConfig};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn set(nets: &[&str]) -> CidrSet {
        nets.iter().map(|n| net(n)).collect()
    }

    /// A config with the given groups and one listener per `(name, connect, admin)`.
    fn config(groups: &[(&str, &[&str])], listeners: &[(&str, &[&str], &[&str])]) -> Config {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Config {
            source_path: "test.toml".into(),
            data_dir: "./data".into(),
            engine: EngineConfig::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            audit: Default::default(),
            metrics: Default::default(),
            acl: Default::default(),
            dangerous_unfenced_listener: None,
            cluster: None,
            upstream: None,
            listeners: listeners
                .iter()
                .enumerate()
                .map(|(i, (name, connect, admin))| ListenerConfig {
                    name: name.to_string(),
                    address: format!("127.0.0.1:{}", 8200 + i).parse().unwrap(),
                    security_groups: names(connect),
                    admin_groups: names(admin),
                    channel: crate::engine::Channel::FrontDoor,
                    transit_groups: None,
                    login_groups: None,
                    health_groups: None,
                    deny_lists: vec![],
                    trusted_proxy_groups: vec![],
                    forwarded: Default::default(),
                    client_auth: None,
                })
                .collect(),
            groups: groups
                .iter()
                .map(|(name, sources)| {
                    let group = SecurityGroup {
                        name: name.to_string(),
                        description: String::new(),
                        rules: sources
                            .iter()
                            .map(|s| Rule {
                                source: RuleSource::Net(net(s)),
                                ports: None,
                                description: String::new(),
                            })
                            .collect(),
                    };
                    (name.to_string(), group)
                })
                .collect::<BTreeMap<_, _>>(),
            prefix_lists: BTreeMap::new(),
            deny_lists: BTreeMap::new(),
            global_deny_lists: vec![],
            jwt: Default::default(),
            cert_principals: Default::default(),
        }
    }

    #[test]
    fn v4_member_allowed_non_member_denied() {
        let s = set(&["10.0.0.0/8", "192.168.1.0/24"]);
        assert!(s.contains(ip("10.200.3.4")));
        assert!(s.contains(ip("192.168.1.255")));
        assert!(!s.contains(ip("11.0.0.1")));
        assert!(!s.contains(ip("192.168.2.1")));
    }

    #[test]
    fn v6_member_allowed_non_member_denied() {
        let s = set(&["2001:db8:1::/48", "::1/128"]);
        assert!(s.contains(ip("2001:db8:1:ffff::7")));
        assert!(s.contains(ip("::1")));
        assert!(!s.contains(ip("2001:db8:2::1")));
        assert!(!s.contains(ip("::2")));
    }

    #[test]
    fn families_do_not_cross() {
        // ::/0 is "every IPv6 client": it does not admit IPv4 clients, not
        // even when they arrive on a dual-stack socket as ::ffff:a.b.c.d.
        let v6_all = set(&["::/0"]);
        assert!(v6_all.contains(ip("2001:db8::1")));
        assert!(!v6_all.contains(ip("10.0.0.1")));
        assert!(!v6_all.contains(ip("::ffff:10.0.0.1")));
        let v4_all = set(&["0.0.0.0/0"]);
        assert!(v4_all.contains(ip("10.0.0.1")));
        assert!(!v4_all.contains(ip("2001:db8::1")));
        // ::1 is not 0.0.0.1 (the deprecated IPv4-compatible form is not mapped).
        assert!(!set(&["0.0.0.0/8"]).contains(ip("::1")));
        assert!(set(&["::1/128"]).contains(ip("::1")));
    }

    #[test]
    fn ipv4_mapped_peer_matches_ipv4_rules() {
        let s = set(&["10.0.0.0/8"]);
        assert!(s.contains(ip("::ffff:10.1.2.3")));
        assert!(!s.contains(ip("::ffff:11.1.2.3")));
        assert_eq!(
            s.longest_match(ip("::ffff:10.1.2.3")),
            Some(net("10.0.0.0/8"))
        );
    }

    #[test]
    fn ipv4_mapped_network_means_the_ipv4_network() {
        // Config refuses this spelling; a set built directly gets the same meaning.
        let s = set(&["::ffff:10.0.0.0/104"]);
        assert!(s.contains(ip("10.1.2.3")));
        assert!(s.contains(ip("::ffff:10.1.2.3")));
        assert!(!s.contains(ip("11.1.2.3")));
        assert_eq!(s.longest_match(ip("10.1.2.3")), Some(net("10.0.0.0/8")));
    }

    #[test]
    fn canonical_maps_only_ipv4_mapped() {
        assert_eq!(canonical(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
        assert_eq!(canonical(ip("::192.0.2.1")), ip("::192.0.2.1"));
        assert_eq!(
            canonical(ip("64:ff9b::192.0.2.1")),
            ip("64:ff9b::192.0.2.1")
        );
        assert_eq!(canonical(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn longest_prefix_wins_and_either_admits() {
        let s = set(&["10.0.0.0/8", "10.1.2.3/32"]);
        assert_eq!(s.longest_match(ip("10.1.2.3")), Some(net("10.1.2.3/32")));
        assert_eq!(s.longest_match(ip("10.1.2.4")), Some(net("10.0.0.0/8")));
        assert_eq!(s.longest_match(ip("11.1.2.3")), None);
        assert!(s.contains(ip("10.1.2.3")));
        assert!(s.contains(ip("10.1.2.4")));
        assert!(!s.contains(ip("11.1.2.3")));
        let v6 = set(&["2001:db8::/32", "2001:db8::1/128"]);
        assert_eq!(
            v6.longest_match(ip("2001:db8::1")),
            Some(net("2001:db8::1/128"))
        );
        assert_eq!(
            v6.longest_match(ip("2001:db8::2")),
            Some(net("2001:db8::/32"))
        );
    }

    #[test]
    fn empty_set_denies_all() {
        let s = CidrSet::new();
        assert!(s.is_empty());
        for peer in ["127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"] {
            assert!(!s.contains(ip(peer)), "{peer}");
        }
        let f = ListenerFilter::new("x", CidrSet::new(), CidrSet::new());
        assert!(!f.may_connect(ip("127.0.0.1"), 8200));
        assert!(!f.is_admin(ip("127.0.0.1"), 8200));
    }

    #[test]
    fn len_counts_distinct_networks() {
        let s = set(&["10.0.0.0/8", "10.0.0.0/8", "::1/128", "10.0.0.0/16"]);
        assert_eq!(s.len(), 3);
        assert_eq!(format!("{s:?}"), "CidrSet { v4: 2, v6: 1 }");
    }

    #[test]
    fn many_disjoint_networks_stay_exact() {
        // 65 536 /24s that a trie cannot merge: every edge still decides right.
        let nets = (0..=255u8).flat_map(|a| {
            (0..=255u8).map(move |b| IpNet::V4(Ipv4Net::new([10, a, b, 0].into(), 24).unwrap()))
        });
        let s = CidrSet::from_nets(nets);
        assert_eq!(s.len(), 65_536);
        assert!(s.contains(ip("10.0.0.0")));
        assert!(s.contains(ip("10.255.255.255")));
        assert!(!s.contains(ip("9.255.255.255")));
        assert!(!s.contains(ip("11.0.0.0")));
    }

    #[test]
    fn sorted_build_answers_like_one_insert_at_a_time() {
        // Overlapping, nested, duplicate and adjacent networks in random order.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let nets: Vec<IpNet> = (0..5_000)
            .map(|_| {
                let r = next();
                let len = [8, 16, 20, 24, 24, 28, 31, 32][(r >> 40) as usize % 8];
                // A small address space, so networks collide and nest.
                let addr = std::net::Ipv4Addr::from(((r as u32) & 0x00ff_ffff) | 0x0a00_0000);
                IpNet::V4(Ipv4Net::new(addr, len).unwrap())
            })
            .chain(["::ffff:10.200.0.0/112", "2001:db8::/48", "2001:db8::/48"].map(net))
            .collect();
        let sorted = CidrSet::from_nets(nets.iter().copied());
        let unsorted = CidrSet::from_nets_unsorted(nets.iter().copied());
        assert_eq!(sorted.len(), unsorted.len());
        for _ in 0..50_000 {
            let r = next();
            let probe = IpAddr::V4(std::net::Ipv4Addr::from((r as u32) & 0x0fff_ffff));
            assert_eq!(sorted.contains(probe), unsorted.contains(probe), "{probe}");
            assert_eq!(sorted.longest_match(probe), unsorted.longest_match(probe));
        }
        assert!(sorted.contains(ip("2001:db8::1")));
        assert!(sorted.contains(ip("10.200.3.4")));
    }

    #[test]
    fn listener_admits_the_union_of_its_groups() {
        let c = config(
            &[
                ("a", &["10.1.0.0/16"]),
                ("b", &["10.2.0.0/16", "2001:db8::/32"]),
                ("c", &["10.3.0.0/16"]),
            ],
            &[("api", &["a", "b"], &[])],
        );
        let nf = Netfilter::build(&c);
        let api = nf.listener(0);
        assert_eq!(api.name, "api");
        assert!(api.may_connect(ip("10.1.0.1"), 8200));
        assert!(api.may_connect(ip("10.2.0.1"), 8200));
        assert!(api.may_connect(ip("2001:db8::9"), 8200));
        assert!(
            !api.may_connect(ip("10.3.0.1"), 8200),
            "group c is not attached"
        );
        assert!(!api.may_connect(ip("192.0.2.1"), 8200));
    }

    #[test]
    fn admin_needs_an_admin_group_and_connect() {
        let c = config(
            &[
                ("apps", &["10.0.0.0/8"]),
                ("admins", &["10.9.0.0/16"]),
                ("elsewhere", &["192.0.2.0/24"]),
            ],
            &[
                ("api", &["apps"], &["admins"]),
                ("odd", &["admins"], &["elsewhere", "admins"]),
            ],
        );
        let nf = Netfilter::build(&c);
        let api = nf.listener(0);
        // An admin network inside the app network: admitted and admin.
        assert!(api.may_connect(ip("10.9.1.1"), 8200));
        assert!(api.is_admin(ip("10.9.1.1"), 8200));
        // An app: admitted, not admin.
        assert!(api.may_connect(ip("10.1.1.1"), 8200));
        assert!(!api.is_admin(ip("10.1.1.1"), 8200));
        // Admin groups never widen who may connect.
        let odd = nf.listener(1);
        assert!(!odd.may_connect(ip("192.0.2.1"), 8200));
        assert!(!odd.is_admin(ip("192.0.2.1"), 8200));
        assert!(odd.is_admin(ip("10.9.0.1"), 8200));
    }

    #[test]
    fn listeners_keep_config_order_and_have_their_own_sets() {
        let c = config(
            &[("apps", &["10.0.0.0/8"]), ("admins", &["127.0.0.1/32"])],
            &[
                ("api", &["apps"], &[]),
                ("rescue", &["admins"], &["admins"]),
            ],
        );
        let nf = Netfilter::build(&c);
        assert_eq!(nf.listeners().len(), 2);
        assert_eq!(nf.listener(1).name, "rescue");
        assert!(nf.listener(0).may_connect(ip("10.0.0.1"), 8200));
        assert!(!nf.listener(0).may_connect(ip("127.0.0.1"), 8200));
        assert!(nf.listener(1).is_admin(ip("127.0.0.1"), 8200));
        assert!(!nf.listener(1).may_connect(ip("10.0.0.1"), 8200));
    }

    #[test]
    fn undefined_group_admits_nobody() {
        let c = config(
            &[("apps", &["10.0.0.0/8"])],
            &[("api", &["ghost"], &["ghost"])],
        );
        let nf = Netfilter::build(&c);
        assert!(!nf.listener(0).may_connect(ip("10.0.0.1"), 8200));
        assert!(!nf.listener(0).is_admin(ip("10.0.0.1"), 8200));
    }

    #[test]
    fn empty_group_admits_nobody() {
        let c = config(&[("none", &[])], &[("api", &["none"], &["none"])]);
        let nf = Netfilter::build(&c);
        assert!(!nf.listener(0).may_connect(ip("127.0.0.1"), 8200));
        assert!(!nf.listener(0).may_connect(ip("::1"), 8200));
    }

    #[test]
    fn shipped_default_admits_loopback_only() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hsmgate.toml");
        let c = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let nf = Netfilter::build(&c);
        let api = nf.listener(0);
        for peer in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(api.may_connect(ip(peer), 8200), "{peer}");
            assert!(api.is_admin(ip(peer), 8200), "{peer}");
        }
        for peer in ["127.0.0.2", "10.0.0.1", "::2", "2001:db8::1"] {
            assert!(!api.may_connect(ip(peer), 8200), "{peer}");
            assert!(!api.is_admin(ip(peer), 8200), "{peer}");
        }
    }

    /// A validated config from text: main file plus one policy file.
    fn loaded(main: &str, policy: &str) -> Config {
        crate::config::load_from_str(
            std::path::Path::new("hsmgate.toml"),
            main,
            &[(std::path::PathBuf::from("sg.toml"), policy.to_string())],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const FENCE: &str = r#"
[prefix_list.partners]
cidrs = ["192.0.2.0/24", "2001:db8:77::/48"]

[prefix_list.threats]
cidrs = ["10.1.2.3", "10.66.0.0/16"]

[deny_list.threats]
rules = [{ prefix_list = "threats", description = "imported" }]

[deny_list.local]
rules = [{ source = "10.9.9.0/24" }]

[group.apps]
rules = [
  { source = "10.0.0.0/8", ports = "8200-8209" },
  { prefix_list = "partners", ports = 8200 },
]

[group.admins]
rules = [{ source = "172.16.0.0/16" }]

[group.monitoring]
rules = [{ source = "198.51.100.0/24" }]
"#;

    const LISTENERS: &str = r#"
deny_lists = ["threats"]
[[listener]]
name = "api"
address = "127.0.0.1:8200"
security_groups = ["apps", "admins", "monitoring"]
admin_groups = ["admins"]
transit_groups = ["apps"]
login_groups = ["apps", "admins"]
health_groups = ["monitoring", "admins"]
deny_lists = ["local"]
[[listener]]
name = "other"
address = "127.0.0.1:8300"
security_groups = ["apps"]
"#;

    #[test]
    fn deny_lists_beat_allow_rules() {
        let nf = Netfilter::build(&loaded(LISTENERS, FENCE));
        let api = nf.listener(0);
        assert_eq!(api.decide_connect(ip("10.1.2.4"), 8200), Ok(()));
        assert_eq!(
            api.decide_connect(ip("10.1.2.3"), 8200),
            Err(DenyReason::DenyList)
        );
        assert_eq!(
            api.decide_connect(ip("::ffff:10.66.1.1"), 8200),
            Err(DenyReason::DenyList)
        );
        // The listener's own list, on this listener only.
        assert_eq!(
            api.decide_connect(ip("10.9.9.9"), 8200),
            Err(DenyReason::DenyList)
        );
        let other = nf.listener(1);
        assert_eq!(
            other.decide_connect(ip("10.1.2.3"), 8201),
            Err(DenyReason::DenyList),
            "global deny lists apply to every listener"
        );
        assert_eq!(other.decide_connect(ip("10.9.9.9"), 8201), Ok(()));
        assert_eq!(
            api.decide_connect(ip("11.0.0.1"), 8200),
            Err(DenyReason::NotInGroups)
        );
    }

    #[test]
    fn port_ranges_select_listeners() {
        let nf = Netfilter::build(&loaded(LISTENERS, FENCE));
        let api = nf.listener(0);
        assert!(api.may_connect(ip("10.0.0.1"), 8200));
        assert!(api.may_connect(ip("10.0.0.1"), 8209));
        assert!(!api.may_connect(ip("10.0.0.1"), 8210));
        assert!(api.may_connect(ip("192.0.2.7"), 8200));
        assert!(!api.may_connect(ip("192.0.2.7"), 8201));
        assert!(api.may_connect(ip("2001:db8:77::1"), 8200));
        assert!(!api.may_connect(ip("2001:db8:78::1"), 8200));
        // Unranged rules apply on every port.
        assert!(api.may_connect(ip("172.16.0.1"), 1));
    }

    #[test]
    fn route_classes_narrow_per_listener() {
        let nf = Netfilter::build(&loaded(LISTENERS, FENCE));
        let api = nf.listener(0);
        let app = ip("10.0.0.1");
        let admin = ip("172.16.0.1");
        let monitor = ip("198.51.100.1");
        assert_eq!(api.check_class(NetClass::Transit, app, 8200), Ok(()));
        assert_eq!(
            api.check_class(NetClass::Admin, app, 8200),
            Err(DenyReason::NotInAdminGroups)
        );
        assert_eq!(api.check_class(NetClass::Admin, admin, 8200), Ok(()));
        assert_eq!(
            api.check_class(NetClass::Transit, admin, 8200),
            Err(DenyReason::NotInTransitGroups)
        );
        assert_eq!(api.check_class(NetClass::Login, app, 8200), Ok(()));
        assert_eq!(
            api.check_class(NetClass::Login, monitor, 8200),
            Err(DenyReason::NotInLoginGroups)
        );
        assert_eq!(api.check_class(NetClass::Health, monitor, 8200), Ok(()));
        assert_eq!(
            api.check_class(NetClass::Health, app, 8200),
            Err(DenyReason::NotInHealthGroups)
        );
        // No class groups on `other`: whoever may connect.
        let other = nf.listener(1);
        assert_eq!(
            other.check_class(NetClass::Health, app, 8300),
            Err(DenyReason::NotInGroups)
        );
        assert_eq!(other.check_class(NetClass::Health, app, 8201), Ok(()));
        assert_eq!(
            other.check_class(NetClass::Admin, app, 8201),
            Err(DenyReason::NotInAdminGroups)
        );
    }

    #[test]
    fn prefix_lists_are_compiled_once_and_shared() {
        let nf = Netfilter::build(&loaded(LISTENERS, FENCE));
        let api = &nf.listener(0).connect;
        let other = &nf.listener(1).connect;
        let shared = |m: &Matcher| {
            m.parts
                .iter()
                .find(|(p, _)| p.is_some_and(|p| p.first == 8200 && p.last == 8200))
                .unwrap()
                .1
                .clone()
        };
        assert!(Arc::ptr_eq(&shared(api), &shared(other)));
    }

    #[test]
    fn denials_are_counted_per_listener_and_reason() {
        let name = "count-test-listener";
        let f = ListenerFilter::new(name, set(&["10.0.0.0/8"]), CidrSet::new());
        let count = |reason| {
            deny_counts()
                .into_iter()
                .find(|c| c.listener == name && c.reason == reason)
                .map(|c| c.count)
        };
        assert_eq!(count(DenyReason::NotInGroups), Some(0));
        assert!(f.check_connect(ip("10.0.0.1"), 1).is_ok());
        assert!(f.check_connect(ip("11.0.0.1"), 1).is_err());
        assert!(f.check_connect(ip("11.0.0.2"), 1).is_err());
        assert!(f.check_class(NetClass::Admin, ip("10.0.0.1"), 1).is_err());
        assert_eq!(count(DenyReason::NotInGroups), Some(2));
        assert_eq!(count(DenyReason::NotInAdminGroups), Some(1));
        assert_eq!(count(DenyReason::DenyList), Some(0));
        // A rebuilt filter (a reload) keeps counting on the same counters.
        let again = ListenerFilter::new(name, CidrSet::new(), CidrSet::new());
        assert!(again.check_connect(ip("10.0.0.1"), 1).is_err());
        assert_eq!(count(DenyReason::NotInGroups), Some(3));
    }

    #[test]
    fn deny_summaries_are_bounded_and_periodic() {
        let log = DenySummary::new();
        let t0 = Instant::now();
        // A flood from 200k distinct sources inside one interval.
        for i in 0..200_000u32 {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            assert!(log
                .record_at(t0, "api", source, DenyReason::NotInGroups)
                .is_none());
        }
        for _ in 0..5 {
            log.record_at(t0, "api", ip("11.0.0.0"), DenyReason::NotInGroups);
        }
        // The first denial after the interval returns the summary.
        let later = t0 + DENY_SUMMARY_INTERVAL;
        let summary = log
            .record_at(later, "api", ip("12.0.0.1"), DenyReason::DenyList)
            .expect("interval over");
        assert_eq!(summary.total, 200_005);
        assert_eq!(summary.tracked, DENY_SUMMARY_MAX_SOURCES);
        assert_eq!(summary.untracked, 200_000 - DENY_SUMMARY_MAX_SOURCES as u64);
        assert_eq!(summary.top.len(), DENY_SUMMARY_TOP);
        assert_eq!(summary.top[0].source, ip("11.0.0.0"));
        assert_eq!(summary.top[0].count, 6);
        // The new interval holds only the denial that ended the old one.
        let next = log.flush();
        assert_eq!(next.total, 1);
        assert_eq!(next.top[0].reason, DenyReason::DenyList);
    }

    #[test]
    fn ended_intervals_wait_for_the_timer() {
        let log = DenySummary::new();
        log.record("api", ip("11.0.0.1"), DenyReason::NotInGroups);
        log.record("api", ip("11.0.0.1"), DenyReason::NotInGroups);
        let taken = log.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].total, 2);
        assert_eq!(taken[0].top[0].count, 2);
        // Nothing denied since: nothing to write.
        assert!(log.take().is_empty());
    }

    #[test]
    fn flat_index_agrees_with_the_trie() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let nets: Vec<IpNet> = (0..20_000)
            .map(|_| {
                let r = next();
                let len = [0, 8, 15, 16, 17, 24, 31, 32][(r >> 50) as usize % 8];
                let len = if (r >> 40) % 500 == 0 {
                    len
                } else {
                    len.max(20)
                };
                IpNet::V4(Ipv4Net::new((r as u32).into(), len).unwrap().trunc())
            })
            .filter(|n| n.prefix_len() > 0)
            .collect();
        let sealed = CidrSet::from_nets(nets.iter().copied());
        let mut unsealed = CidrSet::from_nets(nets.iter().copied());
        unsealed.insert(net("255.255.255.255/32"));
        let trie_only = |ip: IpAddr| {
            // The reference: the trie itself (the extra entry invalidated the index).
            unsealed.contains(ip) && ip != IpAddr::from([255, 255, 255, 255])
        };
        for _ in 0..50_000 {
            let ip = IpAddr::V4((next() as u32).into());
            assert_eq!(sealed.contains(ip), trie_only(ip), "{ip}");
        }
        for n in &nets {
            for ip in [n.network(), n.broadcast()] {
                assert!(sealed.contains(ip), "{ip}");
            }
        }
        for edge in ["0.0.0.0", "255.255.255.255"] {
            assert_eq!(sealed.contains(ip(edge)), trie_only(ip(edge)), "{edge}");
        }
    }
}
