//! A CA and the serving certificates it issues (rcgen, ECDSA P-256), from
//! and to PEM. No file or network I/O: the callers ([`super::write_out_dir`],
//! [`super::cluster`], [`super::plan`]) decide where the PEM comes from and
//! goes; key generation uses the system's randomness and [`Ca::generate`] /
//! [`Ca::issue`] read the clock (the `_at` variants take it).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

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
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, rcgen::Error> {
        Self::generate_at(common_name, validity, OffsetDateTime::now_utc())
    }

    /// [`Ca::generate`] as if the time were `now` (tests of time-dependent
    /// decisions).
    pub(crate) fn generate_at(
        common_name: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<Self, rcgen::Error> {
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
        set_validity(&mut params, validity, now);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded from PEM (to renew a serving certificate with the same CA).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a serving certificate for `sans` (DNS names or IP addresses).
    pub fn issue(&self, sans: &[String], validity: Duration) -> Result<Bundle, rcgen::Error> {
        self.issue_at(sans, validity, OffsetDateTime::now_utc())
    }

    /// [`Ca::issue`] as if the time were `now`.
    pub(crate) fn issue_at(
        &self,
        sans: &[String],
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<Bundle, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        if let Some(first) = sans.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity, now);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Bundle {
            ca_cert_pem: self.cert_pem.clone(),
            ca_key_pem: self.key_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// How far back a certificate's notBefore is set, to tolerate clock skew
/// between the issuer and the apiserver. The issue time is notBefore plus
/// this.
pub(crate) const BACKDATE: time::Duration = time::Duration::minutes(5);

fn set_validity(params: &mut CertificateParams, validity: Duration, now: OffsetDateTime) {
    params.not_before = now - BACKDATE;
    // X.509 times end in 9999 (9999-12-31T23:59:59Z below), and
    // `now + validity` would panic past the range of `OffsetDateTime`.
    let last = OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap_or(now);
    params.not_after = time::Duration::try_from(validity)
        .ok()
        .and_then(|v| now.checked_add(v))
        .map_or(last, |t| t.min(last));
}
