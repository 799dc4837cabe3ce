//! TLS: the server certificate (configured, or a self-signed one generated
//! into the data dir at first start) and the rustls server config; per
//! listener, optionally a client-certificate verifier (mutual TLS).
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::engine::{crypto, store};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("private key file {0} is readable by group or others; refusing it (chmod 600)")]
    KeyPermissions(PathBuf),
    #[error("generating the self-signed certificate: {0}")]
    Generate(String),
    #[error("writing {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    #[error("building the TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client_ca {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
}

/// A loaded certificate chain and key, with the leaf's SHA-256 fingerprint
/// (what an operator pins or compares when trusting a self-signed cert).
pub struct ServerCert {
    pub cert_path: PathBuf,
    pub fingerprint: String,
    pub generated: bool,
    config: Arc<ServerConfig>,
}

impl ServerCert {
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

/// Loads the configured certificate, or generates (once) a self-signed one
/// for the listeners' addresses plus localhost into `<data dir>/tls/`.
pub fn load_or_generate(config: &Config) -> Result<ServerCert, TlsError> {
    let (cert_path, key_path, generated) = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), false),
        _ => {
            let dir = config.data_dir.join("tls");
            let cert = dir.join("cert.pem");
            let key = dir.join("key.pem");
            let generated = !(cert.exists() && key.exists());
            if generated {
                generate(
                    &dir,
                    &cert,
                    &key,
                    config.listeners.iter().map(|l| l.address),
                )?;
            }
            (cert, key, generated)
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| read_err(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&cert_path, e))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::NoCertificate(cert_path.clone()))?;
    let fingerprint = hex::encode(crypto::sha256(leaf.as_ref()))
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    check_key_permissions(&key_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_err(&key_path, e))?;
    let mut server = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerCert {
        cert_path,
        fingerprint,
        generated,
        config: Arc::new(server),
    })
}

/// The CA certificates of a listener's `client_ca` file: at least one, each
/// usable as a trust anchor. Also run by config validation (`check`).
pub fn read_client_ca(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot be read: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("holds a certificate unusable as a CA: {e}"))?;
    }
    Ok(roots)
}

/// The rustls config for one listener: the shared server certificate
/// (`base`'s resolver) and, when the listener sets `client_ca`, a verifier
/// that checks client certificates against it (WebPKI rules: chain,
/// validity, client-auth usage). `required = false` still verifies any
/// certificate that is sent; it only lets a client send none.
pub fn listener_server_config(
    base: &Arc<ServerConfig>,
    client: Option<&crate::config::ClientAuth>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let Some(client) = client else {
        return Ok(base.clone());
    };
    let roots = read_client_ca(&client.ca_file).map_err(|detail| TlsError::ClientCa {
        path: client.ca_file.clone(),
        detail,
    })?;
    let provider = Arc::new(aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let verifier = if client.required {
        verifier
    } else {
        verifier.allow_unauthenticated()
    };
    let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
        path: client.ca_file.clone(),
        detail: e.to_string(),
    })?;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(base.cert_resolver.clone());
    server.alpn_protocols = base.alpn_protocols.clone();
    Ok(Arc::new(server))
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| read_err(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(TlsError::KeyPermissions(path.to_path_buf()));
    }
    Ok(())
}

fn generate(
    dir: &Path,
    cert: &Path,
    key: &Path,
    addrs: impl Iterator<Item = SocketAddr>,
) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TlsError::Write {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for a in addrs {
        let ip = a.ip();
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
    }
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let key_pem = zeroize::Zeroizing::new(ck.signing_key.serialize_pem());
    let write = |path: &Path, bytes: &[u8], mode: u32| {
        store::write_atomic(path, bytes, mode).map_err(|e| TlsError::Write {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    };
    write(key, key_pem.as_bytes(), 0o600)?;
    write(cert, ck.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}
