//! Whether a peer may go on now: GCRA rate limits (governor), the cap on
//! concurrent password hashing, and the connection caps.
//!
//! Declared in `policies/rate-limits.toml` (a file with a top-level
//! `[rate_limits]` table); without one, [`RateLimitPolicy::default`] applies.
//!
//! - Before identity (phase 5): per source network and route class. IPv6
//!   sources are folded to their /64 (configurable) so one host cannot pose as
//!   2^64 clients; logins are also limited per (source, username).
//! - After identity (phase 7): per principal and per key name.
//! - Password hashing (argon2, ~20 ms of CPU each) runs under a semaphore, so
//!   logins can never take every core.
//!
//! State is bounded: governor never forgets a key by itself, so a sweeper
//! ([`Fence::sweep`], on a timer) drops every key whose bucket is full again
//! (`retain_recent`) and gives the memory back (`shrink_to_fit`). A flood
//! from millions of addresses costs memory only for as long as their buckets
//! take to refill.
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use toml::Spanned;

use crate::config::{ConfigError, Source};

/// Longest username kept in a login key; longer names are cut (they are
/// invalid anyway) so a key's size is bounded.
const MAX_KEY_NAME: usize = 128;

/// One GCRA quota: `burst` requests at once, refilled at `rate` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    pub burst: NonZeroU32,
    /// Time to earn back one request.
    pub period: Duration,
}

impl QuotaSpec {
    const fn per_second(rate: u32, burst: u32) -> QuotaSpec {
        QuotaSpec::new(Duration::from_secs(1), rate, burst)
    }

    const fn per_minute(rate: u32, burst: u32) -> QuotaSpec {
        QuotaSpec::new(Duration::from_secs(60), rate, burst)
    }

    const fn new(per: Duration, rate: u32, burst: u32) -> QuotaSpec {
        let burst = match NonZeroU32::new(burst) {
            Some(b) => b,
            None => NonZeroU32::MIN,
        };
        let rate = if rate == 0 { 1 } else { rate };
        QuotaSpec {
            burst,
            period: Duration::from_nanos((per.as_nanos() / rate as u128) as u64),
        }
    }

    fn quota(&self) -> Quota {
        // `period` is validated non-zero; fall back to one per second if not.
        Quota::with_period(self.period)
            .unwrap_or(Quota::per_second(NonZeroU32::MIN))
            .allow_burst(self.burst)
    }
}

/// Per-source limits, one quota per route class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassQuotas {
    pub transit: QuotaSpec,
    pub login: QuotaSpec,
    pub admin: QuotaSpec,
    pub health: QuotaSpec,
}

/// Connection caps and the idle timeout, applied by the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections from one source network (after folding).
    pub per_source: u32,
    /// Open connections in all, across listeners.
    pub total: u32,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// The validated rate-limit policy: part of the config snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// IPv4 sources are limited per this prefix (32: per address).
    pub ipv4_prefix: u8,
    /// IPv6 sources are limited per this prefix (64: per subnet; a host
    /// usually owns a whole /64).
    pub ipv6_prefix: u8,
    pub source: ClassQuotas,
    /// Logins per (source network, username): guessing one user's password
    /// from one network is slow, other users are untouched.
    pub login_user: QuotaSpec,
    /// Requests per authenticated principal.
    pub principal: QuotaSpec,
    /// Requests per key name, whoever calls.
    pub key: QuotaSpec,
    /// Password hashes (argon2) computed at once.
    pub max_concurrent_hashing: u32,
    /// How long a login waits for a hashing slot before a 429.
    pub hashing_wait: Duration,
    /// How often idle limiter keys are swept.
    pub sweep_interval: Duration,
    pub connections: ConnectionLimits,
}

