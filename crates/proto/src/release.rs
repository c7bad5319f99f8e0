//! Signed agent releases (issue 16, self-upgrade): what a release's Ed25519 signature covers, and
//! its verification. Shared by the PCE (which stores releases and refuses one whose signature does
//! not verify) and the VEN (which verifies again before it runs anything).
//!
//! The signature covers [`Manifest::signed_message`]: a fixed tag, the version, the target
//! triple, the length and the SHA-256 of the binary, one per line. The signing key can live
//! anywhere (an offline machine, a build server): only the 32-byte public key is pinned by the
//! VENs (`release_key`). A signature is 64 bytes, written as 128 hex digits.

use std::io::Read;

use ring::digest::{Context, SHA256};
use ring::signature::{ED25519, UnparsedPublicKey};

/// The first line of every signed message: a signature made for anything else never verifies.
pub const SIGNED_TAG: &str = "ven-release-v1";
/// Largest release accepted: what one VEN API answer may carry (a static agent is under 3 MB).
pub const MAX_RELEASE_BYTES: u64 = crate::MAX_BODY_BYTES;
/// Longest version string.
pub const MAX_VERSION_BYTES: usize = 64;

/// What a release says it is; the signature covers all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    /// The Rust target triple the binary is built for (`aarch64-unknown-linux-musl`, ...).
    pub target: String,
    pub length: u64,
    pub sha256: [u8; 32],
}

/// Why a release, its signature or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("release key {0:?}: not 64 hex digits (an Ed25519 public key)")]
    BadKey(String),
    #[error("release signature: not 128 hex digits (an Ed25519 signature)")]
    BadSignature,
    #[error(
        "release version {0:?}: 1 to {MAX_VERSION_BYTES} characters of letters, digits, '.', '-', '+' or '_'"
    )]
    BadVersion(String),
    #[error("release target {0:?}: not a target triple")]
    BadTarget(String),
    #[error("release {version} is {actual} bytes; its manifest says {expected}")]
    Length { version: String, expected: u64, actual: u64 },
    #[error("release {version} is larger than {MAX_RELEASE_BYTES} bytes")]
    TooLarge { version: String },
    #[error("release {version}: its SHA-256 is not the manifest's (altered or truncated)")]
    Digest { version: String },
    #[error("release {version} for {target}: the signature does not verify with the pinned release key")]
    Signature { version: String, target: String },
    #[error("release {version}: reading it: {cause}")]
    Read { version: String, cause: String },
}

impl Manifest {
    /// The manifest of `bytes` read to the end (at most [`MAX_RELEASE_BYTES`]).
    pub fn of_reader(version: &str, target: &str, reader: &mut dyn Read) -> Result<Self, ReleaseError> {
        check_version(version)?;
        check_target(target)?;
        let (length, sha256) = digest(version, reader)?;
        Ok(Manifest { version: version.to_string(), target: target.to_string(), length, sha256 })
    }

    /// The bytes the signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "{SIGNED_TAG}\nversion {}\ntarget {}\nlength {}\nsha256 {}\n",
            self.version,
            self.target,
            self.length,
            hex(&self.sha256)
        )
        .into_bytes()
    }

    /// Checks the signature over this manifest with `key` (both as [`parse_key`] and
    /// [`parse_signature`] give them).
    pub fn verify_signature(&self, signature: &[u8; 64], key: &[u8; 32]) -> Result<(), ReleaseError> {
        UnparsedPublicKey::new(&ED25519, key).verify(&self.signed_message(), signature).map_err(|_| {
            ReleaseError::Signature { version: self.version.clone(), target: self.target.clone() }
        })
    }

    /// Checks that `reader` holds exactly the binary this manifest describes.
    pub fn verify_content(&self, reader: &mut dyn Read) -> Result<(), ReleaseError> {
        let (length, sha256) = digest(&self.version, reader)?;
        if length != self.length {
            return Err(ReleaseError::Length {
                version: self.version.clone(),
                expected: self.length,
                actual: length,
            });
        }
        // Not secret: a plain comparison is fine.
        if sha256 != self.sha256 {
            return Err(ReleaseError::Digest { version: self.version.clone() });
        }
        Ok(())
    }
}

