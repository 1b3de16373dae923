//! Who a client is: password hashing and the check made at every MQTT CONNECT.
//!
//! Passwords and codes are stored as argon2id PHC strings and verified off the runtime (argon2 is
//! deliberately slow). Credentials are read from the database at every connect, so users added or
//! removed with the CLI while the hub runs take effect at the next connect. This module must not
//! log a password, a code or a hash.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::secret::Secret;
use crate::store::{users, users::Role, Store, StoreError};

/// Hashes a password or alarm code into a PHC string.
pub fn hash(secret: &Secret) -> String {
    let salt = SaltString::generate(&mut OsRng);
    match Argon2::default().hash_password(secret.expose().as_bytes(), &salt) {
        Ok(hash) => hash.to_string(),
        // Only reachable with invalid parameters, and ours are the library's defaults.
        Err(e) => unreachable!("argon2 with default parameters failed: {e}"),
    }
}

/// Whether `secret` matches the PHC string `hash`; a malformed hash never matches.
pub fn verify(hash: &str, secret: &Secret) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|parsed| Argon2::default().verify_password(secret.expose().as_bytes(), &parsed).is_ok())
}

/// Who an authenticated client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A person, with a role.
    User { name: String, role: Role },
}

impl Identity {
    /// The name used in logs.
    pub fn name(&self) -> &str {
        match self {
            Identity::User { name, .. } => name,
        }
    }
}

/// Why a CONNECT was refused; each maps to an MQTT 3.1.1 CONNACK return code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No username or password was given (CONNACK 5).
    #[error("no credentials (anonymous clients are not allowed)")]
    Anonymous,
    /// Unknown name or wrong password (CONNACK 4).
    #[error("bad username or password")]
    BadCredentials,
    /// The client id is not acceptable for this identity (CONNACK 2).
    #[error("client id not allowed: {0}")]
    ClientId(String),
    /// The hub cannot check credentials right now (CONNACK 3).
    #[error("credentials could not be checked: {0}")]
    Unavailable(String),
}

/// Checks the credentials of a connecting client against the database.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// Where users live.
    store: Store,
    /// A valid hash to verify against when the user does not exist, so that a wrong name takes as
    /// long to refuse as a wrong password and names cannot be probed by timing.
    dummy_hash: String,
}

impl Authenticator {
    /// An authenticator reading from `store`.
    pub fn new(store: Store) -> Authenticator {
        Authenticator { store, dummy_hash: hash(&Secret::new("not a real password")) }
    }

    /// Authenticates a username and password.
    pub async fn check(&self, username: Option<String>, password: Option<Secret>) -> Result<Identity, Refusal> {
        let (Some(name), Some(password)) = (username, password) else {
            return Err(Refusal::Anonymous);
        };
        let lookup = name.clone();
        let creds = self
            .store
            .call(move |conn| users::credentials(conn, &lookup))
            .await
            .map_err(|e: StoreError| Refusal::Unavailable(e.to_string()))?;
        let hash = creds.as_ref().map_or_else(|| self.dummy_hash.clone(), |c| c.password_hash.clone());
        let ok = tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        match creds {
            Some(c) if ok => Ok(Identity::User { name, role: c.role }),
            _ => Err(Refusal::BadCredentials),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash(&Secret::new("correct horse"));
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, &Secret::new("correct horse")));
        assert!(!verify(&h, &Secret::new("wrong")));
        assert!(!verify("not a hash", &Secret::new("correct horse")));
    }
}
