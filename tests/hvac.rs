//! Vault-client compatibility: the unmodified Python client hvac 2.4 drives
//! the Transit API of a real server (tests/hvac/test_walkthrough.py,
//! test_engine_depth.py, and test_known_answers.py, whose every answer is
//! checked against a local computation with the `cryptography` package).
//!
//! The Python comes from `HSMGATE_PYTHON` when set (it must have hvac 2.4.x
//! and `cryptography`),
//! else from a venv at `target/hvac-venv`, created and filled from
//! tests/hvac/requirements.txt when missing. When neither works (no venv
//! module, no network) the test prints a loud SKIPPED notice and passes,
//! unless `HSMGATE_REQUIRE_ALL=1`, as in CI, where it fails instead.
mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{Opts, TestServer};

const HVAC_SERIES: &str = "2.4.";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{shown} exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The hvac version importable by `python`.
fn hvac_version(python: &Path) -> Result<String, String> {
    let out = run(Command::new(python).args([
        "-c",
        "import importlib.metadata, hvac; print(importlib.metadata.version('hvac'))",
    ]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn require_hvac_series(python: &Path) -> Result<(), String> {
    let version = hvac_version(python)?;
    if !version.starts_with(HVAC_SERIES) {
        return Err(format!(
            "{} has hvac {version}; these tests need {HVAC_SERIES}x",
            python.display()
        ));
    }
    // The known-answer script computes its side locally with it.
    run(Command::new(python).args(["-c", "import cryptography.hazmat.primitives.keywrap"]))
        .map_err(|e| format!("{} has no cryptography package: {e}", python.display()))?;
    Ok(())
}

/// `target/hvac-venv`, created and filled with the pinned requirements if
/// it is missing or holds the wrong hvac.
fn venv_python() -> Result<PathBuf, String> {
    let venv = manifest_dir().join("target").join("hvac-venv");
    let python = venv.join("bin").join("python");
    if python.exists() && require_hvac_series(&python).is_ok() {
        return Ok(python);
    }
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let requirements = manifest_dir().join("tests/hvac/requirements.txt");
    // Short timeouts: offline, pip's defaults would retry for many minutes
    // before this test could say it is skipping.
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--timeout", "30", "--retries", "2", "-r"])
        .arg(&requirements))?;
    require_hvac_series(&python)?;
    Ok(python)
}

/// The interpreter to run the walk-through with, or why there is none.
/// Found once per test binary, so parallel tests never race to build the venv.
fn python() -> Result<&'static Path, &'static str> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| match std::env::var_os("HSMGATE_PYTHON") {
        // An explicit choice that does not work is a broken setup, never a skip.
        Some(p) => {
            let p = PathBuf::from(p);
            if let Err(e) = require_hvac_series(&p) {
                panic!("HSMGATE_PYTHON={} cannot be used: {e}", p.display());
            }
            Ok(p)
        }
        None => venv_python(),
    });
    found.as_deref().map_err(String::as_str)
}

/// Skips loudly, or fails when the environment demands every test run.
fn python_or_skip(test: &str) -> Option<&'static Path> {
    match python() {
        Ok(p) => Some(p),
        Err(why) => {
            if std::env::var("HSMGATE_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!(
                    "{test}: no Python with hvac {HVAC_SERIES}x, and HSMGATE_REQUIRE_ALL=1:\n{why}"
                );
            }
            let bar = "!".repeat(78);
            let notice = format!(
                "\n{bar}\n!! SKIPPED {test}: no Python with hvac {HVAC_SERIES}x could be found or set up.\n\
                 !! Set HSMGATE_PYTHON to an interpreter that has it, or let this test create\n\
                 !! target/hvac-venv (needs python3 -m venv and access to PyPI).\n\
                 !! Set HSMGATE_REQUIRE_ALL=1 to make this a failure.\n{bar}\n{why}\n{bar}\n"
            );
            // Straight to the process's stderr: eprintln! output is captured
            // by the test harness and shown only for failures, and a skip
            // that nobody sees is a silent pass.
            let _ = std::io::stderr().write_all(notice.as_bytes());
            None
        }
    }
}

/// Runs a script from tests/hvac/ against `server` as crypto user `token`.
fn run_script(python: &Path, server: &TestServer, token: &str, script: &str) -> Output {
    let path = manifest_dir().join("tests/hvac").join(script);
    Command::new(python)
        .arg(&path)
        .env("HSMGATE_ADDR", format!("https://{}", server.addr))
        .env("HSMGATE_CA", server.data_dir.join("tls/cert.pem"))
        .env("HSMGATE_TOKEN", token)
        // hvac reads these too; a developer's own Vault settings must not leak in.
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .env_remove("VAULT_CACERT")
        .env_remove("REQUESTS_CA_BUNDLE")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()))
}

#[tokio::test]
async fn hvac_walkthrough() {
    let Some(python) = python_or_skip("hvac_walkthrough") else {
        return;
    };
    let server = TestServer::start(Opts::default());
    let (_officer, app) = server.init_with_app_user().await;

    // The server is another process, so blocking this runtime stalls nothing.
    let out = run_script(python, &server, &app, "test_walkthrough.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvac walk-through failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
        out.status,
        server.log()
    );
    assert!(
        stdout.contains("checks passed"),
        "no summary line:\n{stdout}"
    );
}

#[tokio::test]
async fn hvac_engine_depth() {
    let Some(python) = python_or_skip("hvac_engine_depth") else {
        return;
    };
    let server = TestServer::start(Opts::default());
    let (_officer, app) = server.init_with_app_user().await;
    let out = run_script(python, &server, &app, "test_engine_depth.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvac engine-depth script failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
        out.status,
        server.log()
    );
    assert!(
        stdout.contains("checks passed") && stdout.contains("ok auto_rotate_period"),
        "no summary line:\n{stdout}"
    );
}

/// BYOK import in Vault's documented flow and every answer checked against
/// a local computation (tests/hvac/test_known_answers.py).
#[tokio::test]
async fn hvac_known_answers() {
    let Some(python) = python_or_skip("hvac_known_answers") else {
        return;
    };
    let server = TestServer::start(Opts::default());
    let (_officer, app) = server.init_with_app_user().await;
    let out = run_script(python, &server, &app, "test_known_answers.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvac known-answer script failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
        out.status,
        server.log()
    );
    assert!(
        stdout.contains("checks passed"),
        "no summary line:\n{stdout}"
    );
}
