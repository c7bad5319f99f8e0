//! Trust in the PCE: TLS 1.3 only, and only the CA given at activation is trusted.
//!
//! With `--ca-fingerprint`, activation first makes a probe handshake that records the chain the
//! PCE presents without trusting it; the certificate in that chain whose SHA-256 matches the
//! operator's fingerprint becomes the trust anchor, and everything after (activation itself
//! included) is verified against it in the ordinary way. Nothing secret travels on the probe.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    BadFingerprint(String),
    #[error("cannot read CA certificate {path}: {cause}")]
    ReadCa { path: String, cause: String },
    #[error("CA certificate is not usable as a trust anchor: {0}")]
    BadCa(String),
    #[error("{server} is not HOST:PORT")]
    BadServer { server: String },
    #[error("cannot reach {server}: {cause}")]
    Unreachable { server: String, cause: io::Error },
    #[error("TLS handshake with {server} failed: {cause}")]
    Handshake { server: String, cause: String },
    #[error(
        "no certificate presented by {server} matches CA fingerprint {expected}; it presented: {presented}"
    )]
    FingerprintMismatch { server: String, expected: String, presented: String },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Accepts `AB:CD:...` or `abcd...` forms; returns the normalised lowercase hex.
pub fn parse_fingerprint(text: &str) -> Result<String, TlsError> {
    let hex: String = text.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(text.to_string()));
    }
    Ok(hex)
}

/// Reads a CA certificate file in PEM (first CERTIFICATE block) or DER form.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError::ReadCa { path: path.display().to_string(), cause: e.to_string() })?;
    parse_ca(bytes).map_err(|error| match error {
        TlsError::ReadCa { cause, .. } => TlsError::ReadCa { path: path.display().to_string(), cause },
        other => other,
    })
}

/// The CA certificate (DER) in the bytes of a CA file: the first CERTIFICATE block of PEM, or DER;
/// it must be usable as a trust anchor. Errors name no path (the caller adds it).
pub fn parse_ca(bytes: Vec<u8>) -> Result<Vec<u8>, TlsError> {
    let der = match CertificateDer::from_pem_slice(&bytes) {
        Ok(cert) => cert.to_vec(),
        Err(_) if bytes.first() == Some(&0x30) => bytes,
        Err(e) => return Err(TlsError::ReadCa { path: String::new(), cause: e.to_string() }),
    };
    roots(&der)?;
    Ok(der)
}

fn roots(ca_der: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).map_err(|e| TlsError::BadCa(e.to_string()))?;
    Ok(roots)
}

/// Client configuration that trusts exactly one CA.
pub fn client_config(ca_der: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::BadCa(e.to_string()))?
        .with_root_certificates(roots(ca_der)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6) into the TLS server name and the port.
pub fn split_server(server: &str) -> Result<(ServerName<'static>, u16), TlsError> {
    let bad = || TlsError::BadServer { server: server.to_string() };
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    let name = ServerName::try_from(host.to_string()).map_err(|_| bad())?;
    Ok((name, port))
}

/// Opens a TCP connection to `HOST:PORT` with a connect timeout, trying each resolved address.
pub fn connect(server: &str, port: u16, timeout: Duration) -> Result<TcpStream, TlsError> {
    let (name, _) = split_server(&format!("{server}:{port}"))?;
    let host = match &name {
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => other.to_str().into_owned(),
    };
    let unreachable = |cause| TlsError::Unreachable { server: format!("{server}:{port}"), cause };
    let addrs = (host.as_str(), port).to_socket_addrs().map_err(unreachable)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

/// Makes a handshake with `server` without trusting it and returns the CA certificate (DER) from
/// the presented chain whose SHA-256 is `expected` (normalised hex from [`parse_fingerprint`]).
pub fn fetch_ca_by_fingerprint(server: &str, expected: &str, timeout: Duration) -> Result<Vec<u8>, TlsError> {
    let (name, port) = split_server(server)?;
    let host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(server);
    let recorder = Arc::new(ChainRecorder { provider: provider(), chain: Mutex::new(Vec::new()) });
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Handshake { server: server.into(), cause: e.to_string() })?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let mut tcp = connect(host, port, timeout)?;
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| TlsError::Handshake { server: server.into(), cause: e.to_string() })?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| TlsError::Handshake { server: server.into(), cause: e.to_string() })?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let chain = recorder.chain.lock().map(|c| c.clone()).unwrap_or_default();
    let presented: Vec<String> = chain.iter().map(|der| fingerprint(der)).collect();
    match chain.into_iter().zip(&presented).find(|(_, fp)| fp.as_str() == expected) {
        Some((der, _)) => {
            roots(&der)?;
            Ok(der)
        }
        None => Err(TlsError::FingerprintMismatch {
            server: server.into(),
            expected: expected.into(),
            presented: presented.join(", "),
        }),
    }
}

/// A verifier for the probe handshake only: it records the chain and checks the handshake
/// signature (so the peer holds the end-entity key), but trusts nothing.
#[derive(Debug)]
struct ChainRecorder {
    provider: Arc<CryptoProvider>,
    chain: Mutex<Vec<Vec<u8>>>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.chain.lock() {
            chain.push(end_entity.to_vec());
            chain.extend(intermediates.iter().map(|c| c.to_vec()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_forms() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex).unwrap(), hex);
        assert_eq!(parse_fingerprint(&colons).unwrap(), hex);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn servers_split_into_name_and_port() {
        assert_eq!(split_server("198.18.0.1:8443").unwrap().1, 8443);
        assert_eq!(split_server("[::1]:8443").unwrap().1, 8443);
        assert_eq!(split_server("pce.example:443").unwrap().1, 443);
        assert!(split_server("198.18.0.1").is_err());
        assert!(split_server(":8443").is_err());
        assert!(split_server("host:0").is_err());
    }
}
