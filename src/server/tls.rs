//! Serving certificate: load PEM files, validate them, serve them through a
//! resolver that can be swapped while running (hot reload).
//!
//! Reload polls the files and compares bytes instead of watching inotify
//! events: a Kubernetes Secret volume is updated by an atomic swap of its
//! `..data` symlink, which path watches miss. A pair that fails to load is
//! refused with a log line and the old one stays in service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Why a certificate/key pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PEM had no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not fit the certificate, or the crypto provider rejects it.
    #[error("{cert} / {key}: {source}")]
    Key {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The server configuration could not be built.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A loaded pair plus what was read, to detect changes.
#[derive(Clone)]
pub struct Loaded {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// Not-after of the leaf certificate, unix seconds (`None` if unparsable).
    pub not_after: Option<i64>,
    cert_bytes: Vec<u8>,
    key_bytes: Vec<u8>,
}

/// Where the serving certificate and key live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads and validates the pair: PEM parses, key matches certificate.
pub fn load(paths: &CertPaths, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let cert_bytes = read(&paths.cert)?;
    let key_bytes = read(&paths.key)?;
    parse(paths, provider, cert_bytes, key_bytes)
}

fn parse(
    paths: &CertPaths,
    provider: &CryptoProvider,
    cert_bytes: Vec<u8>,
    key_bytes: Vec<u8>,
) -> Result<Loaded, TlsError> {
    let pem_err = |path: &Path, reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&paths.cert, format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(pem_err(&paths.cert, "no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| pem_err(&paths.key, format!("no usable private key: {e}")))?;
    let not_after = leaf_not_after(&chain[0]);
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Key {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
        cert_bytes,
        key_bytes,
    })
}

/// Not-after of a DER certificate as unix seconds.
pub fn leaf_not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Serves the current pair; [`Reloader::reload_if_changed`] swaps it.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    /// A resolver serving `loaded`.
    pub fn new(loaded: &Loaded) -> Self {
        Self {
            current: RwLock::new(loaded.key.clone()),
        }
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a panic while swapping an Arc; the value
        // is still a valid pair.
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = key;
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A rustls server configuration for the webhook: TLS 1.2+, ALPN `h2` then
/// `http/1.1`, certificates from `resolver`.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Outcome of one reload check.
#[derive(Debug)]
pub enum Reload {
    /// Files unchanged.
    Unchanged,
    /// A new pair is being served; its not-after.
    Swapped(Option<i64>),
    /// The files changed but the new pair is broken; the old one stays.
    Refused(TlsError),
}

/// Watches a pair of files and swaps the resolver's pair when they change.
pub struct Reloader {
    paths: CertPaths,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    last: (Vec<u8>, Vec<u8>),
}

impl Reloader {
    /// Starts from the pair `loaded` (already being served by `resolver`).
    pub fn new(
        paths: CertPaths,
        provider: Arc<CryptoProvider>,
        resolver: Arc<Resolver>,
        loaded: &Loaded,
    ) -> Self {
        Self {
            paths,
            provider,
            resolver,
            last: (loaded.cert_bytes.clone(), loaded.key_bytes.clone()),
        }
    }

    /// Reads both files; if either changed, validates and swaps. A broken pair
    /// (half-written files, a key that does not match) is refused and will be
    /// tried again when the files change again.
    pub fn reload_if_changed(&mut self) -> Reload {
        let (cert, key) = match (read(&self.paths.cert), read(&self.paths.key)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => return Reload::Refused(e),
        };
        if (cert.as_slice(), key.as_slice()) == (self.last.0.as_slice(), self.last.1.as_slice()) {
            return Reload::Unchanged;
        }
        let result = parse(&self.paths, &self.provider, cert.clone(), key.clone());
        // Remember what was seen either way, so a broken pair is reported once.
        self.last = (cert, key);
        match result {
            Ok(loaded) => {
                self.resolver.set(loaded.key);
                Reload::Swapped(loaded.not_after)
            }
            Err(e) => Reload::Refused(e),
        }
    }

    /// Polls every `interval` until `shutdown`, logging swaps and refusals
    /// and calling `on_swap` with the new not-after.
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: CancellationToken,
        on_swap: impl Fn(Option<i64>) + Send,
    ) {
        let mut refused_logged = false;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // File reads and PEM parsing block: keep them off the async
            // workers that serve reviews.
            let (reloader, outcome) = match tokio::task::spawn_blocking(move || {
                let outcome = self.reload_if_changed();
                (self, outcome)
            })
            .await
            {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled: only when the runtime shuts down.
                Err(_) => return,
            };
            self = reloader;
            match outcome {
                Reload::Unchanged => {}
                Reload::Swapped(not_after) => {
                    refused_logged = false;
                    tracing::info!(cert = %self.paths.cert.display(), not_after, "serving certificate reloaded");
                    on_swap(not_after);
                }
                Reload::Refused(error) => {
                    if !refused_logged {
                        tracing::warn!(%error, cert = %self.paths.cert.display(), "new certificate refused; still serving the previous one");
                    }
                    refused_logged = true;
                }
            }
        }
    }
}