impl Default for RateLimitPolicy {
    fn default() -> Self {
        RateLimitPolicy {
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            source: ClassQuotas {
                transit: QuotaSpec::per_second(500, 1000),
                // The strictest class: a human and a setup script fit (a
                // burst of 10, then one a second); a guesser does not.
                login: QuotaSpec::per_minute(60, 10),
                admin: QuotaSpec::per_second(20, 40),
                health: QuotaSpec::per_second(20, 40),
            },
            login_user: QuotaSpec::per_minute(20, 5),
            principal: QuotaSpec::per_second(500, 1000),
            key: QuotaSpec::per_second(2000, 4000),
            max_concurrent_hashing: 2,
            hashing_wait: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(60),
            connections: ConnectionLimits {
                per_source: 256,
                total: 8192,
                idle_timeout: Duration::from_secs(60),
            },
        }
    }
}

/// What a route class is, for the limiter: mirrors `gateway::router::RouteClass`
/// without depending on the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Transit,
    Login,
    Admin,
    Health,
}

/// A refusal: which limit, its size, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `source`, `login-user`, `principal`, `key`, `password-hashing`.
    pub scope: &'static str,
    /// The burst size of the quota that refused (RateLimit-Limit).
    pub limit: u32,
    /// Rounded up to whole seconds, at least 1 (Retry-After).
    pub retry_after_secs: u64,
}

type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The limiters for one policy. Rebuilt only when the policy changes.
pub struct Limiters<C: Clock = DefaultClock> {
    policy: RateLimitPolicy,
    clock: C,
    transit: Keyed<IpAddr, C>,
    login: Keyed<IpAddr, C>,
    admin: Keyed<IpAddr, C>,
    health: Keyed<IpAddr, C>,
    login_user: Keyed<(IpAddr, Box<str>), C>,
    principal: Keyed<Box<str>, C>,
    key: Keyed<Box<str>, C>,
    hashing: Arc<Semaphore>,
}

impl<C: Clock + Clone> Limiters<C> {
    pub fn new(policy: RateLimitPolicy, clock: C) -> Self {
        let keyed = |q: &QuotaSpec| RateLimiter::dashmap_with_clock(q.quota(), clock.clone());
        Limiters {
            transit: keyed(&policy.source.transit),
            login: keyed(&policy.source.login),
            admin: keyed(&policy.source.admin),
            health: keyed(&policy.source.health),
            login_user: RateLimiter::dashmap_with_clock(policy.login_user.quota(), clock.clone()),
            principal: RateLimiter::dashmap_with_clock(policy.principal.quota(), clock.clone()),
            key: RateLimiter::dashmap_with_clock(policy.key.quota(), clock.clone()),
            hashing: Arc::new(Semaphore::new(policy.max_concurrent_hashing as usize)),
            clock,
            policy,
        }
    }

    pub fn policy(&self) -> &RateLimitPolicy {
        &self.policy
    }

    /// The network a source is limited as.
    pub fn fold(&self, peer: IpAddr) -> IpAddr {
        fold(peer, &self.policy)
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: &Keyed<K, C>,
        key: &K,
        spec: &QuotaSpec,
        scope: &'static str,
    ) -> Result<(), Limited> {
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Limited {
                scope,
                limit: spec.burst.get(),
                retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            }
        })
    }

    /// Phase 5: the source network's budget for this route class.
    pub fn check_source(&self, peer: IpAddr, class: Class) -> Result<(), Limited> {
        let net = self.fold(peer);
        let q = &self.policy.source;
        match class {
            Class::Transit => self.check(&self.transit, &net, &q.transit, "source"),
            Class::Login => self.check(&self.login, &net, &q.login, "source"),
            Class::Admin => self.check(&self.admin, &net, &q.admin, "source"),
            Class::Health => self.check(&self.health, &net, &q.health, "source"),
        }
    }

    /// A login's budget per (source network, username).
    pub fn check_login_user(&self, peer: IpAddr, username: &str) -> Result<(), Limited> {
        let key = (self.fold(peer), truncate(username));
        self.check(
            &self.login_user,
            &key,
            &self.policy.login_user,
            "login-user",
        )
    }

    /// Phase 7: the principal's budget.
    pub fn check_principal(&self, principal: &str) -> Result<(), Limited> {
        self.check(
            &self.principal,
            &truncate(principal),
            &self.policy.principal,
            "principal",
        )
    }

    /// Phase 7: the key's budget.
    pub fn check_key(&self, key: &str) -> Result<(), Limited> {
        self.check(&self.key, &truncate(key), &self.policy.key, "key")
    }

    /// A slot for one password hash, waiting at most `hashing_wait`.
    pub async fn hashing_permit(&self) -> Result<OwnedSemaphorePermit, Limited> {
        let refused = Limited {
            scope: "password-hashing",
            limit: self.policy.max_concurrent_hashing,
            retry_after_secs: 1,
        };
        let acquire = self.hashing.clone().acquire_owned();
        match tokio::time::timeout(self.policy.hashing_wait, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(refused),
        }
    }

    /// Forgets every key whose bucket has refilled, and frees the memory.
    pub fn sweep(&self) {
        fn one<K: Hash + Eq + Clone, C: Clock + Clone>(l: &Keyed<K, C>) {
            l.retain_recent();
            l.shrink_to_fit();
        }
        one(&self.transit);
        one(&self.login);
        one(&self.admin);
        one(&self.health);
        one(&self.login_user);
        one(&self.principal);
        one(&self.key);
    }

    /// Keys held across every limiter.
    pub fn key_count(&self) -> usize {
        self.transit.len()
            + self.login.len()
            + self.admin.len()
            + self.health.len()
            + self.login_user.len()
            + self.principal.len()
            + self.key.len()
    }
}

