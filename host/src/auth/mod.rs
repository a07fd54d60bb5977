//! Users and HTTP Basic authentication: password hashing (argon2), checking an
//! `Authorization` header, the limits on password checks, and the bootstrap admin.
//!
//! Never imports wasmtime. Checking a password is deliberately slow (argon2, about
//! 19 MiB for a few dozen milliseconds), so a successful check is remembered for a short
//! while, keyed by a salted hash of the header; the checks themselves run on the
//! blocking pool, a few at a time ([`LoginLimits::checks`]), and wrong passwords make
//! their address and user name wait ([`throttle`]).

mod throttle;

pub use throttle::{Culprit, LoginLimits};

use crate::lock;
use crate::model::User;
use crate::store::{Store, StoreError};
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine as _;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use throttle::Failures;
use tokio::sync::Semaphore;

/// How long a verified `Authorization` header is trusted without hashing again.
const CACHE_FOR: Duration = Duration::from_secs(300);
/// Bound on remembered headers, so a flood of distinct good logins cannot grow memory.
const CACHE_MAX: usize = 10_000;
/// How long credentials that proved a user are let past the failure limits (they are
/// still checked): a user keeps working while someone guesses their password.
const VOUCH_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("wrong user name or password")]
    Invalid,
    /// Too many wrong passwords came from the client's address or for the user name.
    #[error("too many wrong passwords; the next attempt is allowed in {retry_after:?}")]
    Throttled {
        culprit: Culprit,
        retry_after: Duration,
    },
    /// Every password check was taken for as long as a login may wait.
    #[error("no password check was free in time")]
    Busy,
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

/// Whether `password` is the one `hash` (a PHC string) was made from. The argon2
/// working memory (19 MiB with the default parameters) is `memory`, kept by the caller
/// from one check to the next: allocated and freed every time, blocks this size are
/// left scattered about the allocator's arenas, and a flood of checks grew the process
/// by hundreds of MiB although only a few ran at once.
fn verify_password(memory: &mut Vec<Block>, hash: &str, password: &str) -> bool {
    // A stored hash this server cannot read would look like a wrong password: say so.
    let unreadable = |why: &str| {
        tracing::warn!("a stored password hash cannot be checked: {why}");
        false
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return unreadable("it is not a PHC string");
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return unreadable("it has no salt or no hash");
    };
    let (Ok(algorithm), Ok(params)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
    ) else {
        return unreadable("its algorithm or parameters are unknown");
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return unreadable("its argon2 version is unknown"),
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return unreadable("its salt is not base64");
    };
    let argon2 = Argon2::new(algorithm, version, params);
    let blocks = argon2.params().block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut computed = [0u8; Output::MAX_LENGTH];
    let computed = &mut computed[..expected.len()];
    argon2
        .hash_password_into_with_memory(password.as_bytes(), salt, computed, &mut memory[..blocks])
        .is_ok()
        // Output compares in constant time.
        && Output::new(computed).is_ok_and(|computed| computed == expected)
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
    /// Credentials (user name and password, hashed with `hasher`) that proved a user
    /// within [`VOUCH_FOR`]. They grant nothing by themselves: they are checked like any
    /// others, but are not made to wait for someone else's wrong passwords.
    vouched: Mutex<HashMap<u64, Instant>>,
    /// The hash a password for an unknown user is checked against, so that a wrong
    /// password costs the same whether the user exists or not.
    decoy: String,
    /// Permits to run a check: the first lane for any credentials, the second for
    /// vouched ones, so a flood of guesses cannot keep a known client waiting.
    lanes: [Arc<Semaphore>; 2],
    /// argon2 working memory, one per check running, kept for the next check: at most
    /// as many as both lanes have permits.
    memory: Mutex<Vec<Vec<Block>>>,
    failures: Mutex<Failures>,
    limits: LoginLimits,
}

