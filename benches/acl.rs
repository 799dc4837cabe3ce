//! Access-policy check cost. `cargo bench --bench acl`.
//!
//! One principal carrying two policies with `n` rules in all (a third exact
//! paths, a third trailing-`*` globs, a third `+` patterns, each on its own
//! key name), checked against: an exact hit, a glob hit, a `+` hit, and a
//! miss (which scans every wildcard rule: the worst case). The first check
//! of a policy combination merges its rules (measured separately); every
//! later check reuses the merged set.
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use hsmgate::acl::{self, AclRequest, Capability};

fn policies(n: usize) -> String {
    let mut text = String::new();
    for (policy, range) in [("a", 0..n / 2), ("b", n / 2..n)] {
        text.push_str(&format!("[[policy]]\nname = \"{policy}\"\n"));
        for i in range {
            let path = match i % 3 {
                0 => format!("transit/encrypt/key-{i}"),
                1 => format!("transit/decrypt/key-{i}-*"),
                _ => format!("transit/+/key-{i}"),
            };
            text.push_str(&format!(
                "[[policy.path]]\npath = \"{path}\"\ncapabilities = [\"update\"]\n"
            ));
        }
    }
    text
}

fn time(label: &str, iters: u32, mut f: impl FnMut() -> bool, expect: bool) {
    assert_eq!(f(), expect, "{label}");
    let start = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iters);
    println!("  {label:<28} {ns:>9.1} ns");
}

fn main() {
    let names = vec!["a".to_string(), "b".to_string()];
    for n in [10, 100, 1000] {
        let text = policies(n);
        let start = Instant::now();
        let acl = acl::from_files(&[(Path::new("acl.toml"), text.as_str())]).unwrap();
        let load = start.elapsed();
        let req = |path: String| AclRequest {
            path,
            capability: Capability::Update,
        };
        let first = Instant::now();
        black_box(acl.check(&names, &req("transit/encrypt/x".into())));
        let merge = first.elapsed();
        println!(
            "{n} rules: parse+validate {:.2} ms, first check (merge) {:.1} µs",
            load.as_secs_f64() * 1e3,
            merge.as_secs_f64() * 1e6
        );
        let iters = 200_000;
        let exact = req(format!("transit/encrypt/key-{}", (n / 3) * 3 - 3));
        time(
            "exact hit",
            iters,
            || acl.check(&names, &exact).allowed(),
            true,
        );
        let glob = req(format!("transit/decrypt/key-{}-eu", 1));
        time(
            "glob hit",
            iters,
            || acl.check(&names, &glob).allowed(),
            true,
        );
        let plus = req("transit/sign/key-2".into());
        time(
            "`+` hit",
            iters,
            || acl.check(&names, &plus).allowed(),
            true,
        );
        let miss = req("transit/hmac/nothing".into());
        time(
            "miss (scans all)",
            iters,
            || acl.check(&names, &miss).allowed(),
            false,
        );
    }
}
