//! The pure part of `canary-injector certs`: given what the CA Secret, the
//! TLS Secret and the webhooks' `caBundle`s hold, decide what to write, in
//! which order, so that the apiserver never stops trusting the certificate
//! the pods serve. No I/O; the clock is a parameter.
//!
//! One run of [`plan_rotation`] is one step of a state machine; its
//! documentation has the table of states.
//!
//! The caBundle always gains the new CA before the TLS Secret changes, and
//! loses the old one only on a later run, once the serving certificate
//! signed by the new CA has been in the Secret for [`BUNDLE_OVERLAP`] (the
//! kubelet refreshes a mounted Secret within about two minutes). A run that
//! stops half way (a failed patch) leaves one of those states, and the
//! next run carries on from it.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use rcgen::KeyPair;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use super::ca::{BACKDATE, Ca};

/// Secret key (and file name) of the serving certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Secret key (and file name) of the serving private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret key (and file name) of the CA certificate.
pub const CA_CRT: &str = "ca.crt";
/// Secret key (and file name) of the CA private key.
pub const CA_KEY: &str = "ca.key";

/// The entries of a Secret written by `canary-injector certs`, as raw bytes
/// (PEM when written by us); `None` when the key is absent. The TLS Secret
/// holds `tls.crt`, `tls.key` and `ca.crt` (and `ca.key` when an older
/// version wrote it); the CA Secret holds `ca.crt` and `ca.key`.
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
    /// The serving certificate was not signed by the CA.
    NotSignedByCa,
    /// The TLS Secret's `ca.crt` is not the CA that signs.
    StaleCaCrt,
    /// A new CA replaces the old one, so the serving certificate follows.
    NewCa,
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
            Self::NotSignedByCa => write!(f, "{TLS_CRT} is not signed by the CA"),
            Self::StaleCaCrt => write!(f, "{CA_CRT} next to {TLS_CRT} is not the CA"),
            Self::NewCa => write!(f, "the CA is replaced"),
        }
    }
}

/// How long the previous CA stays in the `caBundle` once the serving
/// certificate signed by the new CA is in the TLS Secret: the kubelet
/// refreshes a mounted Secret within about two minutes (sync period plus
/// its cache), and the server reloads the files within seconds.
pub const BUNDLE_OVERLAP: Duration = Duration::from_secs(10 * 60);

/// What a run found, read before anything is written.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The CA Secret (`ca.crt`, `ca.key`); `None` when it does not exist.
    pub ca: Option<&'a SecretData>,
    /// The TLS Secret; `None` when it does not exist.
    pub tls: Option<&'a SecretData>,
    /// The `caBundle` (PEM, possibly several certificates) of each webhook of
    /// the configuration; empty when unset.
    pub bundles: &'a [Vec<u8>],
}

/// What the certificates must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// DNS names of the serving certificate.
    pub sans: &'a [String],
    /// A certificate expiring within this is replaced.
    pub renew_before: Duration,
    /// The current time.
    pub now: OffsetDateTime,
}

/// What to do with the CA Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaStep {
    /// It holds a usable CA: sign with it.
    Keep,
    /// It is missing or unusable, but the TLS Secret still holds a usable
    /// `ca.crt` and `ca.key` (written by an older version): copy them into
    /// the CA Secret, so the CA and the `caBundle` stay the same.
    MoveFromTls,
    /// No usable CA anywhere: make a new one. `None`: the CA Secret did not
    /// exist; `Some`: why its CA cannot stay.
    New(Option<RenewReason>),
}

/// What to do with the webhooks' `caBundle`s. The signing CA is the one of
/// [`CaStep`] (the new one for [`CaStep::New`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleStep {
    /// Every webhook trusts what it should already.
    Keep,
    /// Set every `caBundle` to `previous` followed by the signing CA, before
    /// the TLS Secret changes: `previous` are the unexpired certificates the
    /// webhooks trust now, plus the CA of the certificate being served, so
    /// pods still serving an older certificate stay trusted.
    Publish {
        /// PEM certificates to keep, in order, without the signing CA.
        previous: Vec<String>,
    },
    /// Set every `caBundle` to the signing CA alone: the serving certificate
    /// it signed has been in the TLS Secret for [`BUNDLE_OVERLAP`].
    Prune,
}

