//! The PCE's own PKI and its TLS server configuration (ring through rustls).
//!
//! On first start [`ensure`] creates a CA (`ca.pem`, `ca.key`) and a server certificate signed by it
//! (`server.pem`, `server.key`; `server.json` records its names and expiry). The server certificate
//! is issued again, under the same CA, when the wanted names change or it nears expiry. The server
//! presents the chain [server, CA]: VENs pin the SHA-256 fingerprint of the CA within it. Keys are
//! written 0600, atomically.

use crate::clock;
use crate::crypto::sha256_hex;
use crate::fsutil::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
const SERVER_META_FILE: &str = "server.json";

const DAY: u64 = 86_400;
/// Session tickets sent after each full handshake (a client uses each once).
const TLS13_TICKETS: usize = 2;
const CA_VALIDITY: u64 = 20 * 365 * DAY;
const SERVER_VALIDITY: u64 = 5 * 365 * DAY;
/// A server certificate closer than this to its expiry is issued again at start.
const RENEW_BEFORE: u64 = 30 * DAY;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("generating the {what}: {source}")]
    Generate { what: &'static str, source: rcgen::Error },
    #[error(
        "{dir} holds only one of {CA_CERT_FILE} and {CA_KEY_FILE}: restore the other (VENs pin this CA) or remove both to create a new CA"
    )]
    HalfCa { dir: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the system random number generator failed")]
    Random,
}

