//! Release signing and the release store, offline (issue 16, self-upgrade): `pce release-key
//! generate` makes the Ed25519 key pair releases are signed with, and `pce release sign` signs an
//! agent binary. Both work on files alone, without a running PCE, so the signing key can stay on
//! a build machine: the VENs pin only the public key, and the PCE needs only a release and its
//! detached signature. What a signature covers: `ven_proto::release`.
//!
//! `pce release-key trust`, `pce release add|list|remove` work on the data directory's release
//! store (`releases`) directly, also while `pce serve` runs: it reads the store when asked.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use ven_proto::release::{self, Manifest, ReleaseError};

use crate::releases;

/// An offline release command.
pub enum Command {
    /// Writes a new signing key (PKCS#8) to the path, prints the public key (hex).
    GenerateKey { output: PathBuf },
    /// Signs the binary with the key for `version` and `target`; prints the signature (hex).
    Sign { binary: PathBuf, key: PathBuf, version: String, target: String },
    /// Verifies a binary and its signature with a public key (hex), as a VEN will.
    Verify { binary: PathBuf, signature: String, public_key: String, version: String, target: String },
    /// Trusts a public key (hex) for the releases of the data directory's store.
    TrustKey { data_dir: PathBuf, public_key: String, replace: bool },
    /// Adds a release to the store: its signature given, or made with a signing key here.
    Add { data_dir: PathBuf, binary: PathBuf, version: String, target: String, signature: SignatureSource },
    /// Lists the store's releases.
    List { data_dir: PathBuf, json: bool },
    /// Removes a release from the store.
    Remove { data_dir: PathBuf, version: String, target: String },
}

/// Where `pce release add` takes the signature from.
pub enum SignatureSource {
    /// A detached signature (hex), made elsewhere with `pce release sign`.
    Hex(String),
    /// A signing key file: the release is signed here.
    Key(PathBuf),
}

/// Why a release command failed: the object and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseToolError {
    #[error("{path}: {cause}")]
    File { path: PathBuf, cause: std::io::Error },
    #[error("{path}: already exists; a signing key is never overwritten")]
    KeyExists { path: PathBuf },
    #[error("{path}: not an Ed25519 signing key (PKCS#8)")]
    BadKeyFile { path: PathBuf },
    #[error("generating a key: the system's random source failed")]
    Random,
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    Store(#[from] crate::releases::ReleaseStoreError),
}

/// Runs `command`, printing its result on stdout.
pub fn run(command: Command) -> Result<(), ReleaseToolError> {
    let mut stdout = std::io::stdout().lock();
    let line = match command {
        Command::GenerateKey { output } => release::hex(&generate_key(&output)?),
        Command::Sign { binary, key, version, target } => {
            release::hex(&sign(&binary, &key, &version, &target)?)
        }
        Command::Verify { binary, signature, public_key, version, target } => {
            let manifest = manifest_of(&binary, &version, &target)?;
            manifest.verify_signature(
                &release::parse_signature(&signature)?,
                &release::parse_key(&public_key)?,
            )?;
            format!(
                "ok: {version} for {target}, {} bytes, sha256 {}",
                manifest.length,
                release::hex(&manifest.sha256)
            )
        }
        Command::TrustKey { data_dir, public_key, replace } => {
            let key = releases::trust_key(&data_dir, &public_key, replace)?;
            format!(
                "trusted release key {} ({})",
                release::hex(&key),
                data_dir.join(releases::KEY_FILE).display()
            )
        }
        Command::Add { data_dir, binary, version, target, signature } => {
            let signature = match signature {
                SignatureSource::Hex(hex) => release::parse_signature(&hex)?,
                SignatureSource::Key(key) => sign(&binary, &key, &version, &target)?,
            };
            let added =
                releases::add(&data_dir, &binary, &version, &target, &signature, crate::clock::now())?;
            format!(
                "added release {version} for {target}: {} bytes, sha256 {}",
                added.manifest.length,
                release::hex(&added.manifest.sha256)
            )
        }
        Command::List { data_dir, json } => list(&data_dir, json)?,
        Command::Remove { data_dir, version, target } => {
            releases::remove(&data_dir, &version, &target)?;
            format!("removed release {version} for {target}")
        }
    };
    // A closed pipe is not an error worth a message.
    let _ = writeln!(stdout, "{line}");
    Ok(())
}

