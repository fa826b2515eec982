//! The token signing secret: 32 random bytes in the file named by `[auth] secret_file`.
//!
//! Invariants:
//! - There is no built-in secret: the first start creates the file from the OS random
//!   generator with mode 0600 (created exclusively, so two processes cannot both write one);
//!   later starts read it.
//! - A file that is not exactly 32 bytes, or that group or others may read, stops start-up
//!   with a clear error instead of signing with something weak or exposed.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore as _;

use super::token::SigningKey;

/// Why the secret could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the token secret {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the token secret {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token secret {path} must hold exactly 32 bytes, it holds {len}")]
    Length { path: PathBuf, len: usize },
    #[error(
        "the token secret {path} has mode {mode:o}: group and others must not read it (chmod 600)"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Whether the secret was read or created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretOrigin {
    Read,
    Created,
}

/// Reads the secret at `path`, creating it (0600, 32 random bytes) when absent.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, SecretOrigin), SecretError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)
                .map_err(|source| SecretError::Read {
                    path: path.to_owned(),
                    source,
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(SecretError::Exposed {
                    path: path.to_owned(),
                    mode: mode & 0o777,
                });
            }
            let key: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| SecretError::Length {
                    path: path.to_owned(),
                    len: bytes.len(),
                })?;
            Ok((SigningKey::new(key), SecretOrigin::Read))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let create = |source| SecretError::Create {
                path: path.to_owned(),
                source,
            };
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(create)?;
            }
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            let mut file = match opened {
                Ok(file) => file,
                // Another process created it meanwhile: use theirs.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_or_create(path)
                }
                Err(err) => return Err(create(err)),
            };
            file.write_all(&key).map_err(create)?;
            file.sync_all().map_err(create)?;
            Ok((SigningKey::new(key), SecretOrigin::Created))
        }
        Err(source) => Err(SecretError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret");
        let (_, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, SecretOrigin::Created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let (key, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, SecretOrigin::Read);
        // Same key: a token signed with the first verifies with the second.
        let claims = super::super::token::Claims {
            name: "a".into(),
            role: super::super::rbac::Role::Agent,
            expires: 10,
            generation: 0,
        };
        let first = std::fs::read(&path).unwrap();
        let again = SigningKey::new(first.try_into().unwrap());
        let token = super::super::token::sign(&again, &claims);
        assert!(super::super::token::verify(&key, &token, 0).is_ok());
    }

    #[test]
    fn wrong_length_or_mode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(SecretError::Length { len: 5, .. })
        ));
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(SecretError::Exposed { mode: 0o644, .. })
        ));
    }
}