/// What to do with the TLS Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsStep {
    /// Its serving certificate is valid, signed by the signing CA, for the
    /// wanted names, and not due for renewal.
    Keep,
    /// Issue a serving certificate from the signing CA and write it (why).
    Issue(RenewReason),
}

/// One run's plan, carried out in field order: the CA Secret, then the
/// `caBundle`s, then the TLS Secret, then the removal of `ca.key` from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The CA Secret.
    pub ca: CaStep,
    /// The webhooks' `caBundle`s.
    pub bundle: BundleStep,
    /// The TLS Secret's serving certificate.
    pub tls: TlsStep,
    /// The TLS Secret still holds `ca.key` (an older version kept the CA
    /// there, in the Secret the pods mount): remove it, once the CA Secret
    /// holds the CA.
    pub remove_tls_ca_key: bool,
}

/// Decides one run of `canary-injector certs --secret`.
///
/// The states and what a run does in each (every later run sees what the
/// earlier ones wrote):
///
/// ```text
///  CA Secret       caBundle             TLS Secret          next run does
///  -------------   ------------------   -----------------   ---------------------------------
///  none            none                 none                new CA C; publish [C]; issue from C
///  C (usable)      [C]                  signed by C, valid  nothing
///  C               [C]                  expiring / wrong    issue from C (caBundle unchanged)
///  C expiring      [C]                  signed by C         new CA N; publish [C, N]; issue from N
///  N               [C] (patch failed)   signed by C         publish [C, N]; issue from N
///  N               [C, N]               signed by N, new    nothing yet: pods may still serve C's
///  N               [C, N]               signed by N, older  prune to [N]
///                                       than BUNDLE_OVERLAP
///  none            [C]                  C + ca.key (legacy) move ca.crt/ca.key to the CA Secret,
///                                                           then remove ca.key from the TLS Secret
/// ```
pub fn plan_rotation(observed: &Observed<'_>, wanted: &Wanted<'_>) -> Rotation {
    let Wanted {
        sans,
        renew_before,
        now,
    } = *wanted;
    let ca_check = match observed.ca {
        Some(ca) => check_ca(
            ca.ca_crt.as_deref(),
            ca.ca_key.as_deref(),
            now,
            renew_before,
        )
        .map_err(Some),
        None => Err(None),
    };
    let legacy_ok = observed.tls.is_some_and(|tls| {
        tls.ca_key.is_some()
            && check_ca(
                tls.ca_crt.as_deref(),
                tls.ca_key.as_deref(),
                now,
                renew_before,
            )
            .is_ok()
    });
    // The signing CA's certificate (DER), when it already exists.
    let (ca_step, signing) = match ca_check {
        Ok(()) => (
            CaStep::Keep,
            observed.ca.and_then(|c| cert_der(c.ca_crt.as_deref())),
        ),
        Err(_) if legacy_ok => (
            CaStep::MoveFromTls,
            observed.tls.and_then(|t| cert_der(t.ca_crt.as_deref())),
        ),
        Err(reason) => (CaStep::New(reason), None),
    };

    let tls_step = match (&signing, observed.tls) {
        (None, _) => TlsStep::Issue(RenewReason::NewCa),
        (Some(_), None) => TlsStep::Issue(RenewReason::Missing(TLS_CRT)),
        (Some(ca), Some(tls)) => match check_serving(tls, ca, now, sans, renew_before) {
            Ok(()) => TlsStep::Keep,
            Err(reason) => TlsStep::Issue(reason),
        },
    };

    let current: Vec<Vec<Vec<u8>>> = observed.bundles.iter().map(|b| certs_of(b)).collect();
    let bundle_step = match &signing {
        None => BundleStep::Publish {
            previous: previous(&current, observed.tls, None, now),
        },
        Some(ca) => {
            let everywhere = current.iter().all(|b| b.contains(ca));
            let prune = everywhere
                && observed
                    .tls
                    .is_some_and(|tls| served_long_enough(tls, ca, now));
            let mut desired: Vec<Vec<u8>> = if prune {
                Vec::new()
            } else {
                previous(&current, observed.tls, Some(ca), now)
                    .iter()
                    .filter_map(|pem| cert_der(Some(pem.as_bytes())))
                    .collect()
            };
            desired.push(ca.clone());
            let wanted_set: BTreeSet<&Vec<u8>> = desired.iter().collect();
            let all_match = current
                .iter()
                .all(|b| b.iter().collect::<BTreeSet<_>>() == wanted_set);
            if all_match {
                BundleStep::Keep
            } else if prune {
                BundleStep::Prune
            } else {
                BundleStep::Publish {
                    previous: desired[..desired.len() - 1]
                        .iter()
                        .map(|d| to_pem(d))
                        .collect(),
                }
            }
        }
    };

    Rotation {
        ca: ca_step,
        bundle: bundle_step,
        tls: tls_step,
        remove_tls_ca_key: observed.tls.is_some_and(|t| t.ca_key.is_some()),
    }
}

