//! The pure part of `canary-injector certs`: given what a TLS Secret (or a
//! directory) holds, decide whether to keep it, renew the serving
//! certificate with the same CA, or start over with a new CA. No I/O; the
//! clock is a parameter.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use rcgen::KeyPair;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use super::Ca;

/// Secret key (and file name) of the serving certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Secret key (and file name) of the serving private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret key (and file name) of the CA certificate.
pub const CA_CRT: &str = "ca.crt";
/// Secret key (and file name) of the CA private key.
pub const CA_KEY: &str = "ca.key";

/// The four entries of a TLS Secret written by `canary-injector certs`, as
/// raw bytes (PEM when written by us). `None` when the key is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    /// `tls.crt`: the serving certificate.
    pub tls_crt: Option<Vec<u8>>,
    /// `tls.key`: the serving private key.
    pub tls_key: Option<Vec<u8>>,
    /// `ca.crt`: the CA certificate (the webhook's `caBundle`).
    pub ca_crt: Option<Vec<u8>>,
    /// `ca.key`: the CA private key.
    pub ca_key: Option<Vec<u8>>,
}

/// What to do with the Secret, from [`plan_secret`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretAction {
    /// There is no Secret: create a CA and a serving certificate.
    Create,
    /// Everything is valid for longer than the renewal window: leave it.
    Keep,
    /// Issue a new serving certificate and write the Secret again.
    Renew {
        /// Sign with the CA already in the Secret (so `caBundle` does not
        /// change); `false` means a new CA is needed too.
        keep_ca: bool,
        /// Why: for the log line.
        reason: RenewReason,
    },
}

/// Why a stored certificate cannot stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewReason {
    /// An entry (`tls.crt`, `ca.key`, ...) is missing.
    Missing(&'static str),
    /// An entry is not a readable PEM certificate or key.
    Unreadable(&'static str),
    /// A private key does not belong to its certificate (`tls.key`/`ca.key`).
    KeyMismatch(&'static str),
    /// `ca.crt` is not a CA certificate (basicConstraints CA:FALSE).
    NotCa,
    /// A certificate (`tls.crt` or `ca.crt`) expires within the renewal
    /// window, or has expired.
    Expiring(&'static str),
    /// The serving certificate's DNS names differ from the wanted ones.
    SansMismatch {
        /// The DNS names the certificate has.
        found: Vec<String>,
    },
    /// The serving certificate was not signed by `ca.crt`.
    NotSignedByCa,
}

impl fmt::Display for RenewReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(key) => write!(f, "{key} is missing"),
            Self::Unreadable(key) => write!(f, "{key} is not valid PEM"),
            Self::KeyMismatch(key) => write!(f, "{key} does not match its certificate"),
            Self::NotCa => write!(f, "{CA_CRT} is not a CA certificate"),
            Self::Expiring(key) => write!(f, "{key} expires within the renewal window"),
            Self::SansMismatch { found } => {
                write!(f, "{TLS_CRT} is for other DNS names ({})", found.join(", "))
            }
            Self::NotSignedByCa => write!(f, "{TLS_CRT} is not signed by {CA_CRT}"),
        }
    }
}

/// Decides what to do with a Secret holding `existing` (`None`: no Secret).
///
/// - no Secret → [`SecretAction::Create`];
/// - the CA is usable (readable, a CA, key matches, valid for longer than
///   `renew_before`) and so is the serving certificate (readable, key
///   matches, signed by the CA, DNS names equal to `sans`, valid for longer
///   than `renew_before`) → [`SecretAction::Keep`];
/// - the CA is usable but the serving certificate is not →
///   `Renew { keep_ca: true }`;
/// - the CA is not usable → `Renew { keep_ca: false }`. An expiring CA
///   counts as unusable: a serving certificate cannot outlive its CA.
pub fn plan_secret(
    existing: Option<&SecretData>,
    now: OffsetDateTime,
    sans: &[String],
    renew_before: Duration,
) -> SecretAction {
    let Some(data) = existing else {
        return SecretAction::Create;
    };
    if let Err(reason) = check_ca(
        data.ca_crt.as_deref(),
        data.ca_key.as_deref(),
        now,
        renew_before,
    ) {
        return SecretAction::Renew {
            keep_ca: false,
            reason,
        };
    }
    match check_serving(data, now, sans, renew_before) {
        Ok(()) => SecretAction::Keep,
        Err(reason) => SecretAction::Renew {
            keep_ca: true,
            reason,
        },
    }
}

/// Checks that `cert`/`key` (PEM) are a CA certificate and its key, valid
/// for longer than `renew_before` after `now`.
pub fn check_ca(
    cert: Option<&[u8]>,
    key: Option<&[u8]>,
    now: OffsetDateTime,
    renew_before: Duration,
) -> Result<(), RenewReason> {
    let cert_pem = first_pem(cert, CA_CRT)?;
    let ca = parse_cert(&cert_pem, CA_CRT)?;
    let key = parse_key(key, CA_KEY)?;
    if !ca.is_ca() {
        return Err(RenewReason::NotCa);
    }
    if key.public_key_raw() != ca.public_key().subject_public_key.data.as_ref() {
        return Err(RenewReason::KeyMismatch(CA_KEY));
    }
    check_expiry(&ca, now, renew_before, CA_CRT)
}

