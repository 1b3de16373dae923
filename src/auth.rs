//! Who a client is: password hashing and the check made at every MQTT CONNECT.
//!
//! Passwords and codes are stored as argon2id PHC strings and verified off the runtime (argon2 is
//! deliberately slow). Credentials are read from the database at every connect, so users added or
//! removed with the CLI while the hub runs take effect at the next connect. This module must not
//! log a password, a code or a hash.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use std::collections::HashMap;

use crate::config::DeviceKind;
use crate::secret::Secret;
use crate::store::{devices, users, users::Role, Store, StoreError};

/// Hashes a password or alarm code into a PHC string.
pub fn hash(secret: &Secret) -> String {
    let salt = SaltString::generate(&mut OsRng);
    match Argon2::default().hash_password(secret.expose().as_bytes(), &salt) {
        Ok(hash) => hash.to_string(),
        // Only reachable with invalid parameters, and ours are the library's defaults.
        Err(e) => unreachable!("argon2 with default parameters failed: {e}"),
    }
}

/// A fresh random password for a device: 128 bits from the OS, as 32 hex digits (easy to paste
/// into an Arduino sketch).
pub fn random_secret() -> Secret {
    use argon2::password_hash::rand_core::RngCore;
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
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
    /// A declared device; its id is its client id and username.
    Device { id: String, kind: DeviceKind },
}

impl Identity {
    /// The name used in logs.
    pub fn name(&self) -> &str {
        match self {
            Identity::User { name, .. } => name,
            Identity::Device { id, .. } => id,
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
    /// A device without the client certificate `require_client_cert` asks for (CONNACK 5).
    #[error("a hub-signed client certificate is required")]
    CertificateRequired,
    /// A client certificate whose CN is not a declared device (CONNACK 5).
    #[error("client certificate for {0:?}, which is not a declared device")]
    UnknownCertificate(String),
    /// The hub cannot check credentials right now (CONNACK 3).
    #[error("credentials could not be checked: {0}")]
    Unavailable(String),
}

/// What a client presented at CONNECT.
#[derive(Debug, Default)]
pub struct Presented {
    /// The client id it asked for.
    pub client_id: String,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
    /// CN of the client certificate the TLS layer verified against the hub CA, if any.
    pub cert_cn: Option<String>,
}

/// Checks the credentials of a connecting client against the config and the database.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// Where users and device passwords live.
    store: Store,
    /// Declared devices and their kinds.
    devices: HashMap<String, DeviceKind>,
    /// Devices must authenticate with a client certificate.
    require_client_cert: bool,
    /// A valid hash to verify against when the name is unknown, so that a wrong name takes as
    /// long to refuse as a wrong password and names cannot be probed by timing.
    dummy_hash: String,
}

impl Authenticator {
    /// An authenticator for the declared `devices`, reading secrets from `store`.
    pub fn new(store: Store, devices: HashMap<String, DeviceKind>, require_client_cert: bool) -> Authenticator {
        Authenticator { store, devices, require_client_cert, dummy_hash: hash(&Secret::new("not a real password")) }
    }

    /// Decides who a connecting client is, or why it is refused.
    pub async fn check(&self, p: Presented) -> Result<Identity, Refusal> {
        // A certificate signed by the hub CA (checked in the TLS handshake) names a device.
        if let Some(cn) = &p.cert_cn {
            let Some(kind) = self.devices.get(cn) else {
                return Err(Refusal::UnknownCertificate(cn.clone()));
            };
            if p.client_id != *cn || p.username.as_ref().is_some_and(|u| u != cn) {
                return Err(Refusal::ClientId(format!("a device's client id and username must be its id {cn:?}")));
            }
            return Ok(Identity::Device { id: cn.clone(), kind: *kind });
        }
        let (Some(name), Some(password)) = (p.username, p.password) else {
            return Err(Refusal::Anonymous);
        };
        if let Some(kind) = self.devices.get(&name).copied() {
            if self.require_client_cert {
                return Err(Refusal::CertificateRequired);
            }
            let id = name.clone();
            let stored = self.lookup(move |c| devices::password_hash(c, &id)).await?;
            self.verify(stored, password).await?;
            if p.client_id != name {
                return Err(Refusal::ClientId(format!("a device's client id must be its id {name:?}")));
            }
            return Ok(Identity::Device { id: name, kind });
        }
        let lookup = name.clone();
        let creds = self.lookup(move |c| users::credentials(c, &lookup)).await?;
        let role = creds.as_ref().map(|c| c.role);
        self.verify(creds.map(|c| c.password_hash), password).await?;
        match role {
            Some(role) if !self.devices.contains_key(&p.client_id) => Ok(Identity::User { name, role }),
            Some(_) => Err(Refusal::ClientId(format!("{:?} is a device's id; users may not take it", p.client_id))),
            None => Err(Refusal::BadCredentials),
        }
    }

    async fn lookup<R, F>(&self, f: F) -> Result<Option<R>, Refusal>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<Option<R>, StoreError> + Send + 'static,
    {
        self.store.call(move |c| f(c)).await.map_err(|e| Refusal::Unavailable(e.to_string()))
    }

    /// Verifies `password` against `stored` (or the dummy hash when there is none) off the runtime.
    async fn verify(&self, stored: Option<String>, password: Secret) -> Result<(), Refusal> {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        if ok && known {
            Ok(())
        } else {
            Err(Refusal::BadCredentials)
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