fn truncate(s: &str) -> Box<str> {
    let mut end = s.len().min(MAX_KEY_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].into()
}

/// The address with its host bits cleared to the policy's prefix.
pub fn fold(peer: IpAddr, policy: &RateLimitPolicy) -> IpAddr {
    match peer {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let p = u32::from(policy.ipv4_prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let p = u32::from(policy.ipv6_prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            IpAddr::V6((bits & mask).into())
        }
    }
}

/// Everything the gateway keeps across requests for this module: the
/// limiters (rebuilt when a reload changes the policy) and the open
/// connection counts (never rebuilt: connections outlive snapshots).
pub struct Fence {
    current: ArcSwap<Limiters>,
    connections: Arc<Connections>,
}

impl Fence {
    pub fn new(policy: &RateLimitPolicy) -> Fence {
        Fence {
            current: ArcSwap::from_pointee(Limiters::new(policy.clone(), DefaultClock::default())),
            connections: Arc::new(Connections::default()),
        }
    }

    /// The limiters for `policy`: the running ones, or fresh ones if a reload
    /// changed the policy (the counts start over then).
    pub fn limiters(&self, policy: &RateLimitPolicy) -> Arc<Limiters> {
        let current = self.current.load_full();
        if current.policy() == policy {
            return current;
        }
        let fresh = Arc::new(Limiters::new(policy.clone(), DefaultClock::default()));
        self.current.store(fresh.clone());
        fresh
    }

    pub fn sweep(&self) {
        self.current.load().sweep();
    }

    /// Admits one more connection from `peer`, or says which cap is full.
    pub fn open_connection(
        &self,
        peer: IpAddr,
        policy: &RateLimitPolicy,
    ) -> Result<ConnectionSlot, &'static str> {
        self.connections
            .open(fold(peer, policy), &policy.connections)
            .map(|()| ConnectionSlot {
                connections: self.connections.clone(),
                net: fold(peer, policy),
            })
    }

    pub fn open_connections(&self) -> usize {
        self.connections.total.load(Ordering::Relaxed)
    }
}

/// Runs [`Fence::sweep`] every `sweep_interval` of the current policy, until
/// the runtime ends.
pub async fn sweep_forever(fence: Arc<Fence>, interval: impl Fn() -> Duration) {
    loop {
        tokio::time::sleep(interval()).await;
        fence.sweep();
    }
}

#[derive(Default)]
struct Connections {
    /// Entries exist only while a connection is open, so the map is bounded
    /// by the total cap.
    per_source: Mutex<HashMap<IpAddr, u32>>,
    total: AtomicUsize,
}