/// Loads a CA that [`check_ca`] accepted, to sign with it.
pub(crate) fn load_ca(cert: &[u8], key: &[u8]) -> Result<Ca, RenewReason> {
    let cert = std::str::from_utf8(cert).map_err(|_| RenewReason::Unreadable(CA_CRT))?;
    let key = std::str::from_utf8(key).map_err(|_| RenewReason::Unreadable(CA_KEY))?;
    Ca::from_pem(cert, key).map_err(|_| RenewReason::Unreadable(CA_CRT))
}

fn check_serving(
    data: &SecretData,
    now: OffsetDateTime,
    sans: &[String],
    renew_before: Duration,
) -> Result<(), RenewReason> {
    let ca_pem = first_pem(data.ca_crt.as_deref(), CA_CRT)?;
    let ca = parse_cert(&ca_pem, CA_CRT)?;
    let leaf_pem = first_pem(data.tls_crt.as_deref(), TLS_CRT)?;
    let leaf = parse_cert(&leaf_pem, TLS_CRT)?;
    let key = parse_key(data.tls_key.as_deref(), TLS_KEY)?;
    if key.public_key_raw() != leaf.public_key().subject_public_key.data.as_ref() {
        return Err(RenewReason::KeyMismatch(TLS_KEY));
    }
    if leaf.verify_signature(Some(ca.public_key())).is_err() {
        return Err(RenewReason::NotSignedByCa);
    }
    let found = dns_names(&leaf);
    let wanted: BTreeSet<String> = sans.iter().map(|s| s.to_ascii_lowercase()).collect();
    if found != wanted {
        return Err(RenewReason::SansMismatch {
            found: found.into_iter().collect(),
        });
    }
    check_expiry(&leaf, now, renew_before, TLS_CRT)
}

