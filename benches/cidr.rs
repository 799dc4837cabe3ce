//! CIDR lookup and build cost of the netfilter tries at 1k, 100k and 1M
//! networks. No harness: `cargo bench --bench cidr` prints one line per
//! measurement (results recorded in docs/BENCHMARKS.md).
//!
//! Networks are pseudo-random IPv4 prefixes of length 16–32 (mostly /24–/32,
//! like imported threat and partner lists) plus 1/8 as many IPv6
//! /32–/64; lookups are random addresses, about half of them covered.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use hsmgate::netfilter::{CidrSet, ListenerFilter};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn networks(n: usize, rng: &mut Rng) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let r = rng.next();
            if i % 9 == 8 {
                let len = 32 + (r % 33) as u8;
                let addr = Ipv6Addr::from((0x2001_0db8u128 << 96) | ((r as u128) << 40));
                IpNet::V6(Ipv6Net::new(addr, len).unwrap().trunc())
            } else {
                // Mostly hosts and small networks, like real feeds; a few
                // /16s, so that not every address is covered.
                let len = if r % 64 == 0 {
                    16
                } else {
                    [20, 24, 24, 28, 32, 32, 32, 32][(r >> 40) as usize % 8]
                };
                let addr = Ipv4Addr::from((r >> 8) as u32);
                IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())
            }
        })
        .collect()
}

fn probes(nets: &[IpNet], rng: &mut Rng, n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            let r = rng.next();
            if i % 2 == 0 {
                // Inside a listed network.
                let net = nets[r as usize % nets.len()];
                match net {
                    IpNet::V4(v4) => IpAddr::V4(v4.network()),
                    IpNet::V6(v6) => IpAddr::V6(v6.network()),
                }
            } else {
                IpAddr::V4(Ipv4Addr::from(r as u32))
            }
        })
        .collect()
}

fn main() {
    const LOOKUPS: usize = 2_000_000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("cidr bench: {LOOKUPS} lookups per size, best of 3 rounds");
    for n in [1_000usize, 100_000, 1_000_000] {
        let nets = networks(n, &mut rng);
        let started = Instant::now();
        let set = CidrSet::from_nets(nets.iter().copied());
        let build = started.elapsed();
        // The previous build (unsorted inserts, index from the trie), same data.
        let started = Instant::now();
        let unsorted = CidrSet::from_nets_unsorted(nets.iter().copied());
        let build_unsorted = started.elapsed();
        assert_eq!(unsorted.len(), set.len());
        drop(unsorted);
        println!(
            "{n:>9} nets: build from_nets (sorted) {:>8.1} ms | one insert at a time + seal {:>8.1} ms",
            build.as_secs_f64() * 1e3,
            build_unsorted.as_secs_f64() * 1e3
        );
        let ips = probes(&nets, &mut rng, LOOKUPS);
        let filter = ListenerFilter::new("bench", set.clone(), CidrSet::new());

        let mut best_set = f64::MAX;
        let mut best_filter = f64::MAX;
        let mut hits = 0usize;
        for _ in 0..3 {
            let t = Instant::now();
            hits = ips
                .iter()
                .filter(|ip| set.contains(black_box(**ip)))
                .count();
            best_set = best_set.min(t.elapsed().as_nanos() as f64 / LOOKUPS as f64);
            let t = Instant::now();
            let allowed = ips
                .iter()
                .filter(|ip| filter.decide_connect(black_box(**ip), 8200).is_ok())
                .count();
            best_filter = best_filter.min(t.elapsed().as_nanos() as f64 / LOOKUPS as f64);
            assert_eq!(allowed, hits);
        }
        println!(
            "{n:>9} nets ({} distinct): build {:>8.1} ms | CidrSet::contains {best_set:>6.1} ns | \
             ListenerFilter::decide_connect {best_filter:>6.1} ns | hits {:.0}%",
            set.len(),
            build.as_secs_f64() * 1e3,
            hits as f64 * 100.0 / LOOKUPS as f64
        );
    }

    // Parsing a one-million-line prefix-list file (config load path).
    let nets = networks(1_000_000, &mut rng);
    let text: String = nets.iter().map(|n| format!("{n}\n")).collect();
    let path = std::path::Path::new("bench-list.txt");
    let started = Instant::now();
    let mut errors = Vec::new();
    let parsed = hsmgate::config::read_prefix_file(path, text.as_bytes(), &mut errors);
    let parse = started.elapsed();
    assert!(errors.is_empty());
    println!(
        "parse 1M-line prefix-list text ({} MB): {:.1} ms ({} nets)",
        text.len() / 1_000_000,
        parse.as_secs_f64() * 1e3,
        parsed.len()
    );
}