/// The `caBundle` value for [`BundleStep::Publish`]: `previous`, then the
/// signing CA's PEM.
pub fn bundle_pem(previous: &[String], ca_pem: &str) -> String {
    let mut out = String::new();
    for pem in previous {
        out.push_str(pem);
    }
    let ca = cert_der(Some(ca_pem.as_bytes())).map_or_else(|| ca_pem.to_owned(), |d| to_pem(&d));
    out.push_str(&ca);
    out
}

/// The certificates to keep next to the signing CA: every unexpired
/// certificate the webhooks trust now, then the TLS Secret's `ca.crt` when
/// it signed the certificate being served, in first-seen order, without
/// duplicates or the signing CA.
fn previous(
    current: &[Vec<Vec<u8>>],
    tls: Option<&SecretData>,
    signing: Option<&Vec<u8>>,
    now: OffsetDateTime,
) -> Vec<String> {
    let served_ca = tls.and_then(|t| {
        let ca = cert_der(t.ca_crt.as_deref())?;
        let leaf = cert_der(t.tls_crt.as_deref())?;
        signs(&ca, &leaf).then_some(ca)
    });
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for der in current.iter().flatten().chain(served_ca.iter()) {
        if Some(der) == signing || seen.contains(der) || !unexpired(der, now) {
            continue;
        }
        seen.push(der.clone());
    }
    seen.iter().map(|d| to_pem(d)).collect()
}

/// The TLS Secret's serving certificate is signed by `ca` and was issued at
/// least [`BUNDLE_OVERLAP`] ago, so every pod serves a certificate of `ca`.
fn served_long_enough(tls: &SecretData, ca: &[u8], now: OffsetDateTime) -> bool {
    let Some(leaf) = cert_der(tls.tls_crt.as_deref()) else {
        return false;
    };
    if !signs(ca, &leaf) {
        return false;
    }
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&leaf) else {
        return false;
    };
    let issued =
        i128::from(cert.validity().not_before.timestamp()) + i128::from(BACKDATE.whole_seconds());
    issued + i128::from(BUNDLE_OVERLAP.as_secs()) <= i128::from(now.unix_timestamp())
}

/// Whether some certificate in `bundle` (PEM, a `caBundle`) signed the
/// first certificate of `leaf` (PEM): what the apiserver checks when it
/// calls the webhook.
pub fn bundle_trusts(bundle: &[u8], leaf: &[u8]) -> bool {
    let Some(leaf) = cert_der(Some(leaf)) else {
        return false;
    };
    certs_of(bundle).iter().any(|ca| signs(ca, &leaf))
}