impl Authenticator {
    pub fn new(store: Arc<Store>, limits: LoginLimits) -> Result<Authenticator, AuthError> {
        let checks = limits.checks.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Authenticator {
            store,
            hasher: RandomState::new(),
            verified: Mutex::new(HashMap::new()),
            vouched: Mutex::new(HashMap::new()),
            decoy: hash_password(&generate_password())?,
            lanes: [
                Arc::new(Semaphore::new(checks)),
                Arc::new(Semaphore::new(checks)),
            ],
            memory: Mutex::new(Vec::new()),
            failures: Mutex::new(Failures::new(&limits)),
            limits,
        })
    }

    /// The user a recently verified header proves, without hashing: cheap enough to
    /// call on the async runtime, and never limited.
    pub fn remembered(&self, header: &str) -> Option<Arc<User>> {
        let key = self.hasher.hash_one(header);
        match lock(&self.verified).get(&key) {
            Some((user, at)) if at.elapsed() < CACHE_FOR => Some(user.clone()),
            _ => None,
        }
    }

    /// The user an `Authorization` header from `client` proves, or why it proves
    /// nobody. A header not remembered is checked on the blocking pool once a permit is
    /// free, unless its address or user name must first wait for earlier failures.
    pub async fn authenticate(
        self: &Arc<Self>,
        header: &str,
        client: Option<IpAddr>,
    ) -> Result<Arc<User>, AuthError> {
        if let Some(user) = self.remembered(header) {
            return Ok(user);
        }
        let (name, password) = parse_basic(header).ok_or(AuthError::Invalid)?;
        let credentials = self.hasher.hash_one(("credentials", &name, &password));
        let vouched = self.vouched(credentials);
        if !vouched {
            self.may_try(client, &name)?;
        }
        let lane = self.lanes[usize::from(vouched)].clone();
        let permit = tokio::time::timeout(self.limits.check_wait, lane.acquire_owned())
            .await
            .map_err(|_| AuthError::Busy)?
            .map_err(|_| AuthError::Busy)?;
        // Those ahead in the queue may have failed meanwhile.
        if !vouched {
            self.may_try(client, &name)?;
        }
        // The permit and the count of failures go with the check, not with this
        // future: a client that hangs up drops the future, but its check runs on to the
        // end, and is counted, so hanging up neither escapes the bound nor the waits.
        let this = self.clone();
        let checked = tokio::task::spawn_blocking(move || {
            crate::metrics::add("conductor_login_checks_running", &[], 1.0);
            let checked = this.check_password(&name, &password);
            crate::metrics::add("conductor_login_checks_running", &[], -1.0);
            match &checked {
                Ok(Some(_)) => lock(&this.failures).succeeded(client),
                Ok(None) => {
                    lock(&this.failures).failed(client, &name, Instant::now());
                    // For operators (a guessing campaign shows), and for the tests,
                    // which wait for checks whose clients hung up.
                    crate::metrics::inc("conductor_login_failures_total", &[]);
                }
                Err(_) => {}
            }
            drop(permit);
            checked
        })
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))??;
        let Some(user) = checked else {
            return Err(AuthError::Invalid);
        };
        self.vouch(credentials);
        let user = Arc::new(user);
        let mut cache = lock(&self.verified);
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(self.hasher.hash_one(header), (user.clone(), Instant::now()));
        Ok(user)
    }

    /// Forgets remembered logins, after a user was changed or disabled, so the change
    /// takes effect at the next request.
    pub fn forget(&self) {
        lock(&self.verified).clear();
    }

    /// Whether the failure limits let a login from `client` as `name` be checked now.
    fn may_try(&self, client: Option<IpAddr>, name: &str) -> Result<(), AuthError> {
        lock(&self.failures)
            .check(client, name, Instant::now())
            .map_err(|(culprit, retry_after)| AuthError::Throttled {
                culprit,
                retry_after,
            })
    }

    /// The user these credentials prove, if any. An unknown user's password is checked
    /// against the decoy, and a disabled user's is checked too, so that neither answers
    /// sooner than a wrong password for an active user.
    fn check_password(&self, name: &str, password: &str) -> Result<Option<User>, AuthError> {
        let user = self.store.user(name)?;
        let hash = user
            .as_ref()
            .map_or(self.decoy.as_str(), |user| user.password_hash.as_str());
        let mut memory = lock(&self.memory).pop().unwrap_or_default();
        let matches = verify_password(&mut memory, hash, password);
        lock(&self.memory).push(memory);
        Ok(user.filter(|user| matches && !user.disabled))
    }

    fn vouched(&self, credentials: u64) -> bool {
        lock(&self.vouched)
            .get(&credentials)
            .is_some_and(|at| at.elapsed() < VOUCH_FOR)
    }

    fn vouch(&self, credentials: u64) {
        let mut vouched = lock(&self.vouched);
        if vouched.len() >= CACHE_MAX && !vouched.contains_key(&credentials) {
            vouched.retain(|_, at| at.elapsed() < VOUCH_FOR);
            if vouched.len() >= CACHE_MAX {
                // Only good credentials get here; this many means many users, who
                // are then limited like anyone else.
                return;
            }
        }
        vouched.insert(credentials, Instant::now());
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
        let mut memory = Vec::new();
        assert!(verify_password(&mut memory, &hash, "secret"));
        assert!(!verify_password(&mut memory, &hash, "Secret"));
        assert!(!verify_password(&mut memory, "not a hash", "secret"));
        assert!(!hash.contains("secret"));
        Ok(())
    }
}
