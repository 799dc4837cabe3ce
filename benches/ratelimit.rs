//! Limiter check cost and memory per key. `cargo bench --bench ratelimit`.
//!
//! Memory is the process's resident-set growth while 1,000,000 distinct
//! sources are inserted, divided by the key count (so it includes the map's
//! spare capacity); then the sweep frees them.
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use hsmgate::ratelimit::{Class, Limiters, RateLimitPolicy};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    const N: u32 = 1_000_000;
    let clock = FakeRelativeClock::default();
    let limiters = Limiters::new(RateLimitPolicy::default(), clock.clone());
    let hot: IpAddr = "10.0.0.1".parse().unwrap();

    let start = Instant::now();
    for _ in 0..N {
        let _ = black_box(limiters.check_source(black_box(hot), Class::Transit));
    }
    let hot_ns = start.elapsed().as_nanos() as f64 / f64::from(N);

    let before = rss_bytes();
    let start = Instant::now();
    for i in 0..N {
        let source = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
        let _ = black_box(limiters.check_source(source, Class::Transit));
    }
    let new_ns = start.elapsed().as_nanos() as f64 / f64::from(N);
    let grown = rss_bytes().saturating_sub(before);
    let keys = limiters.key_count();

    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    let start = Instant::now();
    for _ in 0..N {
        let _ = black_box(limiters.check_source(black_box(v6), Class::Transit));
    }
    let v6_ns = start.elapsed().as_nanos() as f64 / f64::from(N);

    clock.advance(Duration::from_secs(60));
    let start = Instant::now();
    limiters.sweep();
    let sweep = start.elapsed();

    println!("check, one hot IPv4 source:        {hot_ns:>7.1} ns");
    println!("check, one hot IPv6 source (/64):  {v6_ns:>7.1} ns");
    println!("check, new source each time (1M):  {new_ns:>7.1} ns");
    println!(
        "memory: {keys} keys, RSS +{} KiB, {:.0} B/key",
        grown / 1024,
        grown as f64 / keys as f64
    );
    println!(
        "sweep of {keys} idle keys: {:.1} ms, keys left: {}",
        sweep.as_secs_f64() * 1000.0,
        limiters.key_count()
    );
}