/// The ring crypto provider, the only one this crate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate's names: every `extra` name, the listen address unless unspecified, then
/// the loopback names; without duplicates, in that order.
pub fn server_names(listen: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = extra.to_vec();
    if !listen.is_unspecified() {
        names.push(listen.to_string());
    }
    names.extend(["127.0.0.1", "::1", "localhost"].map(String::from));
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// Certificates and key the servers present.
pub struct Pki {
    /// SHA-256 of the CA certificate (DER), lowercase hex.
    pub ca_fingerprint: String,
    /// [server, CA].
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Pki {
    /// TLS 1.3 only, no client certificates; session tickets (stateless, keys rotated every
    /// 12 hours by ring's ticketer) so that a fleet's VENs resume their sessions:
    /// after a provision every VEN reconnects at once, and a resumed handshake skips the
    /// certificate signature on the PCE and the chain verification on the VEN. rustls' stateful
    /// cache (256 sessions) would miss across a fleet.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        config.send_tls13_tickets = TLS13_TICKETS;
        Ok(Arc::new(config))
    }
}

#[derive(Serialize, Deserialize, PartialEq)]
struct ServerMeta {
    names: Vec<String>,
    not_after: u64,
}

/// Loads the CA and server certificate from `dir`, creating or re-issuing what is missing or stale.
pub fn ensure(dir: &Path, names: &[String], now: u64) -> Result<Pki, TlsError> {
    let (ca_cert_path, ca_key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    let ca_exists = ca_cert_path.exists();
    if ca_exists != ca_key_path.exists() {
        // A new CA would silently change the fingerprint every paired VEN pins.
        return Err(TlsError::HalfCa { dir: dir.to_path_buf() });
    }
    let (ca_key, ca_der) = if ca_exists {
        let key_pem = read_string(&ca_key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| pem_error(&ca_key_path, "CA key"))?;
        (key, load_cert(&ca_cert_path)?)
    } else {
        let key = KeyPair::generate().map_err(|source| TlsError::Generate { what: "CA key", source })?;
        let cert = ca_params(now)
            .self_signed(&key)
            .map_err(|source| TlsError::Generate { what: "CA certificate", source })?;
        write(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write(&ca_cert_path, cert.pem().as_bytes(), 0o644)?;
        (key, cert.der().clone())
    };

    let (cert_path, key_path, meta_path) =
        (dir.join(SERVER_CERT_FILE), dir.join(SERVER_KEY_FILE), dir.join(SERVER_META_FILE));
    let meta: Option<ServerMeta> =
        std::fs::read(&meta_path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let current = ca_exists
        && cert_path.exists()
        && key_path.exists()
        && meta.is_some_and(|meta| meta.names == names && meta.not_after > now + RENEW_BEFORE);
    let (server_der, key) = if current {
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|_| pem_error(&key_path, "private key"))?;
        (load_cert(&cert_path)?, key)
    } else {
        let not_after = now + SERVER_VALIDITY;
        let (cert_pem, key_pem) = issue_server(&ca_key, names, now, not_after)?;
        write(&key_path, key_pem.as_bytes(), 0o600)?;
        write(&cert_path, cert_pem.as_bytes(), 0o644)?;
        let meta = ServerMeta { names: names.to_vec(), not_after };
        write(&meta_path, &serde_json::to_vec_pretty(&meta).unwrap_or_default(), 0o644)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| pem_error(&key_path, "private key"))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| pem_error(&cert_path, "certificate"))?;
        (der, key)
    };
    Ok(Pki { ca_fingerprint: sha256_hex(&ca_der), chain: vec![server_der, ca_der], key })
}

/// SHA-256 fingerprint of the first certificate in a PEM file.
pub fn fingerprint_file(path: &Path) -> Result<String, TlsError> {
    Ok(sha256_hex(&load_cert(path)?))
}

/// Everything but the validity depends only on constants, so the same parameters re-create the
/// issuer (name, key identifier) when the server certificate is issued again under an old CA.
fn ca_params(now: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "ven");
    name.push(DnType::CommonName, "ven reference PCE CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, now, now + CA_VALIDITY);
    params
}

fn issue_server(
    ca_key: &KeyPair,
    names: &[String],
    now: u64,
    not_after: u64,
) -> Result<(String, String), TlsError> {
    let generate = |what| move |source| TlsError::Generate { what, source };
    let issuer = ca_params(now).self_signed(ca_key).map_err(generate("CA certificate"))?;
    let key = KeyPair::generate().map_err(generate("server key"))?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(generate("server names"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "pce");
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).map_err(|_| TlsError::Random)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    set_validity(&mut params, now, not_after);
    let cert = params.signed_by(&key, &issuer, ca_key).map_err(generate("server certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn set_validity(params: &mut CertificateParams, now: u64, not_after: u64) {
    // A day of slack for clocks behind ours.
    let (year, month, day) = clock::date(now.saturating_sub(DAY));
    params.not_before = rcgen::date_time_ymd(year, month, day);
    let (year, month, day) = clock::date(not_after);
    params.not_after = rcgen::date_time_ymd(year, month, day);
}

fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let pem = read_string(path)?;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| pem_error(path, "certificate"))
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    write_atomic(path, bytes, mode).map_err(|source| TlsError::Write { path: path.to_path_buf(), source })
}

fn pem_error(path: &Path, what: &'static str) -> TlsError {
    TlsError::Pem { path: path.to_path_buf(), what }
}

/// Fuzzing (the `pce_pem_files` target): `data` as each file of the PCE's PKI read at start
/// (`ca.key`, `ca.pem`, `server.pem`, `server.key`, `server.json`): a damaged file is an error,
/// never a panic; a CA key that parses issues a CA certificate, and a certificate and key that
/// parse make a server configuration or an error.
#[doc(hidden)]
pub fn fuzz_pem(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(key) = KeyPair::from_pem(&text) {
        let _ = ca_params(1_700_000_000).self_signed(&key);
    }
    let cert = CertificateDer::from_pem_slice(data);
    if let Ok(cert) = &cert {
        assert_eq!(sha256_hex(cert).len(), 64);
    }
    let key = PrivateKeyDer::from_pem_slice(data);
    if let (Ok(cert), Ok(key)) = (cert, key) {
        let pki = Pki { ca_fingerprint: String::new(), chain: vec![cert.clone(), cert], key };
        let _ = pki.server_config();
    }
    if let Ok(meta) = serde_json::from_slice::<ServerMeta>(data) {
        let _ = (meta.names.len(), meta.not_after > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;
    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn verify(pki: &Pki, name: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(pki.chain[1].clone())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name =
            ServerName::try_from(name.to_string()).map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(&pki.chain[0], &pki.chain[1..], &name, &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn the_server_certificate_verifies_against_the_ca_for_each_name() {
        let dir = scratch_dir("tls-verify");
        let names = server_names("198.18.0.1".parse().unwrap(), &["pce.example".to_string()]);
        assert_eq!(names, ["pce.example", "198.18.0.1", "127.0.0.1", "::1", "localhost"]);
        let pki = ensure(&dir, &names, clock::now()).unwrap();
        for name in &names {
            verify(&pki, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify(&pki, "other.example").is_err());
        assert!(pki.server_config().is_ok());
        assert_eq!(fingerprint_file(&dir.join(CA_CERT_FILE)).unwrap(), pki.ca_fingerprint);
        assert_eq!(pki.ca_fingerprint.len(), 64);
        let key_mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(key_mode & 0o777, 0o600);
    }

    #[test]
    fn changed_names_reissue_the_server_certificate_under_the_same_ca() {
        let dir = scratch_dir("tls-reissue");
        let now = clock::now();
        let first = ensure(&dir, &server_names("0.0.0.0".parse().unwrap(), &[]), now).unwrap();
        let again = ensure(&dir, &server_names("0.0.0.0".parse().unwrap(), &[]), now).unwrap();
        assert_eq!(first.chain, again.chain, "unchanged names keep the certificate");
        assert!(verify(&first, "pce.example").is_err());

        let names = server_names("0.0.0.0".parse().unwrap(), &["pce.example".to_string()]);
        let renamed = ensure(&dir, &names, now).unwrap();
        assert_eq!(renamed.ca_fingerprint, first.ca_fingerprint);
        assert_ne!(renamed.chain[0], first.chain[0]);
        verify(&renamed, "pce.example").unwrap();
        verify(&renamed, "127.0.0.1").unwrap();

        let later = ensure(&dir, &names, now + SERVER_VALIDITY).unwrap();
        assert_ne!(later.chain[0], renamed.chain[0], "a certificate near expiry is renewed");

        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(ensure(&dir, &names, now), Err(TlsError::HalfCa { .. })));
        assert_eq!(
            fingerprint_file(&dir.join(CA_CERT_FILE)).unwrap(),
            first.ca_fingerprint,
            "the CA is kept"
        );
    }

    /// Runs a handshake between `client` and `server` in memory; returns how it went.
    fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<ServerConfig>) -> rustls::HandshakeKind {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut client = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut server = rustls::ServerConnection::new(server.clone()).unwrap();
        // Bounded: a TLS 1.3 handshake and its tickets take a few flights.
        for _ in 0..10 {
            let mut flight = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut flight).unwrap();
            }
            server.read_tls(&mut flight.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut flight = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut flight).unwrap();
            }
            client.read_tls(&mut flight.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
                break;
            }
        }
        assert!(!client.is_handshaking());
        client.handshake_kind().unwrap()
    }

    #[test]
    fn clients_resume_with_the_servers_tickets() {
        let dir = scratch_dir("tls-resume");
        let pki = ensure(&dir, &server_names("0.0.0.0".parse().unwrap(), &[]), clock::now()).unwrap();
        let server = pki.server_config().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(pki.chain[1].clone()).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Full);
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Resumed);
        // Stateless tickets: every client of a fleet (each its own cache) resumes.
        // More clients than rustls' stateful cache (256) holds.
        let others: Vec<_> = (0..300)
            .map(|_| {
                let mut config = (*client).clone();
                config.resumption = rustls::client::Resumption::in_memory_sessions(4);
                Arc::new(config)
            })
            .collect();
        for other in &others {
            assert_eq!(handshake(other, &server), rustls::HandshakeKind::Full);
        }
        for other in &others {
            assert_eq!(handshake(other, &server), rustls::HandshakeKind::Resumed);
        }
    }
}
