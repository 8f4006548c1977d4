//! Certificates: a CA and an ECDSA P-256 serving certificate (rcgen), for
//! the laptop development certificate and for `canary-injector certs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or a key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A CA and a serving certificate signed by it, all PEM.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// CA certificate (what clients trust; the webhook's `caBundle`).
    pub ca_cert_pem: String,
    /// CA private key (needed only to issue again).
    pub ca_key_pem: String,
    /// Serving certificate.
    pub cert_pem: String,
    /// Serving private key.
    pub key_pem: String,
}

/// The CA part of a bundle, to sign new serving certificates with.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new self-signed CA valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded from PEM (to renew a serving certificate with the same CA).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// Issues a serving certificate for `sans` (DNS names or IP addresses).
    pub fn issue(&self, sans: &[String], validity: Duration) -> Result<Bundle, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        if let Some(first) = sans.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Bundle {
            ca_cert_pem: self.cert_pem.clone(),
            ca_key_pem: self.key_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    // Tolerate clock skew between the issuer and the apiserver.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
}

/// Paths of the development certificate files.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// CA certificate to pass to `curl --cacert`.
    pub ca: PathBuf,
    /// Serving certificate.
    pub cert: PathBuf,
    /// Serving key.
    pub key: PathBuf,
    /// True when this call created them.
    pub created: bool,
}

/// Validity of development certificates.
const DEV_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reuses the development certificate in `dir` if it is complete and valid
/// for at least another day, else creates a CA and a certificate for
/// `localhost` / `127.0.0.1` / `::1` there (keys mode 0600).
pub fn ensure_dev_cert(dir: &Path) -> Result<DevCert, CertError> {
    let paths = DevCert {
        ca: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        created: false,
    };
    if dev_cert_usable(&paths) {
        return Ok(paths);
    }
    let ca = Ca::generate("canary-injector development CA", DEV_VALIDITY)?;
    let sans = ["localhost", "127.0.0.1", "::1"].map(String::from);
    let bundle = ca.issue(&sans, DEV_VALIDITY)?;
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_file(&paths.ca, &bundle.ca_cert_pem, false)?;
    write_file(&dir.join("ca.key"), &bundle.ca_key_pem, true)?;
    write_file(&paths.cert, &bundle.cert_pem, false)?;
    write_file(&paths.key, &bundle.key_pem, true)?;
    Ok(DevCert {
        created: true,
        ..paths
    })
}

fn dev_cert_usable(paths: &DevCert) -> bool {
    let Ok(pem) = std::fs::read(&paths.cert) else {
        return false;
    };
    if !paths.key.exists() || !paths.ca.exists() {
        return false;
    }
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(&pem).next() else {
        return false;
    };
    let day = 24 * 3600;
    crate::server::tls::leaf_not_after(&der)
        .is_some_and(|t| t > OffsetDateTime::now_utc().unix_timestamp() + day)
}

/// Writes `contents` to `path`; private files get mode 0600 on Unix.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_cert(dir.path()).unwrap();
        assert!(first.created);
        let cert = std::fs::read(&first.cert).unwrap();
        let second = ensure_dev_cert(dir.path()).unwrap();
        assert!(!second.created);
        assert_eq!(std::fs::read(&second.cert).unwrap(), cert);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&first.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn incomplete_dev_cert_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_cert(dir.path()).unwrap();
        std::fs::write(&first.cert, "garbage").unwrap();
        assert!(ensure_dev_cert(dir.path()).unwrap().created);
    }

    #[test]
    fn issued_certificate_is_signed_by_the_ca_and_renewable() {
        let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
        let b = ca
            .issue(&["svc.ns.svc".into()], Duration::from_secs(60))
            .unwrap();
        let again = Ca::from_pem(&b.ca_cert_pem, &b.ca_key_pem).unwrap();
        let b2 = again
            .issue(&["svc.ns.svc".into()], Duration::from_secs(60))
            .unwrap();
        assert_eq!(b.ca_cert_pem, b2.ca_cert_pem);
        assert_ne!(b.cert_pem, b2.cert_pem);
    }
}