/// Length and SHA-256 of what `reader` holds, refusing more than [`MAX_RELEASE_BYTES`].
fn digest(version: &str, reader: &mut dyn Read) -> Result<(u64, [u8; 32]), ReleaseError> {
    let mut context = Context::new(&SHA256);
    let mut buffer = [0u8; 16 * 1024];
    let mut length: u64 = 0;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReleaseError::Read { version: version.to_string(), cause: e.to_string() }),
        };
        length += read as u64;
        if length > MAX_RELEASE_BYTES {
            return Err(ReleaseError::TooLarge { version: version.to_string() });
        }
        context.update(&buffer[..read]);
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(context.finish().as_ref());
    Ok((length, sha256))
}

/// Versions become file names and log text: a small alphabet.
pub fn check_version(version: &str) -> Result<(), ReleaseError> {
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION_BYTES
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        && !version.starts_with('.');
    if ok { Ok(()) } else { Err(ReleaseError::BadVersion(version.to_string())) }
}

/// A target triple: 2 to 4 dash-separated parts of lowercase letters, digits and '_'.
pub fn check_target(target: &str) -> Result<(), ReleaseError> {
    let parts: Vec<&str> = target.split('-').collect();
    let ok = (2..=4).contains(&parts.len())
        && target.len() <= 64
        && parts.iter().all(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if ok { Ok(()) } else { Err(ReleaseError::BadTarget(target.to_string())) }
}

/// An Ed25519 public key from 64 hex digits.
pub fn parse_key(text: &str) -> Result<[u8; 32], ReleaseError> {
    unhex(text.trim()).ok_or_else(|| ReleaseError::BadKey(text.trim().chars().take(80).collect()))
}

/// An Ed25519 signature from 128 hex digits.
pub fn parse_signature(text: &str) -> Result<[u8; 64], ReleaseError> {
    unhex(text.trim()).ok_or(ReleaseError::BadSignature)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    fn key_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn public(pair: &Ed25519KeyPair) -> [u8; 32] {
        parse_key(&hex(pair.public_key().as_ref())).unwrap()
    }

    #[test]
    fn a_signed_release_verifies_and_any_change_does_not() {
        let pair = key_pair();
        let binary = b"\x7fELF pretend binary".to_vec();
        let manifest =
            Manifest::of_reader("1.2.3", "aarch64-unknown-linux-musl", &mut binary.as_slice()).unwrap();
        let signature = parse_signature(&hex(pair.sign(&manifest.signed_message()).as_ref())).unwrap();
        manifest.verify_signature(&signature, &public(&pair)).unwrap();
        manifest.verify_content(&mut binary.as_slice()).unwrap();

        // Another version, target, length or digest: the signature no longer covers it.
        for changed in [
            Manifest { version: "1.2.4".into(), ..manifest.clone() },
            Manifest { target: "x86_64-unknown-linux-gnu".into(), ..manifest.clone() },
            Manifest { length: manifest.length + 1, ..manifest.clone() },
            Manifest { sha256: [0; 32], ..manifest.clone() },
        ] {
            assert!(matches!(
                changed.verify_signature(&signature, &public(&pair)),
                Err(ReleaseError::Signature { .. })
            ));
        }
        // Another key.
        assert!(manifest.verify_signature(&signature, &public(&key_pair())).is_err());
        // Altered or truncated bytes.
        let mut altered = binary.clone();
        altered[5] ^= 1;
        assert!(matches!(manifest.verify_content(&mut altered.as_slice()), Err(ReleaseError::Digest { .. })));
        assert!(matches!(
            manifest.verify_content(&mut &binary[..binary.len() - 1]),
            Err(ReleaseError::Length { expected, actual, .. }) if actual + 1 == expected
        ));
    }

    #[test]
    fn keys_signatures_versions_and_targets_are_checked() {
        assert!(parse_key(&"ab".repeat(32)).is_ok());
        assert!(parse_key(&"ab".repeat(31)).is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        assert!(parse_signature(&"01".repeat(64)).is_ok());
        assert!(parse_signature("").is_err());
        for good in ["1.0.0", "0.2.0-rc.1", "2026.12+build_7"] {
            check_version(good).unwrap();
        }
        for bad in ["", "../x", "1 0", "1.0\n", ".hidden", &"9".repeat(65)] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
        for good in ["x86_64-unknown-linux-gnu", "armv7-unknown-linux-musleabihf", "aarch64-linux"] {
            check_target(good).unwrap();
        }
        for bad in ["", "x86_64", "X86-linux", "a-b-c-d-e", "a--b", "a/b-c"] {
            assert!(check_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_oversized_release_is_refused_while_reading() {
        let mut endless = std::io::repeat(0).take(MAX_RELEASE_BYTES + 1);
        assert!(matches!(Manifest::of_reader("1", "a-b", &mut endless), Err(ReleaseError::TooLarge { .. })));
    }
}