impl Connections {
    fn open(&self, net: IpAddr, limits: &ConnectionLimits) -> Result<(), &'static str> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain counters; the counts are still usable.
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= limits.total as usize {
            return Err("total");
        }
        let n = map.entry(net).or_insert(0);
        if *n >= limits.per_source {
            if *n == 0 {
                map.remove(&net);
            }
            return Err("per-source");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn close(&self, net: IpAddr) {
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&net) {
            *n -= 1;
            if *n == 0 {
                map.remove(&net);
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open connection's place under the caps; released on drop.
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    net: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.close(self.net);
    }
}

// ---------------------------------------------------------------------------
// policies/rate-limits.toml

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    rate_limits: RawPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    ipv4_prefix: Option<Spanned<i64>>,
    ipv6_prefix: Option<Spanned<i64>>,
    sweep_interval_seconds: Option<Spanned<i64>>,
    #[serde(default)]
    source: RawClasses,
    login_user: Option<Spanned<RawQuota>>,
    principal: Option<Spanned<RawQuota>>,
    key: Option<Spanned<RawQuota>>,
    #[serde(default)]
    password_hashing: RawHashing,
    #[serde(default)]
    connections: RawConnections,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClasses {
    transit: Option<Spanned<RawQuota>>,
    login: Option<Spanned<RawQuota>>,
    admin: Option<Spanned<RawQuota>>,
    health: Option<Spanned<RawQuota>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    rate: Spanned<i64>,
    per: Spanned<String>,
    burst: Spanned<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHashing {
    max_concurrent: Option<Spanned<i64>>,
    max_wait_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    per_source: Option<Spanned<i64>>,
    total: Option<Spanned<i64>>,
    idle_timeout_seconds: Option<Spanned<i64>>,
}

/// Whether a policy file is the rate-limit file (a top-level `rate_limits`).
pub fn is_rate_limit_file(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("rate_limits"))
}

/// Parses and validates one rate-limit file; every problem goes to `errors`
/// with its line. `None` when there was any.
pub(crate) fn load_policy(
    source: &Source<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<RateLimitPolicy> {
    let raw: RawFile = match toml::from_str(source.text) {
        Ok(raw) => raw,
        Err(e) => {
            errors.push(source.toml_error(&e));
            return None;
        }
    };
    let before = errors.len();
    let r = raw.rate_limits;
    let d = RateLimitPolicy::default();
    let int = |errors: &mut Vec<ConfigError>,
               key: &str,
               v: &Option<Spanned<i64>>,
               range: std::ops::RangeInclusive<i64>,
               default: i64|
     -> i64 {
        match v {
            None => default,
            Some(v) if range.contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                errors.push(source.error_at(
                    v.span(),
                    format!(
                        "rate_limits.{key} must be between {} and {} (got {})",
                        range.start(),
                        range.end(),
                        v.get_ref()
                    ),
                ));
                default
            }
        }
    };
    let quota =
        |errors: &mut Vec<ConfigError>, key: &str, v: &Option<Spanned<RawQuota>>, default| {
            v.as_ref().map_or(default, |q| {
                parse_quota(source, errors, key, q.get_ref()).unwrap_or(default)
            })
        };
    let policy = RateLimitPolicy {
        ipv4_prefix: int(errors, "ipv4_prefix", &r.ipv4_prefix, 0..=32, 32) as u8,
        ipv6_prefix: int(errors, "ipv6_prefix", &r.ipv6_prefix, 0..=128, 64) as u8,
        sweep_interval: Duration::from_secs(int(
            errors,
            "sweep_interval_seconds",
            &r.sweep_interval_seconds,
            1..=3600,
            d.sweep_interval.as_secs() as i64,
        ) as u64),
        source: ClassQuotas {
            transit: quota(
                errors,
                "source.transit",
                &r.source.transit,
                d.source.transit,
            ),
            login: quota(errors, "source.login", &r.source.login, d.source.login),
            admin: quota(errors, "source.admin", &r.source.admin, d.source.admin),
            health: quota(errors, "source.health", &r.source.health, d.source.health),
        },
        login_user: quota(errors, "login_user", &r.login_user, d.login_user),
        principal: quota(errors, "principal", &r.principal, d.principal),
        key: quota(errors, "key", &r.key, d.key),
        max_concurrent_hashing: int(
            errors,
            "password_hashing.max_concurrent",
            &r.password_hashing.max_concurrent,
            1..=256,
            i64::from(d.max_concurrent_hashing),
        ) as u32,
        hashing_wait: Duration::from_millis(int(
            errors,
            "password_hashing.max_wait_ms",
            &r.password_hashing.max_wait_ms,
            0..=60_000,
            d.hashing_wait.as_millis() as i64,
        ) as u64),
        connections: ConnectionLimits {
            per_source: int(
                errors,
                "connections.per_source",
                &r.connections.per_source,
                1..=1_000_000,
                i64::from(d.connections.per_source),
            ) as u32,
            total: int(
                errors,
                "connections.total",
                &r.connections.total,
                1..=10_000_000,
                i64::from(d.connections.total),
            ) as u32,
            idle_timeout: Duration::from_secs(int(
                errors,
                "connections.idle_timeout_seconds",
                &r.connections.idle_timeout_seconds,
                1..=3600,
                d.connections.idle_timeout.as_secs() as i64,
            ) as u64),
        },
    };
    (errors.len() == before).then_some(policy)
}

fn parse_quota(
    source: &Source<'_>,
    errors: &mut Vec<ConfigError>,
    key: &str,
    q: &RawQuota,
) -> Option<QuotaSpec> {
    let per = match q.per.get_ref().as_str() {
        "second" => Duration::from_secs(1),
        "minute" => Duration::from_secs(60),
        "hour" => Duration::from_secs(3600),
        other => {
            errors.push(source.error_at(
                q.per.span(),
                format!(
                    "rate_limits.{key}.per must be \"second\", \"minute\" or \"hour\" (got {other:?})"
                ),
            ));
            return None;
        }
    };
    let mut ok = true;
    for (name, v) in [("rate", &q.rate), ("burst", &q.burst)] {
        if !(1..=1_000_000).contains(v.get_ref()) {
            errors.push(source.error_at(
                v.span(),
                format!(
                    "rate_limits.{key}.{name} must be between 1 and 1000000 (got {})",
                    v.get_ref()
                ),
            ));
            ok = false;
        }
    }
    ok.then(|| QuotaSpec::new(per, *q.rate.get_ref() as u32, *q.burst.get_ref() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn ipv6_is_folded_to_its_64_and_ipv4_kept_whole() {
        let p = RateLimitPolicy::default();
        assert_eq!(
            fold("2001:db8:1:2:aaaa::1".parse().unwrap(), &p),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            fold("10.1.2.3".parse().unwrap(), &p),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn burst_then_refusal_then_refill() {
        let clock = FakeRelativeClock::default();
        let l = Limiters::new(RateLimitPolicy::default(), clock.clone());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10 {
            l.check_source(peer, Class::Login).unwrap();
        }
        let refused = l.check_source(peer, Class::Login).unwrap_err();
        assert_eq!(refused.limit, 10);
        assert_eq!(refused.retry_after_secs, 1);
        // Another source is untouched.
        l.check_source("10.0.0.2".parse().unwrap(), Class::Login)
            .unwrap();
        clock.advance(Duration::from_secs(1));
        l.check_source(peer, Class::Login).unwrap();
    }

    #[test]
    fn connection_caps_release_on_drop() {
        let fence = Fence::new(&RateLimitPolicy {
            connections: ConnectionLimits {
                per_source: 2,
                total: 3,
                idle_timeout: Duration::from_secs(1),
            },
            ..RateLimitPolicy::default()
        });
        let policy = RateLimitPolicy {
            connections: ConnectionLimits {
                per_source: 2,
                total: 3,
                idle_timeout: Duration::from_secs(1),
            },
            ..RateLimitPolicy::default()
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = fence.open_connection(a, &policy).unwrap();
        let _a2 = fence.open_connection(a, &policy).unwrap();
        assert_eq!(fence.open_connection(a, &policy).err(), Some("per-source"));
        let _b1 = fence.open_connection(b, &policy).unwrap();
        assert_eq!(fence.open_connection(c, &policy).err(), Some("total"));
        drop(a1);
        assert!(fence.open_connection(c, &policy).is_ok());
    }
}
