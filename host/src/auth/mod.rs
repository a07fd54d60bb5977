//! Users and HTTP Basic authentication: password hashing (argon2), checking an
//! `Authorization` header, and the bootstrap admin.
//!
//! Never imports wasmtime. Checking a password is deliberately slow (argon2), so a
//! successful check is remembered for a short while, keyed by a salted hash of the
//! header, and callers run [`Authenticator::authenticate`] on the blocking pool.

use crate::model::User;
use crate::store::{Store, StoreError};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a verified `Authorization` header is trusted without hashing again.
const CACHE_FOR: Duration = Duration::from_secs(300);
/// Bound on remembered headers, so a flood of distinct good logins cannot grow memory.
const CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("wrong user name or password")]
    Invalid,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Splits `Basic base64(user:password)` at the first colon, as Conductor did, so
/// passwords may contain colons; surrounding spaces of the user name are dropped.
pub fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.trim().to_owned(), password.to_owned()))
}

pub struct Authenticator {
    store: Arc<Store>,
    hasher: RandomState,
    /// Shared with the requests they prove: a request takes a reference, not a copy.
    verified: Mutex<HashMap<u64, (Arc<User>, Instant)>>,
}

impl Authenticator {
    pub fn new(store: Arc<Store>) -> Authenticator {
        Authenticator {
            store,
            hasher: RandomState::new(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The user a recently verified header proves, without hashing: cheap enough to
    /// call on the async runtime.
    pub fn remembered(&self, header: &str) -> Option<Arc<User>> {
        let key = self.hasher.hash_one(header);
        match self.cache().get(&key) {
            Some((user, at)) if at.elapsed() < CACHE_FOR => Some(user.clone()),
            _ => None,
        }
    }

    /// The user an `Authorization` header proves, or why it proves nobody.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Arc<User>, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let key = self.hasher.hash_one(header);
        if let Some(user) = self.remembered(header) {
            return Ok(user);
        }
        let (name, password) = parse_basic(header).ok_or(AuthError::Invalid)?;
        let user = self.store.user(&name)?.ok_or(AuthError::Invalid)?;
        if user.disabled || !verify_password(&user.password_hash, &password) {
            return Err(AuthError::Invalid);
        }
        let user = Arc::new(user);
        let mut cache = self.cache();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (user.clone(), Instant::now()));
        Ok(user)
    }

    /// Forgets remembered logins, after a user was changed or disabled, so the change
    /// takes effect at the next request.
    pub fn forget(&self) {
        self.cache().clear();
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Arc<User>, Instant)>> {
        self.verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A random password for the bootstrap admin when none is configured.
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_splits_at_the_first_colon() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(" admin :pa:ss")
        );
        assert_eq!(
            parse_basic(&header),
            Some(("admin".to_owned(), "pa:ss".to_owned()))
        );
        assert_eq!(parse_basic("Bearer x"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
    }

    #[test]
    fn hashes_verify_only_their_password() -> Result<(), AuthError> {
        let hash = hash_password("secret")?;
        assert!(verify_password(&hash, "secret"));
        assert!(!verify_password(&hash, "Secret"));
        assert!(!hash.contains("secret"));
        Ok(())
    }
}
