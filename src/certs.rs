//! The hub's own PKI: a CA made on first start, the server certificate it signs, device certificates.
//!
//! Everything lives under `DATA_DIR/certs/`. Keys are written 0600 through a temporary file and a
//! rename, so a crash never leaves half a key. The server certificate is re-issued from the same CA
//! whenever the names it must carry change, so devices that trust the CA keep working.
//! This module must not log key material, and it never reads the network.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use sha2::Digest as _;
use time::{Duration, OffsetDateTime};

use crate::config::ServerName;

/// Validity of the CA and of the certificates it signs. Devices such as the ESP8266 often have no
/// clock to check expiry against, and a hub may run for years untouched: a short life would only
/// break houses. The CA never leaves the Pi.
const VALIDITY_DAYS: i64 = 3650;

/// Why the PKI could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read, written or created.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A key file can be read by other users; the hub refuses to use it.
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// A certificate or key file is not what the hub wrote.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// Generating or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_owned(), source }
}

/// Paths of the hub's PKI files under a data dir.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// `certs/`
    pub dir: PathBuf,
    /// `certs/ca.pem`: give this to devices.
    pub ca_cert: PathBuf,
    /// `certs/ca.key`: never leaves the Pi.
    pub ca_key: PathBuf,
    /// `certs/server.pem`
    pub server_cert: PathBuf,
    /// `certs/server.key`
    pub server_key: PathBuf,
    /// `certs/devices/`
    pub devices: PathBuf,
}

impl CertPaths {
    /// The PKI paths under `data_dir`.
    pub fn new(data_dir: &Path) -> CertPaths {
        let dir = data_dir.join("certs");
        CertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            devices: dir.join("devices"),
            dir,
        }
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnsureOutcome {
    /// A new CA was created (first start).
    pub created_ca: bool,
    /// The server certificate was (re-)issued.
    pub issued_server: bool,
}

/// The names the server certificate must carry: the configured names, the TLS listen IP when it
/// is a specific address, `localhost` and `127.0.0.1`.
pub fn wanted_names(server_names: &[ServerName], tls_listen: SocketAddr) -> BTreeSet<ServerName> {
    let mut names: BTreeSet<ServerName> = server_names.iter().cloned().collect();
    names.insert(ServerName::Dns("localhost".to_owned()));
    names.insert(ServerName::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    if !tls_listen.ip().is_unspecified() {
        names.insert(ServerName::Ip(tls_listen.ip()));
    }
    names
}

/// Makes sure the CA and a server certificate for `names` exist, creating or re-issuing as needed.
pub fn ensure(paths: &CertPaths, names: &BTreeSet<ServerName>) -> Result<EnsureOutcome, CertError> {
    create_private_dir(&paths.dir)?;
    let mut outcome = EnsureOutcome { created_ca: false, issued_server: false };
    if !paths.ca_cert.exists() || !paths.ca_key.exists() {
        create_ca(paths)?;
        outcome.created_ca = true;
    }
    check_key_mode(&paths.ca_key)?;
    let current = if outcome.created_ca || !paths.server_cert.exists() || !paths.server_key.exists() {
        None
    } else {
        check_key_mode(&paths.server_key)?;
        Some(read_info(&paths.server_cert)?)
    };
    let up_to_date = current.is_some_and(|info| &info.names == names && info.issuer_matches_ca(paths));
    if !up_to_date {
        issue_server(paths, names)?;
        outcome.issued_server = true;
    }
    Ok(outcome)
}

/// Creates a directory (and parents) and makes it 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Refuses a key file that group or others can read.
pub fn check_key_mode(path: &Path) -> Result<(), CertError> {
    let mode = fs::metadata(path).map_err(io_err(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyPermissions { path: path.to_owned(), mode });
    }
    Ok(())
}

/// Writes `contents` to `path` atomically with the given mode.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let mut file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(VALIDITY_DAYS);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DomoticPi");
    dn.push(DnType::CommonName, "DomoticPi hub CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn create_ca(paths: &CertPaths) -> Result<(), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params();
    validity(&mut params);
    let cert = params.self_signed(&key)?;
    write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)?;
    // A new CA invalidates every certificate signed by an old one.
    for stale in [&paths.server_cert, &paths.server_key] {
        let _ = fs::remove_file(stale);
    }
    Ok(())
}

fn load_issuer(paths: &CertPaths) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key_pem = fs::read_to_string(&paths.ca_key).map_err(io_err(&paths.ca_key))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| CertError::Invalid { path: paths.ca_key.clone(), reason: e.to_string() })?;
    let ca_pem = fs::read_to_string(&paths.ca_cert).map_err(io_err(&paths.ca_cert))?;
    Issuer::from_ca_cert_pem(&ca_pem, key)
        .map_err(|e| CertError::Invalid { path: paths.ca_cert.clone(), reason: e.to_string() })
}

fn issue_server(paths: &CertPaths, names: &BTreeSet<ServerName>) -> Result<(), CertError> {
    let issuer = load_issuer(paths)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DomoticPi");
    dn.push(DnType::CommonName, "DomoticPi hub");
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n {
            ServerName::Dns(d) => d.clone().try_into().map(SanType::DnsName),
            ServerName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&paths.server_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.server_cert, cert.pem().as_bytes(), 0o644)
}

