//! Cluster identities. Every member holds a certificate from the cluster's
//! own CA naming its role in the subject alternative names:
//!
//! - a node: DNS `node-<id>.cluster.hsmgate` and URI `urn:hsmgate:node:<id>`;
//! - a gateway: DNS `gateway-<name>.cluster.hsmgate` and URI
//!   `urn:hsmgate:gateway:<name>`.
//!
//! A client checks the server it reaches by the DNS name of the node id it
//! wants (so an address that answers with another node's, or a gateway's,
//! certificate is refused by ordinary WebPKI name checking); the cluster
//! port checks a client by the URI. Only a node certificate may speak Raft,
//! forward writes or join: a gateway certificate cannot act as a node.
use std::path::Path;

/// Who a cluster certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Node(u64),
    Gateway(String),
}

const NODE_URI: &str = "urn:hsmgate:node:";
const GATEWAY_URI: &str = "urn:hsmgate:gateway:";

/// The DNS name a node's certificate carries (and a client verifies).
pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.cluster.hsmgate")
}

/// The role a (verified) certificate names; `None` if it names none, or
/// more than one.
pub fn role_of(der: &[u8]) -> Option<Role> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut roles = Vec::new();
    for name in &san.value.general_names {
        if let GeneralName::URI(u) = name {
            if let Some(id) = u.strip_prefix(NODE_URI) {
                // Canonical decimal only: "01" or "+1" are not node 1.
                match id.parse::<u64>() {
                    Ok(n) if n > 0 && n.to_string() == id => roles.push(Role::Node(n)),
                    _ => return None,
                }
            } else if let Some(name) = u.strip_prefix(GATEWAY_URI) {
                roles.push(Role::Gateway(name.to_string()));
            }
        }
    }
    if roles.len() == 1 {
        roles.pop()
    } else {
        None
    }
}

/// Files written by [`generate`].
pub struct Generated {
    pub files: Vec<std::path::PathBuf>,
}

/// Writes a new cluster CA and one certificate per node id (and gateway
/// name) into `dir`: `ca.pem`, `ca-key.pem`, `node-<id>.pem`,
/// `node-<id>-key.pem`, `gateway-<name>.pem`, `gateway-<name>-key.pem`.
/// Keys are written mode 0600. The CA key is only needed to issue more
/// certificates: keep it offline.
pub fn generate(dir: &Path, nodes: &[u64], gateways: &[String]) -> Result<Generated, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let mut write = |name: String, text: &str, mode: u32| -> Result<(), String> {
        let path = dir.join(name);
        crate::engine::store::write_atomic(&path, text.as_bytes(), mode)
            .map_err(|e| e.to_string())?;
        files.push(path);
        Ok(())
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca.distinguished_name
        .push(DnType::CommonName, "hsmgate cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;
    write("ca.pem".into(), &ca_cert.pem(), 0o644)?;
    write("ca-key.pem".into(), &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaves = nodes
        .iter()
        .map(|id| {
            (
                format!("node-{id}"),
                node_server_name(*id),
                format!("{NODE_URI}{id}"),
            )
        })
        .chain(gateways.iter().map(|g| {
            (
                format!("gateway-{g}"),
                format!("gateway-{g}.cluster.hsmgate"),
                format!("{GATEWAY_URI}{g}"),
            )
        }));
    for (file, dns, uri) in leaves {
        let mut params = CertificateParams::new(vec![dns]).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, &file);
        params.subject_alt_names.push(SanType::URI(
            uri.as_str().try_into().map_err(|e| format!("{e}"))?,
        ));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        write(format!("{file}.pem"), &cert.pem(), 0o644)?;
        write(format!("{file}-key.pem"), &key.serialize_pem(), 0o600)?;
    }
    Ok(Generated { files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_carry_their_role_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[1, 22], &["edge".into()]).unwrap();
        let der = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).unwrap();
            let mut reader = std::io::BufReader::new(pem.as_slice());
            rustls_pemfile_first(&mut reader)
        };
        assert_eq!(role_of(&der("node-1.pem")), Some(Role::Node(1)));
        assert_eq!(role_of(&der("node-22.pem")), Some(Role::Node(22)));
        assert_eq!(
            role_of(&der("gateway-edge.pem")),
            Some(Role::Gateway("edge".into()))
        );
        // The CA names no role.
        assert_eq!(role_of(&der("ca.pem")), None);
    }

    fn rustls_pemfile_first(reader: &mut dyn std::io::BufRead) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        let mut text = Vec::new();
        reader.read_to_end(&mut text).unwrap();
        rustls_pki_types::CertificateDer::pem_slice_iter(&text)
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }
}
