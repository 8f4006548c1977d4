//! Certificates: a CA and an ECDSA P-256 serving certificate (rcgen), for
//! the laptop development certificate and for `canary-injector certs`.
//!
//! - [`Ca`] makes or loads a CA and issues serving certificates with it.
//! - [`plan_rotation`] decides, without I/O, what one run of `certs --secret`
//!   writes: the CA Secret, the `caBundle`s, the TLS Secret, in that order.
//! - [`write_out_dir`] is `canary-injector certs --out DIR`.
//! - [`cluster`] is `canary-injector certs --secret`: the same decision
//!   against a real Secret, plus the webhook configuration's `caBundle`.

pub mod ca;
pub mod cluster;
pub mod plan;

pub use ca::{Bundle, Ca};

pub use plan::{
    BUNDLE_OVERLAP, BundleStep, CaStep, Observed, RenewReason, Rotation, SecretData, TlsStep,
    Wanted, bundle_pem, bundle_trusts, check_ca, not_after, plan_rotation,
};

use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or a key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// An existing file in the output directory is not safe to use: a
    /// symbolic link, not a regular file, or owned by another user (someone
    /// else could control the CA it holds).
    #[error("{path}: {why}; refusing to use it (remove it or use another directory)")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
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
    create_private_dir(dir)?;
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

/// Creates `dir` (and missing parents) with mode 0700 on Unix. An existing
/// directory is used as it is, unless on Unix other users could replace
/// the files written into it (writable by everyone, or owned by another
/// user): then it is refused, since a key written there could be swapped.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).map_err(|source| CertError::Io {
            path: dir.to_owned(),
            source,
        })?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let why = if meta.mode() & 0o002 != 0 {
            Some("directory writable by every user")
        } else if meta.uid() != me && me != 0 {
            Some("directory owned by another user")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(CertError::Unsafe {
                path: dir.to_owned(),
                why,
            });
        }
    }
    Ok(())
}

