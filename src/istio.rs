//! Which Istio version the cluster injects, learned without configuration:
//! every replica watches Istio's sidecar injector ConfigMaps (by name, in
//! `istio.injectorNamespace`) and keeps the version in memory
//! ([`InjectorVersion`]); the admission path copies it into
//! `ClusterView::injector_version` without any I/O. The core uses it for
//! pods that are not injected yet, after the pod's own proxy image and
//! config `istio.proxyVersion` (see [`crate::mutate::bootstrap`]).
//!
//! ```text
//!  every replica:  watch ConfigMaps in istio-system, one watch per name
//!                  (fieldSelector metadata.name=istio-sidecar-injector, ...)
//!                    --> values.global.tag (or the tag of global.proxy.image)
//!                    --> agree() --> InjectorVersion (an atomic)
//!                    --> ClusterView::injector_version   (admission path)
//! ```
//!
//! Why the injector ConfigMap and not istiod's Deployment image: the
//! injector renders the sidecar from this ConfigMap, so its
//! `values.global.tag` is the proxy version pods get (istiod's image
//! usually agrees, but the proxy image can be set apart); it exists in this
//! shape from Istio 1.5 (istiod) on; and RBAC can limit the read to it by
//! name (`resourceNames` plus the `metadata.name` field selector), where
//! revisioned istiod Deployments could only be found by listing every
//! Deployment.
//!
//! Several injectors (one per revision: `istio-sidecar-injector-1-20`, ...)
//! may be listed in `istio.injectorConfigMaps`. Pods are not told apart by
//! revision here, so [`agree`] gives one answer for all: when every listed
//! injector that exists has a readable version and they share a
//! [`KeepaliveForm`](crate::mutate::KeepaliveForm), the lowest (what canary-injector does depends only on
//! the form); otherwise (none found, one unreadable, forms differ) unknown,
//! and pods not injected yet are skipped, counted as
//! `istio-version-unknown`, unless config `istio.proxyVersion` says which
//! version to assume.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::mutate::Version;
use crate::mutate::version::{image_tag, parse_version};
use crate::task::TaskError;

/// The ConfigMap key holding the injector's Helm values (JSON).
pub const VALUES_KEY: &str = "values";

// === settings ===

/// What the watch needs from [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectSettings {
    /// Namespace of the injector ConfigMaps (`istio.injectorNamespace`).
    pub namespace: String,
    /// Their names (`istio.injectorConfigMaps`).
    pub config_maps: Vec<String>,
}

impl DetectSettings {
    /// The settings for `cfg`; `None` when nothing needs a version (the
    /// bootstrap fix is off) or no ConfigMap is listed.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        if !cfg.bootstrap.enabled || cfg.istio.injector_config_maps.is_empty() {
            return None;
        }
        Some(Self {
            namespace: cfg.istio.injector_namespace.clone(),
            config_maps: cfg.istio.injector_config_maps.clone(),
        })
    }
}

// === pure: reading and combining versions ===

/// The proxy version an injector ConfigMap renders: the tag of
/// `values.global.proxy.image` when that is a full image reference (it has
/// a `/`, as Istio's template checks), else `values.global.tag`. `None`
/// when the ConfigMap has no readable version (no `values`, not JSON, a tag
/// such as `latest`).
pub fn injector_version(cm: &ConfigMap) -> Option<Version> {
    let text = cm.data.as_ref()?.get(VALUES_KEY)?;
    let values: Value = serde_json::from_str(text)
        .ok()
        .or_else(|| serde_saphyr::from_str(text).ok())?;
    let global = values.get("global")?;
    match global.pointer("/proxy/image").and_then(Value::as_str) {
        Some(image) if image.contains('/') => image_tag(image).and_then(parse_version),
        _ => global.get("tag")?.as_str().and_then(parse_version),
    }
}

/// One answer for every injector found (each `None` when its version is
/// unreadable): the lowest version when all are readable and share a
/// keepalive form, else `None` (also when there are none).
pub fn agree(found: impl IntoIterator<Item = Option<Version>>) -> Option<Version> {
    let mut lowest: Option<Version> = None;
    for version in found {
        let version = version?;
        lowest = match lowest {
            Some(l) if l.keepalive_form() != version.keepalive_form() => return None,
            Some(l) => Some(l.min(version)),
            None => Some(version),
        };
    }
    lowest
}

/// What the watches have seen: per listed name, the ConfigMap's version
/// when it exists (`Some(None)`: exists, unreadable).
#[derive(Debug, Default)]
struct Injectors {
    /// Per name: `None` absent, `Some(v)` present with version `v`.
    current: Vec<Option<Option<Version>>>,
    /// During a (re)list: what it has returned so far.
    pending: Vec<Option<Option<Version>>>,
    /// Whether each name's watch has completed a list.
    listed: Vec<bool>,
}

impl Injectors {
    fn new(names: usize) -> Self {
        Self {
            current: vec![None; names],
            pending: vec![None; names],
            listed: vec![false; names],
        }
    }

    /// Applies one event of watch `i`; true when the answer may have changed.
    fn apply(&mut self, i: usize, event: watcher::Event<ConfigMap>) -> bool {
        match event {
            watcher::Event::Init => {
                self.pending[i] = None;
                false
            }
            watcher::Event::InitApply(cm) => {
                self.pending[i] = Some(injector_version(&cm));
                false
            }
            watcher::Event::InitDone => {
                self.current[i] = self.pending[i].take();
                self.listed[i] = true;
                true
            }
            watcher::Event::Apply(cm) => {
                self.current[i] = Some(injector_version(&cm));
                true
            }
            watcher::Event::Delete(_) => {
                self.current[i] = None;
                true
            }
        }
    }

