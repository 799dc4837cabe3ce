//! `hsmgate check --config <file>` against the shipped config and against
//! one broken fixture per kind of mistake, running the real binary.
//!
//! Each fixture under `tests/fixtures/config/` names the errors it must
//! produce in its first lines:
//!
//! ```toml
//! # expect-error: <file>:<line>: <part of the message>
//! ```
//!
//! where `<file>` is relative to the fixture directory (the error may be in a
//! policy file the fixture points at). `check` must exit 2 and print each of
//! them to stderr as `…/<file>:<line>:<column>: …message…`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures_dir() -> PathBuf {
    manifest_dir().join("tests/fixtures/config")
}

/// Runs `hsmgate check --config <config>` from an unrelated working
/// directory, so relative paths must resolve against the config file.
fn check(config: &Path) -> Output {
    let cwd = std::env::temp_dir();
    Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["check", "--config"])
        .arg(config)
        .current_dir(cwd)
        .output()
        .expect("the hsmgate binary runs")
}

struct Expected {
    file: String,
    line: usize,
    fragment: String,
}

fn expectations(fixture: &Path) -> Vec<Expected> {
    let text = fs::read_to_string(fixture).expect("fixture is readable");
    text.lines()
        .filter_map(|line| line.strip_prefix("# expect-error: "))
        .map(|spec| {
            let mut parts = spec.splitn(3, ':');
            let file = parts.next().unwrap_or_default().trim().to_string();
            let line = parts
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("{}: bad expect-error line", fixture.display()));
            let fragment = parts.next().unwrap_or_default().trim().to_string();
            Expected {
                file,
                line,
                fragment,
            }
        })
        .collect()
}

#[test]
fn shipped_default_passes() {
    let config = manifest_dir().join("config/hsmgate.toml");
    let out = check(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status.code()
    );
    assert!(stdout.contains("config OK"), "stdout: {stdout}");
    assert!(stdout.contains("hsmgate.toml"), "stdout: {stdout}");
}

#[test]
fn the_fixture_policies_are_valid() {
    // Guards the fixtures themselves: a fixture must fail for its own reason,
    // not because the shared policy directory is broken.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("ok.toml");
    let policies = fixtures_dir().join("policies");
    fs::write(
        &config,
        format!(
            "policies_dir = {:?}\n[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:8200\"\n\
             security_groups = [\"apps\"]\nadmin_groups = [\"admins\"]\n",
            policies.display().to_string()
        ),
    )
    .expect("write config");
    let out = check(&config);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_broken_fixture_fails_with_file_and_line() {
    let dir = fixtures_dir();
    let mut fixtures: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("fixture directory exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "toml"))
        .collect();
    fixtures.sort();

    // The kinds of mistake this test promises to cover.
    let names: Vec<String> = fixtures
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for required in [
        "unknown-key.toml",
        "bad-cidr.toml",
        "host-bits.toml",
        "undefined-group.toml",
        "threshold-out-of-range.toml",
        "duplicate-listener.toml",
        "bad-address.toml",
        "syntax-error.toml",
        "several-errors.toml",
        "bad-acl.toml",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "missing fixture {required}"
        );
    }

    let mut failures = Vec::new();
    for fixture in &fixtures {
        let expected = expectations(fixture);
        assert!(
            !expected.is_empty(),
            "{}: no `# expect-error:` line",
            fixture.display()
        );
        let out = check(fixture);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = fixture.display();
        if out.status.code() != Some(2) {
            failures.push(format!(
                "{name}: exit {:?}, expected 2\nstderr: {stderr}",
                out.status.code()
            ));
            continue;
        }
        for e in &expected {
            // `<file>:<line>:` then the column, then the message.
            let at = format!("{}:{}:", e.file, e.line);
            let found = stderr
                .lines()
                .any(|line| line.contains(&at) && line.contains(&e.fragment));
            if !found {
                failures.push(format!(
                    "{name}: no stderr line with {at:?} and {:?}\nstderr: {stderr}",
                    e.fragment
                ));
            }
        }
        // Error lines start with a path into the fixtures; anything else on
        // stderr (a summary, logs) is the CLI's business.
        let prefix = dir.display().to_string();
        let errors = stderr.lines().filter(|l| l.starts_with(&prefix)).count();
        if errors != expected.len() {
            failures.push(format!(
                "{name}: {errors} error lines, expected {}\nstderr: {stderr}",
                expected.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn shipped_examples_pass() {
    let dir = manifest_dir().join("config/examples");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).expect("config/examples exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = check(&path);
            assert!(
                out.status.success(),
                "{}: stderr: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no example config in {}", dir.display());
}

#[test]
fn the_default_stays_loopback_only() {
    let config = hsmgate::config::load(&manifest_dir().join("config/hsmgate.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    for l in &config.listeners {
        assert!(l.address.ip().is_loopback(), "{}", l.name);
    }
    assert!(config.global_deny_lists.is_empty());
    for group in config.groups.values() {
        for rule in &group.rules {
            match &rule.source {
                hsmgate::config::RuleSource::Net(net) => {
                    assert!(net.addr().is_loopback(), "{}: {net}", group.name)
                }
                other => panic!("{}: {other}", group.name),
            }
        }
    }
}
