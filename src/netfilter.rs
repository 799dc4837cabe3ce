//! Decides whether a peer address may connect to a listener, and whether it
//! may use admin routes (and log in as crypto officer) there.
//!
//! This is the first decision on every connection, taken before TLS or HTTP:
//! a peer it refuses never reaches code that could spend a login attempt.
//! It is allow-only and default deny (AWS security-group semantics): a
//! listener admits the union of the rules of the groups attached to it, and
//! nothing else.
//!
//! The rules of each listener are compiled once per config snapshot into
//! prefix tries (one for IPv4, one for IPv6), so a lookup walks at most 32 or
//! 128 levels however many rules there are: imported lists of a million
//! networks are a normal size.
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

use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixSet;

use crate::config::Config;

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
}

impl CidrSet {
    /// The empty set: admits nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compiles `nets`. Host bits are ignored (validated config has none);
    /// IPv4-mapped IPv6 networks become the IPv4 networks they denote.
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut set = Self::new();
        for net in nets {
            set.insert(net);
        }
        set
    }

    fn insert(&mut self, net: IpNet) {
        match canonical_net(net) {
            IpNet::V4(net) => self.v4.insert(net),
            IpNet::V6(net) => self.v6.insert(net),
        };
    }

    /// Whether some network in the set covers `ip` (after [`canonical`]).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(v4) => self.v4.is_covered(&Ipv4Net::from(v4)),
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

/// The decisions for one listener.
#[derive(Debug, Clone)]
pub struct ListenerFilter {
    pub name: String,
    /// Union of the listener's `security_groups`.
    connect: CidrSet,
    /// Union of the listener's `admin_groups`.
    admin: CidrSet,
}

impl ListenerFilter {
    /// For callers that compile their own sets (tests, benchmarks).
    pub fn new(name: impl Into<String>, connect: CidrSet, admin: CidrSet) -> Self {
        ListenerFilter {
            name: name.into(),
            connect,
            admin,
        }
    }

    /// Whether `peer` may open a connection at all. Checked at accept, before
    /// any byte is read.
    pub fn may_connect(&self, peer: IpAddr) -> bool {
        self.connect.contains(peer)
    }

    /// Whether `peer` may use admin routes and log in as crypto officer.
    /// Also requires [`may_connect`](Self::may_connect): admin networks narrow
    /// the listener's networks, they never widen them, so this holds even for
    /// a caller that forgot the accept-time check.
    pub fn is_admin(&self, peer: IpAddr) -> bool {
        self.connect.contains(peer) && self.admin.contains(peer)
    }
}

/// The compiled filters of one config snapshot, one per listener.
#[derive(Debug, Clone)]
pub struct Netfilter {
    /// Same order as `config.listeners`.
    listeners: Vec<ListenerFilter>,
}

impl Netfilter {
    /// Compiles every listener's groups. A group name the config does not
    /// define (possible only for a hand-built, unvalidated `Config`)
    /// contributes nothing: the failure mode is to admit fewer peers.
    pub fn build(config: &Config) -> Netfilter {
        let union = |names: &[String]| {
            CidrSet::from_nets(
                names
                    .iter()
                    .filter_map(|name| config.groups.get(name))
                    .flat_map(|group| group.rules.iter().map(|rule| rule.source)),
            )
        };
        Netfilter {
            listeners: config
                .listeners
                .iter()
                .map(|l| ListenerFilter {
                    name: l.name.clone(),
                    connect: union(&l.security_groups),
                    admin: union(&l.admin_groups),
                })
                .collect(),
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{EngineConfig, Limits, ListenerConfig, Rule, SecurityGroup, TlsConfig};

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
            listeners: listeners
                .iter()
                .enumerate()
                .map(|(i, (name, connect, admin))| ListenerConfig {
                    name: name.to_string(),
                    address: format!("127.0.0.1:{}", 8200 + i).parse().unwrap(),
                    security_groups: names(connect),
                    admin_groups: names(admin),
                    channel: crate::engine::Channel::FrontDoor,
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
                                source: net(s),
                                description: String::new(),
                            })
                            .collect(),
                    };
                    (name.to_string(), group)
                })
                .collect::<BTreeMap<_, _>>(),
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
        assert!(!f.may_connect(ip("127.0.0.1")));
        assert!(!f.is_admin(ip("127.0.0.1")));
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
        assert!(api.may_connect(ip("10.1.0.1")));
        assert!(api.may_connect(ip("10.2.0.1")));
        assert!(api.may_connect(ip("2001:db8::9")));
        assert!(!api.may_connect(ip("10.3.0.1")), "group c is not attached");
        assert!(!api.may_connect(ip("192.0.2.1")));
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
        assert!(api.may_connect(ip("10.9.1.1")));
        assert!(api.is_admin(ip("10.9.1.1")));
        // An app: admitted, not admin.
        assert!(api.may_connect(ip("10.1.1.1")));
        assert!(!api.is_admin(ip("10.1.1.1")));
        // Admin groups never widen who may connect.
        let odd = nf.listener(1);
        assert!(!odd.may_connect(ip("192.0.2.1")));
        assert!(!odd.is_admin(ip("192.0.2.1")));
        assert!(odd.is_admin(ip("10.9.0.1")));
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
        assert!(nf.listener(0).may_connect(ip("10.0.0.1")));
        assert!(!nf.listener(0).may_connect(ip("127.0.0.1")));
        assert!(nf.listener(1).is_admin(ip("127.0.0.1")));
        assert!(!nf.listener(1).may_connect(ip("10.0.0.1")));
    }

    #[test]
    fn undefined_group_admits_nobody() {
        let c = config(
            &[("apps", &["10.0.0.0/8"])],
            &[("api", &["ghost"], &["ghost"])],
        );
        let nf = Netfilter::build(&c);
        assert!(!nf.listener(0).may_connect(ip("10.0.0.1")));
        assert!(!nf.listener(0).is_admin(ip("10.0.0.1")));
    }

    #[test]
    fn empty_group_admits_nobody() {
        let c = config(&[("none", &[])], &[("api", &["none"], &["none"])]);
        let nf = Netfilter::build(&c);
        assert!(!nf.listener(0).may_connect(ip("127.0.0.1")));
        assert!(!nf.listener(0).may_connect(ip("::1")));
    }

    #[test]
    fn shipped_default_admits_loopback_only() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hsmgate.toml");
        let c = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let nf = Netfilter::build(&c);
        let api = nf.listener(0);
        for peer in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(api.may_connect(ip(peer)), "{peer}");
            assert!(api.is_admin(ip(peer)), "{peer}");
        }
        for peer in ["127.0.0.2", "10.0.0.1", "::2", "2001:db8::1"] {
            assert!(!api.may_connect(ip(peer)), "{peer}");
            assert!(!api.is_admin(ip(peer)), "{peer}");
        }
    }
}