    /// The answer once every watch has listed; `None` before.
    fn answer(&self) -> Option<Option<Version>> {
        self.listed
            .iter()
            .all(|l| *l)
            .then(|| agree(self.current.iter().flatten().copied()))
    }
}

// === InjectorVersion: read by the admission path ===

/// Packed "unknown": no Istio version has this major and minor.
const UNKNOWN: u64 = u64::MAX;

fn pack(version: Option<Version>) -> u64 {
    version.map_or(UNKNOWN, |v| (u64::from(v.major) << 32) | u64::from(v.minor))
}

fn unpack(packed: u64) -> Option<Version> {
    (packed != UNKNOWN).then_some(Version {
        major: (packed >> 32) as u32,
        minor: packed as u32,
    })
}

/// The detected injector version, answered from memory (one atomic load).
/// Cheap to clone.
#[derive(Clone)]
pub struct InjectorVersion {
    inner: Option<Arc<VersionInner>>,
}

struct VersionInner {
    packed: AtomicU64,
    /// Set once every watch has listed; stays set while a broken watch
    /// re-lists (the last answer is kept).
    synced: AtomicBool,
}

impl InjectorVersion {
    /// For when nothing is watched: always unknown, never synced.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// The version every listed injector agrees on, if any.
    pub fn get(&self) -> Option<Version> {
        self.inner
            .as_ref()
            .and_then(|i| unpack(i.packed.load(Ordering::Acquire)))
    }

    /// False for [`InjectorVersion::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True once every listed ConfigMap has been looked up.
    pub fn is_synced(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.synced.load(Ordering::Acquire))
    }
}

impl fmt::Debug for InjectorVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("InjectorVersion(disabled)"),
            Some(_) => f
                .debug_struct("InjectorVersion")
                .field("version", &self.get())
                .field("synced", &self.is_synced())
                .finish(),
        }
    }
}

// === VersionWatch: every replica ===

/// The watches that fill an [`InjectorVersion`].
pub struct VersionWatch {
    api: Api<ConfigMap>,
    settings: DetectSettings,
    inner: Arc<VersionInner>,
}

/// Builds the (unknown, unsynced) version and the watch that fills it.
pub fn watch(client: Client, settings: DetectSettings) -> (InjectorVersion, VersionWatch) {
    let inner = Arc::new(VersionInner {
        packed: AtomicU64::new(UNKNOWN),
        synced: AtomicBool::new(false),
    });
    let watch = VersionWatch {
        api: Api::namespaced(client, &settings.namespace),
        settings,
        inner: inner.clone(),
    };
    (InjectorVersion { inner: Some(inner) }, watch)
}

impl VersionWatch {
    /// Watches until `shutdown`: one watch per listed name, each with a
    /// `metadata.name` field selector (what RBAC `resourceNames` allows). A
    /// failing watch (RBAC missing, apiserver down) is retried with
    /// exponential backoff and logged; it never ends the task, and the
    /// version stays what it was (unknown until first seen).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TaskError> {
        let VersionWatch {
            api,
            settings,
            inner,
        } = self;
        let names = &settings.config_maps;
        let streams = names.iter().enumerate().map(|(i, name)| {
            let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
            watcher(api.clone(), wc)
                .default_backoff()
                .map(move |event| (i, event))
                .boxed()
        });
        let mut events = futures::stream::select_all(streams);
        let mut injectors = Injectors::new(names.len());
        let mut published: Option<Option<Version>> = None;
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                event = events.next() => event,
            };
            match event {
                // Watcher streams never end; stop if they somehow do.
                None => break,
                Some((i, Ok(event))) => {
                    if !injectors.apply(i, event) {
                        continue;
                    }
                    let Some(answer) = injectors.answer() else {
                        continue;
                    };
                    inner.packed.store(pack(answer), Ordering::Release);
                    inner.synced.store(true, Ordering::Release);
                    if published != Some(answer) {
                        published = Some(answer);
                        log_answer(names, &injectors, answer, &settings.namespace);
                    }
                }
                Some((i, Err(error))) => {
                    warn!(
                        %error,
                        namespace = %settings.namespace,
                        config_map = %names[i],
                        "Istio injector ConfigMap watch failed; retrying with backoff"
                    );
                }
            }
        }
        debug!("Istio injector ConfigMap watch stopped");
        Ok(())
    }
}

/// One line per change of the answer, with what each injector said.
fn log_answer(names: &[String], injectors: &Injectors, answer: Option<Version>, namespace: &str) {
    let seen: BTreeMap<&str, String> = names
        .iter()
        .zip(&injectors.current)
        .map(|(name, found)| {
            let said = match found {
                None => "absent".to_owned(),
                Some(None) => "unreadable".to_owned(),
                Some(Some(v)) => v.to_string(),
            };
            (name.as_str(), said)
        })
        .collect();
    match answer {
        Some(version) => info!(
            %version,
            namespace,
            injectors = ?seen,
            "Istio injector version detected"
        ),
        None => info!(
            namespace,
            injectors = ?seen,
            "Istio injector version unknown; pods not injected yet get no keepalive fix \
             unless istio.proxyVersion is set"
        ),
    }
}

#[cfg(test)]
mod tests;