/// Writes `contents` to `path`: private files get mode 0600 on Unix, others
/// 0644 (both less the umask).
///
/// The bytes go to a new file beside `path` with a random name, created
/// exclusively (`O_EXCL`, never through a symbolic link someone planted),
/// which is then renamed over `path`: a reader (the server's certificate
/// reloader) sees the old file or the new one, never half of it; a key that
/// already existed with looser permissions ends up 0600; and a symbolic link
/// at `path` is replaced, not followed.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".canary-injector-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }));
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut tmp = builder.tempfile_in(dir).map_err(io)?;
    tmp.write_all(contents.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads `path` if it exists, refusing a symbolic link (not followed:
/// `O_NOFOLLOW`), anything but a regular file, and on Unix a file owned by
/// another user. `None` when there is no such file.
fn read_own(path: &Path) -> Result<Option<Vec<u8>>, CertError> {
    use std::io::Read;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let unsafe_file = |why| CertError::Unsafe {
        path: path.to_owned(),
        why,
    };
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(unsafe_file("a symbolic link"));
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(unsafe_file("not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if meta.uid() != unsafe { libc::geteuid() } {
            return Err(unsafe_file("owned by another user"));
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(Some(bytes))
}

/// How long certificates live and when they are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Validity of a new serving certificate (`--validity`).
    pub validity: Duration,
    /// Validity of a new CA (`--ca-validity`).
    pub ca_validity: Duration,
    /// A certificate (serving or CA) is replaced once it expires within this
    /// (`--renew-before`).
    pub renew_before: Duration,
}

impl Default for Lifetimes {
    /// One year for the serving certificate, ten for the CA, renewal 30 days
    /// before expiry: the command line's defaults.
    fn default() -> Self {
        let hour = 3600;
        Self {
            validity: Duration::from_secs(8760 * hour),
            ca_validity: Duration::from_secs(87600 * hour),
            renew_before: Duration::from_secs(720 * hour),
        }
    }
}

/// Common name of the CA that `canary-injector certs` creates.
pub const CA_COMMON_NAME: &str = "canary-injector CA";

/// The DNS names the apiserver may use for a webhook behind Service
/// `service` in `namespace`: `svc`, `svc.ns`, `svc.ns.svc` and
/// `svc.ns.svc.<cluster_domain>`. The apiserver itself dials
/// `svc.ns.svc`; the others help clients inside the cluster.
pub fn service_sans(service: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.{cluster_domain}"),
    ]
}

/// Where the CA used by [`write_out_dir`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaOrigin {
    /// `ca.crt` and `ca.key` in the directory were usable and kept, so the
    /// `caBundle` does not change.
    Reused,
    /// There was no CA in the directory; a new one was created.
    Created,
    /// The directory held a CA that could not be used (why); a new one
    /// replaced it, so the `caBundle` changes.
    Replaced(RenewReason),
}

/// What [`write_out_dir`] did.
#[derive(Debug, Clone)]
pub struct OutDir {
    /// The CA certificate (PEM) that signed the new serving certificate.
    pub ca_cert_pem: String,
    /// Where that CA came from.
    pub ca: CaOrigin,
}

/// `canary-injector certs --out DIR`: writes `ca.crt`, `ca.key` (0600),
/// `tls.crt` and `tls.key` (0600) to `dir`, creating it (0700) if needed.
///
/// A CA already in `dir` is reused when it is valid for longer than
/// `lifetimes.renew_before` and its key matches, so the `caBundle` stays the
/// same; the serving certificate is always issued anew. An existing `ca.crt`
/// or `ca.key` that is a symbolic link or belongs to another user is an
/// error ([`CertError::Unsafe`]): reusing it would sign with a CA someone
/// else may hold. Files are written as [`write_file`] does.
pub fn write_out_dir(
    dir: &Path,
    sans: &[String],
    lifetimes: &Lifetimes,
) -> Result<OutDir, CertError> {
    let ca_path = dir.join(plan::CA_CRT);
    let ca_key_path = dir.join(plan::CA_KEY);
    let existing = match (read_own(&ca_path)?, read_own(&ca_key_path)?) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    };
    let now = OffsetDateTime::now_utc();
    let (ca, origin) = match existing {
        None => (
            Ca::generate(CA_COMMON_NAME, lifetimes.ca_validity)?,
            CaOrigin::Created,
        ),
        Some((cert, key)) => match check_ca(Some(&cert), Some(&key), now, lifetimes.renew_before)
            .and_then(|()| plan::load_ca(&cert, &key))
        {
            Ok(ca) => (ca, CaOrigin::Reused),
            Err(reason) => (
                Ca::generate(CA_COMMON_NAME, lifetimes.ca_validity)?,
                CaOrigin::Replaced(reason),
            ),
        },
    };
    let bundle = ca.issue(sans, lifetimes.validity)?;
    create_private_dir(dir)?;
    if origin != CaOrigin::Reused {
        // If we stop between the two writes, ca.key no longer matches ca.crt
        // and the next run replaces the CA instead of signing with it.
        write_file(&ca_key_path, &bundle.ca_key_pem, true)?;
        write_file(&ca_path, &bundle.ca_cert_pem, false)?;
    }
    write_file(&dir.join(plan::TLS_KEY), &bundle.key_pem, true)?;
    write_file(&dir.join(plan::TLS_CRT), &bundle.cert_pem, false)?;
    Ok(OutDir {
        ca_cert_pem: bundle.ca_cert_pem,
        ca: origin,
    })
}

/// A `--validity`-style duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {why} (use Go-style durations such as 8760h, 90m, 1h30m or 45s)"
)]
pub struct DurationError {
    input: String,
    why: &'static str,
}