/// The lower-cased DNS names of a certificate's SubjectAlternativeName.
fn dns_names(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return BTreeSet::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn check_expiry(
    cert: &X509Certificate<'_>,
    now: OffsetDateTime,
    renew_before: Duration,
    key: &'static str,
) -> Result<(), RenewReason> {
    let not_after = i128::from(cert.validity().not_after.timestamp());
    let deadline = i128::from(now.unix_timestamp()) + i128::from(renew_before.as_secs());
    if not_after > deadline {
        Ok(())
    } else {
        Err(RenewReason::Expiring(key))
    }
}

/// The first PEM block of `bytes`, which must be a certificate.
fn first_pem(bytes: Option<&[u8]>, key: &'static str) -> Result<Pem, RenewReason> {
    let bytes = bytes.ok_or(RenewReason::Missing(key))?;
    match Pem::iter_from_buffer(bytes).next() {
        Some(Ok(pem)) if pem.label == "CERTIFICATE" => Ok(pem),
        _ => Err(RenewReason::Unreadable(key)),
    }
}

fn parse_cert<'a>(pem: &'a Pem, key: &'static str) -> Result<X509Certificate<'a>, RenewReason> {
    pem.parse_x509().map_err(|_| RenewReason::Unreadable(key))
}

fn parse_key(bytes: Option<&[u8]>, key: &'static str) -> Result<KeyPair, RenewReason> {
    let bytes = bytes.ok_or(RenewReason::Missing(key))?;
    let pem = std::str::from_utf8(bytes).map_err(|_| RenewReason::Unreadable(key))?;
    KeyPair::from_pem(pem).map_err(|_| RenewReason::Unreadable(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Bundle, service_sans};

    const HOUR: Duration = Duration::from_secs(3600);
    const MONTH: Duration = Duration::from_secs(720 * 3600);
    const YEAR: Duration = Duration::from_secs(8760 * 3600);

    fn sans() -> Vec<String> {
        service_sans("canary-injector", "canary-injector", "cluster.local")
    }

    fn data(b: &Bundle) -> SecretData {
        SecretData {
            tls_crt: Some(b.cert_pem.clone().into_bytes()),
            tls_key: Some(b.key_pem.clone().into_bytes()),
            ca_crt: Some(b.ca_cert_pem.clone().into_bytes()),
            ca_key: Some(b.ca_key_pem.clone().into_bytes()),
        }
    }

    fn bundle(ca_validity: Duration, validity: Duration, sans: &[String]) -> Bundle {
        Ca::generate("test CA", ca_validity)
            .unwrap()
            .issue(sans, validity)
            .unwrap()
    }

    fn plan(d: Option<&SecretData>) -> SecretAction {
        plan_secret(d, OffsetDateTime::now_utc(), &sans(), MONTH)
    }

    #[test]
    fn absent_secret_is_created() {
        assert_eq!(plan(None), SecretAction::Create);
    }

    #[test]
    fn valid_secret_is_kept() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        assert_eq!(plan(Some(&data(&b))), SecretAction::Keep);
    }

    #[test]
    fn san_order_and_case_do_not_matter() {
        let mut names = sans();
        names.reverse();
        names[0] = names[0].to_uppercase();
        let b = bundle(10 * YEAR, YEAR, &names);
        assert_eq!(plan(Some(&data(&b))), SecretAction::Keep);
    }

    #[test]
    fn expiring_serving_certificate_is_renewed_with_the_same_ca() {
        let b = bundle(10 * YEAR, HOUR, &sans());
        assert_eq!(
            plan(Some(&data(&b))),
            SecretAction::Renew {
                keep_ca: true,
                reason: RenewReason::Expiring(TLS_CRT)
            }
        );
    }

    #[test]
    fn the_clock_is_a_parameter() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let later = OffsetDateTime::now_utc() + YEAR - MONTH / 2;
        assert!(matches!(
            plan_secret(Some(&data(&b)), later, &sans(), MONTH),
            SecretAction::Renew { keep_ca: true, .. }
        ));
    }

    #[test]
    fn other_dns_names_are_renewed_with_the_same_ca() {
        let old = service_sans("old", "canary-injector", "cluster.local");
        let b = bundle(10 * YEAR, YEAR, &old);
        let SecretAction::Renew {
            keep_ca: true,
            reason: RenewReason::SansMismatch { found },
        } = plan(Some(&data(&b)))
        else {
            panic!("expected a renewal for mismatched SANs");
        };
        assert!(found.contains(&"old.canary-injector.svc".to_string()));
    }

    #[test]
    fn a_missing_name_is_a_mismatch() {
        let b = bundle(10 * YEAR, YEAR, &sans()[..3]);
        assert!(matches!(
            plan(Some(&data(&b))),
            SecretAction::Renew {
                keep_ca: true,
                reason: RenewReason::SansMismatch { .. }
            }
        ));
    }

    #[test]
    fn corrupt_ca_pem_gets_a_new_ca() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let mut d = data(&b);
        d.ca_crt = Some(b"-----BEGIN CERTIFICATE-----\nnot base64\n".to_vec());
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: false,
                reason: RenewReason::Unreadable(CA_CRT)
            }
        );
        let mut d = data(&b);
        d.ca_key = Some(b"garbage".to_vec());
        assert!(matches!(
            plan(Some(&d)),
            SecretAction::Renew { keep_ca: false, .. }
        ));
    }

    #[test]
    fn corrupt_serving_pem_keeps_the_ca() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let mut d = data(&b);
        d.tls_crt = Some(b"garbage".to_vec());
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: true,
                reason: RenewReason::Unreadable(TLS_CRT)
            }
        );
    }

    #[test]
    fn empty_secret_gets_a_new_ca() {
        assert_eq!(
            plan(Some(&SecretData::default())),
            SecretAction::Renew {
                keep_ca: false,
                reason: RenewReason::Missing(CA_CRT)
            }
        );
    }

    #[test]
    fn expiring_ca_gets_a_new_ca_even_if_the_serving_cert_looks_fine() {
        // A serving certificate that outlives its CA stops verifying when the
        // CA expires, so the CA's own expiry decides too.
        let b = bundle(HOUR * 2, YEAR, &sans());
        assert_eq!(
            plan(Some(&data(&b))),
            SecretAction::Renew {
                keep_ca: false,
                reason: RenewReason::Expiring(CA_CRT)
            }
        );
    }

    #[test]
    fn mismatched_keys_are_noticed() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let other = bundle(10 * YEAR, YEAR, &sans());
        let mut d = data(&b);
        d.tls_key = other.key_pem.clone().into_bytes().into();
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: true,
                reason: RenewReason::KeyMismatch(TLS_KEY)
            }
        );
        let mut d = data(&b);
        d.ca_key = other.ca_key_pem.clone().into_bytes().into();
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: false,
                reason: RenewReason::KeyMismatch(CA_KEY)
            }
        );
    }

    #[test]
    fn serving_cert_from_another_ca_is_renewed() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let other = bundle(10 * YEAR, YEAR, &sans());
        let mut d = data(&b);
        d.tls_crt = other.cert_pem.clone().into_bytes().into();
        d.tls_key = other.key_pem.clone().into_bytes().into();
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: true,
                reason: RenewReason::NotSignedByCa
            }
        );
    }

    #[test]
    fn a_serving_cert_in_ca_crt_is_not_a_ca() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let mut d = data(&b);
        d.ca_crt = d.tls_crt.clone();
        d.ca_key = d.tls_key.clone();
        assert_eq!(
            plan(Some(&d)),
            SecretAction::Renew {
                keep_ca: false,
                reason: RenewReason::NotCa
            }
        );
    }

    #[test]
    fn accepted_ca_loads() {
        let b = bundle(10 * YEAR, YEAR, &sans());
        let ca = load_ca(b.ca_cert_pem.as_bytes(), b.ca_key_pem.as_bytes()).unwrap();
        let again = ca.issue(&sans(), YEAR).unwrap();
        assert_eq!(again.ca_cert_pem, b.ca_cert_pem);
    }
}