/// Writes a new key to `output` (created exclusively, mode 0600) and returns its public half.
pub fn generate_key(output: &Path) -> Result<[u8; 32], ReleaseToolError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| ReleaseToolError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| ReleaseToolError::Random)?;
    let file_error = |cause| ReleaseToolError::File { path: output.to_path_buf(), cause };
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(output)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ReleaseToolError::KeyExists { path: output.to_path_buf() });
        }
        Err(e) => return Err(file_error(e)),
    };
    file.write_all(pkcs8.as_ref()).and_then(|()| file.sync_all()).map_err(file_error)?;
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    Ok(public)
}

/// The detached signature of `binary` as release `version` for `target`, with the key in `key`.
pub fn sign(binary: &Path, key: &Path, version: &str, target: &str) -> Result<[u8; 64], ReleaseToolError> {
    let pkcs8 =
        std::fs::read(key).map_err(|cause| ReleaseToolError::File { path: key.to_path_buf(), cause })?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| ReleaseToolError::BadKeyFile { path: key.to_path_buf() })?;
    let manifest = manifest_of(binary, version, target)?;
    let mut signature = [0u8; 64];
    signature.copy_from_slice(pair.sign(&manifest.signed_message()).as_ref());
    Ok(signature)
}

/// The store's releases as a table (or a JSON array); damaged ones say why.
fn list(data_dir: &Path, json: bool) -> Result<String, ReleaseToolError> {
    let entries = releases::scan(data_dir)?;
    if json {
        let items: Vec<serde_json::Value> = entries
            .iter()
            .map(|entry| match &entry.release {
                Ok(stored) => serde_json::json!({
                    "version": entry.version,
                    "target": entry.target,
                    "length": stored.manifest.length,
                    "sha256": release::hex(&stored.manifest.sha256),
                    "signature": release::hex(&stored.signature),
                    "added_at": crate::clock::rfc3339(stored.added_at),
                }),
                Err(e) => serde_json::json!({
                    "version": entry.version,
                    "target": entry.target,
                    "damaged": e.to_string(),
                }),
            })
            .collect();
        return Ok(serde_json::Value::Array(items).to_string());
    }
    let mut lines =
        vec![format!("{:<16}  {:<32}  {:>10}  {:<20}  SHA-256", "VERSION", "TARGET", "BYTES", "ADDED")];
    for entry in &entries {
        lines.push(match &entry.release {
            Ok(stored) => format!(
                "{:<16}  {:<32}  {:>10}  {:<20}  {}",
                entry.version,
                entry.target,
                stored.manifest.length,
                crate::clock::rfc3339(stored.added_at),
                release::hex(&stored.manifest.sha256)
            ),
            Err(e) => format!("{:<16}  {:<32}  damaged: {e}", entry.version, entry.target),
        });
    }
    Ok(lines.join("\n"))
}

fn manifest_of(binary: &Path, version: &str, target: &str) -> Result<Manifest, ReleaseToolError> {
    let mut file =
        File::open(binary).map_err(|cause| ReleaseToolError::File { path: binary.to_path_buf(), cause })?;
    Ok(Manifest::of_reader(version, target, &mut file)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_signs_a_binary_that_verifies_and_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("pce-release-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("release.key");
        let public = generate_key(&key).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(generate_key(&key), Err(ReleaseToolError::KeyExists { .. })));

        let binary = dir.join("ven");
        std::fs::write(&binary, b"\x7fELF a release").unwrap();
        let target = "aarch64-unknown-linux-musl";
        let signature = sign(&binary, &key, "1.4.0", target).unwrap();
        let manifest = manifest_of(&binary, "1.4.0", target).unwrap();
        manifest.verify_signature(&signature, &public).unwrap();
        // The signature binds the version: not valid for another.
        assert!(
            manifest_of(&binary, "1.4.1", target).unwrap().verify_signature(&signature, &public).is_err()
        );
        // A key file that is not one.
        assert!(matches!(sign(&binary, &binary, "1.4.0", target), Err(ReleaseToolError::BadKeyFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