/// Not-after of the first certificate of a PEM buffer, unix seconds.
pub fn not_after(pem: &[u8]) -> Option<i64> {
    let der = cert_der(Some(pem))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn signs(ca: &[u8], leaf: &[u8]) -> bool {
    let (Ok((_, ca)), Ok((_, leaf))) = (
        x509_parser::parse_x509_certificate(ca),
        x509_parser::parse_x509_certificate(leaf),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn unexpired(der: &[u8], now: OffsetDateTime) -> bool {
    x509_parser::parse_x509_certificate(der)
        .is_ok_and(|(_, c)| c.validity().not_after.timestamp() > now.unix_timestamp())
}

/// The DER of the first certificate of a PEM buffer.
fn cert_der(bytes: Option<&[u8]>) -> Option<Vec<u8>> {
    certs_of(bytes?).into_iter().next()
}

/// The DER of every parseable certificate of a PEM buffer (a `caBundle`).
fn certs_of(bytes: &[u8]) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(bytes)
        .map_while(Result::ok)
        .filter(|pem| pem.label == "CERTIFICATE" && pem.parse_x509().is_ok())
        .map(|pem| pem.contents)
        .collect()
}

/// PEM of a DER certificate, 64 characters a line.
fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
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

/// Checks the TLS Secret's serving certificate against the signing CA
/// (`ca`, DER): key matches, signed by it, `ca.crt` is it, the wanted DNS
/// names, valid for longer than `renew_before`.
pub(crate) fn check_serving(
    tls: &SecretData,
    ca_der: &[u8],
    now: OffsetDateTime,
    sans: &[String],
    renew_before: Duration,
) -> Result<(), RenewReason> {
    let (_, ca) =
        x509_parser::parse_x509_certificate(ca_der).map_err(|_| RenewReason::Unreadable(CA_CRT))?;
    let leaf_pem = first_pem(tls.tls_crt.as_deref(), TLS_CRT)?;
    let leaf = parse_cert(&leaf_pem, TLS_CRT)?;
    let key = parse_key(tls.tls_key.as_deref(), TLS_KEY)?;
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
    check_expiry(&leaf, now, renew_before, TLS_CRT)?;
    if cert_der(tls.ca_crt.as_deref()).as_deref() != Some(ca_der) {
        return Err(RenewReason::StaleCaCrt);
    }
    Ok(())
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

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn new_ca(validity: Duration) -> Ca {
        Ca::generate("test CA", validity).unwrap()
    }

    /// A serving certificate from `ca` issued `age` ago.
    fn serving(ca: &Ca, validity: Duration, age: Duration) -> Bundle {
        ca.issue_at(&sans(), validity, now() - age).unwrap()
    }

    fn ca_secret(ca: &Ca) -> SecretData {
        SecretData {
            ca_crt: Some(ca.cert_pem().as_bytes().to_vec()),
            ca_key: Some(ca.key_pem().as_bytes().to_vec()),
            ..SecretData::default()
        }
    }

    /// The TLS Secret as this version writes it (no `ca.key`).
    fn tls_secret(b: &Bundle) -> SecretData {
        SecretData {
            tls_crt: Some(b.cert_pem.clone().into_bytes()),
            tls_key: Some(b.key_pem.clone().into_bytes()),
            ca_crt: Some(b.ca_cert_pem.clone().into_bytes()),
            ca_key: None,
        }
    }

    /// The TLS Secret as older versions wrote it: the CA key in it.
    fn legacy_tls_secret(b: &Bundle) -> SecretData {
        SecretData {
            ca_key: Some(b.ca_key_pem.clone().into_bytes()),
            ..tls_secret(b)
        }
    }

    fn bundle_of(cas: &[&Ca]) -> Vec<u8> {
        cas.iter()
            .map(|c| c.cert_pem().to_owned())
            .collect::<String>()
            .into_bytes()
    }

    fn plan(ca: Option<&SecretData>, tls: Option<&SecretData>, bundles: &[Vec<u8>]) -> Rotation {
        plan_at(ca, tls, bundles, now())
    }

    fn plan_at(
        ca: Option<&SecretData>,
        tls: Option<&SecretData>,
        bundles: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Rotation {
        let sans = sans();
        plan_rotation(
            &Observed { ca, tls, bundles },
            &Wanted {
                sans: &sans,
                renew_before: MONTH,
                now,
            },
        )
    }

    fn publish(previous: &[&Ca]) -> BundleStep {
        BundleStep::Publish {
            previous: previous
                .iter()
                .map(|c| to_pem(&cert_der(Some(c.cert_pem().as_bytes())).unwrap()))
                .collect(),
        }
    }

    fn keep_all() -> Rotation {
        Rotation {
            ca: CaStep::Keep,
            bundle: BundleStep::Keep,
            tls: TlsStep::Keep,
            remove_tls_ca_key: false,
        }
    }

    #[test]
    fn first_install_creates_a_ca_publishes_it_then_issues() {
        assert_eq!(
            plan(None, None, &[Vec::new()]),
            Rotation {
                ca: CaStep::New(None),
                bundle: publish(&[]),
                tls: TlsStep::Issue(RenewReason::NewCa),
                remove_tls_ca_key: false,
            }
        );
    }

    #[test]
    fn steady_state_writes_nothing() {
        let ca = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&ca, YEAR, HOUR));
        let bundles = [bundle_of(&[&ca]), bundle_of(&[&ca])];
        assert_eq!(
            plan(Some(&ca_secret(&ca)), Some(&tls), &bundles),
            keep_all()
        );
    }

    #[test]
    fn expiring_serving_certificate_is_renewed_with_the_same_ca_and_bundle() {
        let ca = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&ca, YEAR, YEAR - HOUR));
        let r = plan(Some(&ca_secret(&ca)), Some(&tls), &[bundle_of(&[&ca])]);
        assert_eq!(
            r,
            Rotation {
                tls: TlsStep::Issue(RenewReason::Expiring(TLS_CRT)),
                ..keep_all()
            }
        );
    }

    #[test]
    fn the_serving_certificate_is_checked_against_the_wanted_names_key_and_ca() {
        let ca = new_ca(10 * YEAR);
        let good = serving(&ca, YEAR, HOUR);
        let other = new_ca(10 * YEAR);
        let cases: Vec<(SecretData, RenewReason)> = vec![
            (
                SecretData {
                    tls_crt: Some(b"garbage".to_vec()),
                    ..tls_secret(&good)
                },
                RenewReason::Unreadable(TLS_CRT),
            ),
            (
                SecretData {
                    tls_key: Some(serving(&ca, YEAR, HOUR).key_pem.into_bytes()),
                    ..tls_secret(&good)
                },
                RenewReason::KeyMismatch(TLS_KEY),
            ),
            (
                tls_secret(&serving(&other, YEAR, HOUR)),
                RenewReason::NotSignedByCa,
            ),
            (
                SecretData {
                    ca_crt: None,
                    ..tls_secret(&good)
                },
                RenewReason::StaleCaCrt,
            ),
            (
                tls_secret(&ca.issue(&sans()[..3], YEAR).unwrap()),
                RenewReason::SansMismatch {
                    found: sans()[..3]
                        .iter()
                        .cloned()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                },
            ),
        ];
        for (tls, reason) in cases {
            let r = plan(Some(&ca_secret(&ca)), Some(&tls), &[bundle_of(&[&ca])]);
            // A certificate of another CA is being served: that CA is
            // published too until the new certificate has reached the pods.
            let bundle = if reason == RenewReason::NotSignedByCa {
                publish(&[&other])
            } else {
                BundleStep::Keep
            };
            assert_eq!(r.tls, TlsStep::Issue(reason));
            assert_eq!((r.ca, r.bundle), (CaStep::Keep, bundle));
        }
        let missing = plan(Some(&ca_secret(&ca)), None, &[bundle_of(&[&ca])]);
        assert_eq!(missing.tls, TlsStep::Issue(RenewReason::Missing(TLS_CRT)));
    }

    #[test]
    fn san_order_and_case_do_not_matter() {
        let ca = new_ca(10 * YEAR);
        let mut names = sans();
        names.reverse();
        names[0] = names[0].to_uppercase();
        let tls = tls_secret(&ca.issue(&names, YEAR).unwrap());
        let r = plan(Some(&ca_secret(&ca)), Some(&tls), &[bundle_of(&[&ca])]);
        assert_eq!(r.tls, TlsStep::Keep);
    }

    /// The whole CA replacement, run after run, including a failed caBundle
    /// patch: at every step the bundle trusts the CA of the certificate the
    /// TLS Secret holds (what the pods serve, or will within minutes).
    #[test]
    fn ca_replacement_overlaps_old_and_new_ca_and_survives_a_failed_bundle_patch() {
        let old = new_ca(HOUR * 24);
        let tls_old = tls_secret(&serving(&old, HOUR * 20, HOUR));
        let bundles = [bundle_of(&[&old])];

        // Run 1: the CA expires within the renewal window: a new CA, the old
        // one kept in the bundle, and a serving certificate from the new CA.
        let r1 = plan(Some(&ca_secret(&old)), Some(&tls_old), &bundles);
        assert_eq!(
            r1,
            Rotation {
                ca: CaStep::New(Some(RenewReason::Expiring(CA_CRT))),
                bundle: publish(&[&old]),
                tls: TlsStep::Issue(RenewReason::NewCa),
                remove_tls_ca_key: false,
            }
        );

        // Run 1 wrote the CA Secret, then its caBundle patch failed: the TLS
        // Secret was not touched, so the pods still serve the old CA's
        // certificate, which the bundle still trusts.
        let new = new_ca(10 * YEAR);
        let r2 = plan(Some(&ca_secret(&new)), Some(&tls_old), &bundles);
        assert_eq!(
            r2,
            Rotation {
                ca: CaStep::Keep,
                bundle: publish(&[&old]),
                tls: TlsStep::Issue(RenewReason::NotSignedByCa),
                remove_tls_ca_key: false,
            }
        );
        let published = bundle_pem(
            match &r2.bundle {
                BundleStep::Publish { previous } => previous,
                other => panic!("{other:?}"),
            },
            new.cert_pem(),
        );
        assert_eq!(certs_of(published.as_bytes()).len(), 2);

        // Run 2 succeeded: bundle [old, new], serving certificate from new.
        let tls_new = tls_secret(&serving(&new, YEAR, Duration::ZERO));
        let both = [published.clone().into_bytes()];
        // Run 3 right after: the old CA must stay (pods may not have
        // reloaded the Secret yet).
        assert_eq!(
            plan(Some(&ca_secret(&new)), Some(&tls_new), &both),
            keep_all()
        );
        // ... still within the overlap ...
        let soon = now() + BUNDLE_OVERLAP - Duration::from_secs(60);
        assert_eq!(
            plan_at(Some(&ca_secret(&new)), Some(&tls_new), &both, soon),
            keep_all()
        );
        // Run 4 after the overlap: only the new CA.
        let later = now() + BUNDLE_OVERLAP + Duration::from_secs(60);
        let r4 = plan_at(Some(&ca_secret(&new)), Some(&tls_new), &both, later);
        assert_eq!(
            r4,
            Rotation {
                bundle: BundleStep::Prune,
                ..keep_all()
            }
        );
        // And then it is the steady state.
        let pruned = [bundle_pem(&[], new.cert_pem()).into_bytes()];
        assert_eq!(
            plan_at(Some(&ca_secret(&new)), Some(&tls_new), &pruned, later),
            keep_all()
        );
    }

    #[test]
    fn no_prune_while_the_tls_secret_is_not_signed_by_the_new_ca() {
        let old = new_ca(10 * YEAR);
        let new = new_ca(10 * YEAR);
        // The serving certificate is still the old CA's (a run stopped after
        // publishing): the old CA must stay however long ago that was.
        let tls_old = tls_secret(&serving(&old, YEAR, 100 * HOUR));
        let both = [bundle_of(&[&old, &new])];
        let r = plan(Some(&ca_secret(&new)), Some(&tls_old), &both);
        assert_eq!(r.bundle, BundleStep::Keep);
        assert_eq!(r.tls, TlsStep::Issue(RenewReason::NotSignedByCa));
    }

    #[test]
    fn publish_drops_expired_and_unreadable_entries_and_adds_the_served_ca() {
        let ca = new_ca(10 * YEAR);
        let expired = Ca::generate_at("expired", HOUR, now() - 3 * HOUR).unwrap();
        let served = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&served, YEAR, HOUR));
        let mut junk = bundle_of(&[&expired]);
        junk.extend_from_slice(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        );
        // Two webhooks, one of them without any caBundle.
        let r = plan(Some(&ca_secret(&ca)), Some(&tls), &[junk, Vec::new()]);
        assert_eq!(r.bundle, publish(&[&served]));
        assert_eq!(r.tls, TlsStep::Issue(RenewReason::NotSignedByCa));
    }

    #[test]
    fn one_webhook_without_the_ca_is_enough_to_publish() {
        let ca = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&ca, YEAR, HOUR));
        let r = plan(
            Some(&ca_secret(&ca)),
            Some(&tls),
            &[bundle_of(&[&ca]), Vec::new()],
        );
        assert_eq!(r.bundle, publish(&[]));
        // The same CA in another PEM layout (CRLF, a trailing comment) is
        // the same bundle.
        let reformatted = ca.cert_pem().replace('\n', "\r\n") + "# spare\n";
        let r = plan(
            Some(&ca_secret(&ca)),
            Some(&tls),
            &[reformatted.into_bytes()],
        );
        assert_eq!(r.bundle, BundleStep::Keep);
    }

    #[test]
    fn a_ca_left_in_the_tls_secret_is_moved_and_removed_from_it() {
        let ca = new_ca(10 * YEAR);
        let legacy = legacy_tls_secret(&serving(&ca, YEAR, 100 * HOUR));
        let bundles = [bundle_of(&[&ca])];
        assert_eq!(
            plan(None, Some(&legacy), &bundles),
            Rotation {
                ca: CaStep::MoveFromTls,
                remove_tls_ca_key: true,
                ..keep_all()
            },
            "the CA and caBundle stay; only the key moves"
        );
        // A damaged CA Secret is replaced by the TLS Secret's CA too.
        let damaged = SecretData {
            ca_key: Some(b"garbage".to_vec()),
            ..ca_secret(&ca)
        };
        assert_eq!(
            plan(Some(&damaged), Some(&legacy), &bundles).ca,
            CaStep::MoveFromTls
        );
        // Once the CA Secret holds it, the key is only removed.
        assert_eq!(
            plan(Some(&ca_secret(&ca)), Some(&legacy), &bundles),
            Rotation {
                remove_tls_ca_key: true,
                ..keep_all()
            }
        );
    }

    #[test]
    fn an_unusable_ca_key_in_the_tls_secret_is_not_moved() {
        let ca = new_ca(10 * YEAR);
        let mut legacy = legacy_tls_secret(&serving(&ca, YEAR, HOUR));
        legacy.ca_key = Some(b"garbage".to_vec());
        let r = plan(None, Some(&legacy), &[bundle_of(&[&ca])]);
        assert_eq!(r.ca, CaStep::New(None));
        assert_eq!(r.bundle, publish(&[&ca]), "the served CA stays trusted");
        assert_eq!(r.tls, TlsStep::Issue(RenewReason::NewCa));
        assert!(r.remove_tls_ca_key);
    }

    #[test]
    fn a_damaged_ca_secret_gets_a_new_ca_with_the_reason() {
        let ca = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&ca, YEAR, HOUR));
        let other = new_ca(10 * YEAR);
        let cases = [
            (
                SecretData {
                    ca_crt: Some(b"-----BEGIN CERTIFICATE-----\nnot base64\n".to_vec()),
                    ..ca_secret(&ca)
                },
                RenewReason::Unreadable(CA_CRT),
            ),
            (
                SecretData {
                    ca_key: Some(other.key_pem().as_bytes().to_vec()),
                    ..ca_secret(&ca)
                },
                RenewReason::KeyMismatch(CA_KEY),
            ),
            (SecretData::default(), RenewReason::Missing(CA_CRT)),
        ];
        for (secret, reason) in cases {
            let r = plan(Some(&secret), Some(&tls), &[bundle_of(&[&ca])]);
            assert_eq!(r.ca, CaStep::New(Some(reason)));
            assert_eq!(r.bundle, publish(&[&ca]));
        }
    }

    #[test]
    fn a_serving_certificate_in_ca_crt_is_not_a_ca() {
        let ca = new_ca(10 * YEAR);
        let b = serving(&ca, YEAR, HOUR);
        let not_ca = SecretData {
            ca_crt: Some(b.cert_pem.clone().into_bytes()),
            ca_key: Some(b.key_pem.clone().into_bytes()),
            ..SecretData::default()
        };
        let r = plan(Some(&not_ca), Some(&tls_secret(&b)), &[bundle_of(&[&ca])]);
        assert_eq!(r.ca, CaStep::New(Some(RenewReason::NotCa)));
    }

    #[test]
    fn the_clock_is_a_parameter() {
        let ca = new_ca(10 * YEAR);
        let tls = tls_secret(&serving(&ca, YEAR, HOUR));
        let later = now() + YEAR - MONTH / 2;
        let r = plan_at(
            Some(&ca_secret(&ca)),
            Some(&tls),
            &[bundle_of(&[&ca])],
            later,
        );
        assert_eq!(r.tls, TlsStep::Issue(RenewReason::Expiring(TLS_CRT)));
    }

    #[test]
    fn accepted_ca_loads() {
        let ca = new_ca(10 * YEAR);
        let loaded = load_ca(ca.cert_pem().as_bytes(), ca.key_pem().as_bytes()).unwrap();
        let again = loaded.issue(&sans(), YEAR).unwrap();
        assert_eq!(again.ca_cert_pem, ca.cert_pem());
    }

    #[test]
    fn bundle_pem_is_previous_then_the_ca() {
        let a = new_ca(YEAR);
        let b = new_ca(YEAR);
        let prev = vec![to_pem(&cert_der(Some(a.cert_pem().as_bytes())).unwrap())];
        let pem = bundle_pem(&prev, b.cert_pem());
        let certs = certs_of(pem.as_bytes());
        assert_eq!(certs.len(), 2);
        assert_eq!(
            Some(&certs[1]),
            cert_der(Some(b.cert_pem().as_bytes())).as_ref()
        );
    }
}
