//! The generated shell completions and man page come from the real clap
//! definition: run the built binary and look for every subcommand.
use std::process::Command;

fn hsmgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(args)
        .output()
        .expect("the hsmgate binary runs");
    assert!(out.status.success(), "hsmgate {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn bash_completions_name_every_subcommand() {
    let script = hsmgate(&["completions", "bash"]);
    assert!(script.contains("_hsmgate()"), "{script}");
    for sub in [
        "serve",
        "check",
        "audit",
        "verify",
        "completions",
        "man",
        "version",
    ] {
        assert!(script.contains(sub), "missing {sub}");
    }
}

#[test]
fn man_page_is_roff_with_every_subcommand() {
    let page = hsmgate(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH hsmgate"),
        "{page}"
    );
    for sub in ["serve", "check", "audit", "completions", "version"] {
        assert!(page.contains(sub), "missing {sub}");
    }
}