/// Issues a client certificate whose CN is `device_id`, signed by the hub CA.
/// Returns the paths of the certificate and of its key.
pub fn issue_device(paths: &CertPaths, device_id: &str) -> Result<(PathBuf, PathBuf), CertError> {
    create_private_dir(&paths.devices)?;
    let issuer = load_issuer(paths)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DomoticPi");
    dn.push(DnType::CommonName, device_id);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = paths.devices.join(format!("{device_id}.pem"));
    let key_path = paths.devices.join(format!("{device_id}.key"));
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The bridge's certificate signing request (`domoticpi bridge request`): CN = `house_id`, for the
/// company's CA to sign. The key at `key_path` is made (mode 0600, its directory created) unless it
/// exists, in which case the request is for that same key: a new request never strands a
/// certificate the company already signed. Returns the request, PEM.
pub fn bridge_request(key_path: &Path, house_id: &str) -> Result<String, CertError> {
    let key = match fs::read_to_string(key_path) {
        Ok(pem) => {
            check_key_mode(key_path)?;
            KeyPair::from_pem(&pem)
                .map_err(|e| CertError::Invalid { path: key_path.to_owned(), reason: e.to_string() })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
            key
        }
        Err(e) => return Err(CertError::Io { path: key_path.to_owned(), source: e }),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DomoticPi hub");
    dn.push(DnType::CommonName, house_id);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params.serialize_request(&key)?.pem()?)
}

/// What `certs show` prints about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Subject alternative names.
    pub names: BTreeSet<ServerName>,
    /// Issuer distinguished name, as text.
    pub issuer: String,
    /// Subject distinguished name, as text.
    pub subject: String,
    /// Last day of validity.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, colon-separated hex.
    pub sha256: String,
    /// SHA-1 of the DER certificate, for ESP8266 BearSSL `setFingerprint`.
    pub sha1: String,
}

impl CertInfo {
    fn issuer_matches_ca(&self, paths: &CertPaths) -> bool {
        read_info(&paths.ca_cert).is_ok_and(|ca| ca.subject == self.issuer)
    }
}

/// Parses the first certificate of a PEM file.
pub fn read_info(path: &Path) -> Result<CertInfo, CertError> {
    let der = read_der(path)?;
    let invalid = |reason: String| CertError::Invalid { path: path.to_owned(), reason };
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(e.to_string()))?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.insert(ServerName::Dns((*d).to_owned()));
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(ServerName::Ip));
                }
                _ => {}
            }
        }
    }
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| invalid(e.to_string()))?;
    Ok(CertInfo {
        names,
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
        not_after,
        sha256: fingerprint(&sha2::Sha256::digest(&der)),
        sha1: fingerprint(&sha1::Sha1::digest(&der)),
    })
}

/// The DER bytes of the first certificate in a PEM file.
pub fn read_der(path: &Path) -> Result<Vec<u8>, CertError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next().and_then(Result::ok).map(|der| der.to_vec());
    first.ok_or_else(|| CertError::Invalid { path: path.to_owned(), reason: "no certificate in file".to_owned() })
}

/// SHA-256 of a DER certificate, colon-separated hex (as `certs show` prints it).
pub fn sha256_of(der: &[u8]) -> String {
    fingerprint(&sha2::Sha256::digest(der))
}

fn fingerprint(digest: &[u8]) -> String {
    let mut out = String::with_capacity(digest.len() * 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_creates_ca_and_server_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        let names = wanted_names(&[ServerName::Dns("domoticpi.local".into())], "127.0.0.1:8883".parse().unwrap());
        let outcome = ensure(&paths, &names).unwrap();
        assert_eq!(outcome, EnsureOutcome { created_ca: true, issued_server: true });
        for key in [&paths.ca_key, &paths.server_key] {
            assert_eq!(fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(fs::metadata(&paths.dir).unwrap().permissions().mode() & 0o777, 0o700);
        let info = read_info(&paths.server_cert).unwrap();
        assert_eq!(info.names, names);
        assert_eq!(info.sha1.len(), 20 * 3 - 1);
        // Nothing to do the second time.
        assert_eq!(ensure(&paths, &names).unwrap(), EnsureOutcome { created_ca: false, issued_server: false });
    }

    #[test]
    fn new_names_reissue_the_server_certificate_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        let listen = "0.0.0.0:8883".parse().unwrap();
        ensure(&paths, &wanted_names(&[], listen)).unwrap();
        let ca = fs::read(&paths.ca_cert).unwrap();
        let names = wanted_names(&[ServerName::Ip("172.19.0.3".parse().unwrap())], listen);
        assert_eq!(ensure(&paths, &names).unwrap(), EnsureOutcome { created_ca: false, issued_server: true });
        assert_eq!(fs::read(&paths.ca_cert).unwrap(), ca);
        assert_eq!(read_info(&paths.server_cert).unwrap().names, names);
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path());
        let names = wanted_names(&[], "0.0.0.0:8883".parse().unwrap());
        ensure(&paths, &names).unwrap();
        fs::set_permissions(&paths.server_key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(ensure(&paths, &names), Err(CertError::KeyPermissions { .. })));
    }
}