/// Parses a Go-style duration such as `8760h`, `1h30m`, `720h0m0s` or
/// `1.5h`; a bare `0` is zero. One checked parser for the whole crate:
/// [`crate::duration::parse`].
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    crate::duration::parse(input).map_err(|e| DurationError {
        input: input.to_owned(),
        why: e.as_str(),
    })
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

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).unwrap()
    }

    fn sans() -> Vec<String> {
        service_sans("canary-injector", "canary-injector", "cluster.local")
    }

    /// What `certs --secret` would do with the directory's files as its CA
    /// and TLS Secrets and a caBundle of its `ca.crt`: nothing, when they
    /// are a valid set.
    fn plan_dir(dir: &Path) -> Rotation {
        let ca = SecretData {
            ca_crt: Some(read(dir, "ca.crt")),
            ca_key: Some(read(dir, "ca.key")),
            ..SecretData::default()
        };
        let tls = SecretData {
            tls_crt: Some(read(dir, "tls.crt")),
            tls_key: Some(read(dir, "tls.key")),
            ca_crt: Some(read(dir, "ca.crt")),
            ca_key: None,
        };
        plan_rotation(
            &Observed {
                ca: Some(&ca),
                tls: Some(&tls),
                bundles: &[read(dir, "ca.crt")],
            },
            &Wanted {
                sans: &sans(),
                renew_before: Lifetimes::default().renew_before,
                now: OffsetDateTime::now_utc(),
            },
        )
    }

    fn valid_set() -> Rotation {
        Rotation {
            ca: CaStep::Keep,
            bundle: BundleStep::Keep,
            tls: TlsStep::Keep,
            remove_tls_ca_key: false,
        }
    }

    #[test]
    fn out_dir_reuses_its_ca_and_issues_a_new_serving_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/out");
        let lifetimes = Lifetimes::default();
        let first = write_out_dir(&dir, &sans(), &lifetimes).unwrap();
        assert_eq!(first.ca, CaOrigin::Created);
        assert_eq!(plan_dir(&dir), valid_set());
        let (ca, cert) = (read(&dir, "ca.crt"), read(&dir, "tls.crt"));

        let second = write_out_dir(&dir, &sans(), &lifetimes).unwrap();
        assert_eq!(second.ca, CaOrigin::Reused);
        assert_eq!(second.ca_cert_pem, first.ca_cert_pem);
        assert_eq!(read(&dir, "ca.crt"), ca);
        assert_ne!(read(&dir, "tls.crt"), cert);
        assert_eq!(
            plan_dir(&dir),
            valid_set(),
            "the new serving certificate is signed by the reused CA"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for (name, mode) in [("ca.key", 0o600), ("tls.key", 0o600)] {
                let m = std::fs::metadata(dir.join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(m & 0o777, mode, "{name}");
            }
        }
    }

    #[test]
    fn out_dir_replaces_an_unusable_or_expiring_ca() {
        let dir = tempfile::tempdir().unwrap();
        let lifetimes = Lifetimes::default();
        let first = write_out_dir(dir.path(), &sans(), &lifetimes).unwrap();
        std::fs::write(dir.path().join("ca.key"), "garbage").unwrap();
        let second = write_out_dir(dir.path(), &sans(), &lifetimes).unwrap();
        assert_eq!(
            second.ca,
            CaOrigin::Replaced(RenewReason::Unreadable("ca.key"))
        );
        assert_ne!(second.ca_cert_pem, first.ca_cert_pem);

        let short = Lifetimes {
            renew_before: lifetimes.ca_validity,
            ..lifetimes
        };
        let third = write_out_dir(dir.path(), &sans(), &short).unwrap();
        assert_eq!(
            third.ca,
            CaOrigin::Replaced(RenewReason::Expiring("ca.crt"))
        );
    }

    #[cfg(unix)]
    #[test]
    fn private_files_become_0600_even_if_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.key");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&path, "new", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn go_style_durations() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(parse_duration("8760h"), Ok(h(8760)));
        assert_eq!(parse_duration("720h0m0s"), Ok(h(720)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in [
            "",
            "10",
            "h",
            "1y",
            "1d",
            "-1h",
            "1h 30m",
            "99999999999999999999h",
            "5124095576030432h",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.to_string().contains("8760h"), "{bad}: {err}");
        }
    }

    #[test]
    fn absurd_validity_is_clamped_not_a_panic() {
        let ca = Ca::generate("test CA", Duration::from_secs(u64::MAX)).unwrap();
        ca.issue(&sans(), Duration::from_secs(u64::MAX)).unwrap();
    }

    #[test]
    fn service_sans_are_the_four_service_names() {
        assert_eq!(
            service_sans("svc", "ns", "cluster.local"),
            ["svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local"]
        );
    }
}
