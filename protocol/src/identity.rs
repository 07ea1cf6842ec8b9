//! Node identities: ed25519 key pairs and the files that hold them.
//!
//! A key file is two lines of ASCII: the header `tapestry-ed25519-secret-v1`
//! and the 32-byte secret seed in lowercase hex. It is created with mode 0600
//! (write to a temporary file, fsync, rename), and loading refuses a file that
//! other users can read, as ssh does, because a leaked key lets anyone sign in
//! this node's name.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::id::NodeId;

const KEY_FILE_HEADER: &str = "tapestry-ed25519-secret-v1";

/// What went wrong reading or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file system refused (missing file, permissions, full disk...).
    #[error("key file {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A key file already exists where a new one was to be written; it is
    /// never overwritten, since that would silently change the node's identity.
    #[error("key file {0} already exists; refusing to overwrite a node identity")]
    Exists(PathBuf),
    /// The file is readable or writable by users other than its owner.
    #[error(
        "key file {path} has mode {mode:o}; other users could read the node's secret key. \
         Run `chmod 600 {path}` and try again"
    )]
    TooOpen {
        /// The file concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a Tapestry key file.
    #[error("{path} is not a Tapestry key file: {reason}")]
    Malformed {
        /// The file concerned.
        path: PathBuf,
        /// What was wrong with it.
        reason: &'static str,
    },
}

/// A node's ed25519 key pair. `Debug` never shows the secret, and the secret
/// is wiped from memory when the key pair is dropped.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("node_id", &self.node_id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Keypair {
    /// Makes a fresh key pair from a cryptographic RNG the caller provides
    /// (the crate reads no entropy on its own, so tests can be deterministic).
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self {
            signing: SigningKey::generate(rng),
        }
    }

    /// Rebuilds a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// The 32-byte secret seed. Handle with care: anyone holding it can sign
    /// as this node.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// This key pair's public identity.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// Signs a 32-byte digest. Protocol messages are signed through
    /// [`crate::Signed::sign`], which builds the digest with a domain tag.
    pub(crate) fn sign_digest(&self, digest: &[u8; 32]) -> [u8; 64] {
        self.signing.sign(digest).to_bytes()
    }

    /// Writes the secret to a new key file with mode 0600. Fails if the file
    /// exists. The write is atomic: a crash leaves either no file or a whole one.
    pub fn write_key_file(&self, path: &Path) -> Result<(), KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            return Err(KeyFileError::Exists(path.to_owned()));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or(KeyFileError::Malformed {
            path: path.to_owned(),
            reason: "the path has no file name",
        })?;
        let mut tmp_name = file_name.to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let _ = fs::remove_file(&tmp);
        let mut text = Zeroizing::new(String::with_capacity(100));
        text.push_str(KEY_FILE_HEADER);
        text.push('\n');
        text.push_str(&hex::encode(self.signing.to_bytes()));
        text.push('\n');
        {
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp).map_err(io_err)?;
            f.write_all(text.as_bytes()).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        // Hard-link instead of rename so an existing file is never replaced,
        // even if one appeared since the check above.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(KeyFileError::Exists(path.to_owned()));
            }
            Err(e) => return Err(io_err(e)),
        }
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads a key file written by [`Keypair::write_key_file`].
    pub fn read_key_file(path: &Path) -> Result<Self, KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let malformed = |reason| KeyFileError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        if meta.len() > 4096 {
            return Err(malformed("larger than any key file"));
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err)?);
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(malformed("missing the `tapestry-ed25519-secret-v1` header"));
        }
        let hex_line = lines.next().ok_or(malformed("missing the secret line"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(malformed("unexpected text after the secret"));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_line.trim(), &mut secret[..])
            .map_err(|_| malformed("the secret is not 64 hex characters"))?;
        Ok(Self::from_secret_bytes(&secret))
    }
}

impl NodeId {
    /// The ed25519 verifying key, if these bytes are a valid curve point.
    pub(crate) fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn key() -> Keypair {
        Keypair::generate(&mut ChaCha20Rng::seed_from_u64(1))
    }

    #[test]
    fn debug_redacts_the_secret() {
        let k = key();
        let dbg = format!("{k:?}");
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains(&hex::encode(k.secret_bytes().as_slice())));
        assert!(!dbg.contains(&hex::encode(&k.secret_bytes()[..4])));
    }

    #[test]
    fn key_file_round_trip_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let k = key();
        k.write_key_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Keypair::read_key_file(&path).unwrap();
        assert_eq!(back.node_id(), k.node_id());
        assert!(matches!(
            k.write_key_file(&path),
            Err(KeyFileError::Exists(_))
        ));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn key_file_refuses_open_permissions_and_garbage() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        key().write_key_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keypair::read_key_file(&path),
            Err(KeyFileError::TooOpen { mode: 0o644, .. })
        ));
        let junk = dir.path().join("junk.key");
        fs::write(&junk, "hello\nworld\n").unwrap();
        fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Keypair::read_key_file(&junk),
            Err(KeyFileError::Malformed { .. })
        ));
        let short = dir.path().join("short.key");
        fs::write(&short, format!("{KEY_FILE_HEADER}\nabcd\n")).unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Keypair::read_key_file(&short),
            Err(KeyFileError::Malformed { .. })
        ));
        assert!(matches!(
            Keypair::read_key_file(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }
}
