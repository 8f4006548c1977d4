//! `canary-injector certs --secret`: keep the webhook's TLS Secret, its CA
//! Secret and the `caBundle` of its MutatingWebhookConfiguration current,
//! in-cluster.
//!
//! Two Secrets, so the CA key never sits in the Secret the pods mount:
//! - the **CA Secret** (`--ca-secret`, type `Opaque`): `ca.crt`, `ca.key`;
//!   mounted by no pod;
//! - the **TLS Secret** (`--secret`, type `kubernetes.io/tls`): `tls.crt`,
//!   `tls.key`, and `ca.crt` for reference.
//!
//! Each run reads both Secrets and the configuration, asks
//! [`plan_rotation`] what to do, and does it in this order: the CA Secret,
//! the `caBundle`s, the TLS Secret, the removal of a `ca.key` left in the
//! TLS Secret by an older version. So the apiserver trusts a new CA before
//! any pod can serve a certificate signed by it, and keeps trusting the old
//! one until a later run (see [`plan_rotation`] for the states).
//!
//! What it calls (and what `deploy/base/rbac.yaml` grants, by name):
//! - `GET` both Secrets and the MutatingWebhookConfiguration.
//! - Secrets are written by server-side apply (`PATCH`,
//!   `application/apply-patch+yaml`, field manager [`FIELD_MANAGER`],
//!   `force=true`): a `PATCH` that creates is authorized as `create` *with
//!   the object's name*, so RBAC can limit `create` to these two Secrets. An
//!   update carries the `resourceVersion` read, so a concurrent writer makes
//!   it fail with 409 instead of being overwritten. (A create cannot carry
//!   one; two runs that both find no Secret both write it, and the next run
//!   converges: the `caBundle` only ever gains CAs within a run, so neither
//!   CA is distrusted while it may be served.)
//! - `ca.key` is removed from the TLS Secret with a JSON Patch: a `test` of
//!   the `resourceVersion`, then a `remove` (server-side apply cannot remove
//!   a key another manager wrote).
//! - The `caBundle`s are set with one JSON Patch: a `test` of the
//!   configuration's `resourceVersion`, then per webhook a `test` of its name
//!   and an `add` of `/webhooks/<i>/clientConfig/caBundle`. Not a merge patch
//!   (which would replace the whole `webhooks` list) nor a `PUT` of the typed
//!   object (which would drop fields newer than our k8s-openapi).
//!
//! A conflict (409, or 422 from a failed `test`) starts the whole run again
//! from a fresh read, up to [`ATTEMPTS`] times.

use std::collections::BTreeMap;

use base64::Engine as _;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::ObjectMeta;
use kube::{Api, Client};
use serde_json::json;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::plan::{CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, load_ca};
use super::{
    BUNDLE_OVERLAP, BundleStep, CA_COMMON_NAME, Ca, CaStep, CertError, Lifetimes, Observed,
    RenewReason, SecretData, TlsStep, Wanted, bundle_pem, plan_rotation,
};

/// How many times a run is tried when it meets a concurrent writer.
pub const ATTEMPTS: u32 = 3;

/// The field manager of every server-side apply of `certs`.
pub const FIELD_MANAGER: &str = "canary-injector-certs";

/// The type of the TLS Secret the pods mount.
const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// The type of the CA Secret.
const CA_SECRET_TYPE: &str = "Opaque";

/// What to keep current.
#[derive(Debug, Clone)]
pub struct Target {
    /// Namespace of the Secrets (the webhook's namespace).
    pub namespace: String,
    /// Name of the TLS Secret the pods mount.
    pub secret: String,
    /// Name of the CA Secret (mounted by no pod).
    pub ca_secret: String,
    /// Name of the MutatingWebhookConfiguration whose webhooks get the
    /// `caBundle`.
    pub webhook_configuration: String,
    /// DNS names of the serving certificate ([`super::service_sans`]).
    pub sans: Vec<String>,
    /// Validity and renewal window.
    pub lifetimes: Lifetimes,
}

/// The default CA Secret name for TLS Secret `secret`: a trailing `-tls`
/// becomes `-ca` (`canary-injector-tls` gives `canary-injector-ca`), other
/// names get `-ca` appended.
pub fn default_ca_secret(secret: &str) -> String {
    match secret.strip_suffix("-tls") {
        Some(stem) if !stem.is_empty() => format!("{stem}-ca"),
        _ => format!("{secret}-ca"),
    }
}

/// What happened to the CA Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaOutcome {
    /// It held a usable CA; nothing was written.
    Unchanged,
    /// The CA an older version kept in the TLS Secret was copied into it.
    Moved,
    /// It did not exist; a new CA was written.
    Created,
    /// Its CA could not stay (why); a new CA was written.
    Replaced(RenewReason),
}

/// What happened to the webhooks' `caBundle`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaBundleOutcome {
    /// Every webhook trusted what it should; nothing was written.
    Unchanged,
    /// This many webhooks got the signing CA added (previous CAs kept).
    Published {
        /// Number of webhooks changed.
        webhooks: usize,
    },
    /// This many webhooks were left with the signing CA alone.
    Pruned {
        /// Number of webhooks changed.
        webhooks: usize,
    },
}

/// What happened to the TLS Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsOutcome {
    /// Its serving certificate was valid; nothing was written.
    Unchanged,
    /// It did not exist and was created.
    Created,
    /// A new serving certificate was written (why the old one could not
    /// stay).
    Renewed(RenewReason),
}

/// The result of [`ensure`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The CA Secret.
    pub ca: CaOutcome,
    /// The `caBundle`s.
    pub ca_bundle: CaBundleOutcome,
    /// The TLS Secret.
    pub tls: TlsOutcome,
    /// `ca.key` was removed from the TLS Secret.
    pub removed_tls_ca_key: bool,
    /// The signing CA's certificate (PEM), now in the CA Secret, in the TLS
    /// Secret's `ca.crt` and in every `caBundle`.
    pub ca_cert_pem: String,
}

/// Why [`ensure`] failed. All of these mean exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An API call failed.
    #[error("cannot {action}")]
    Api {
        /// What was being done, e.g. `get Secret ns/name`.
        action: String,
        /// The client's error (status, reason and message from the apiserver).
        #[source]
        source: kube::Error,
    },
    /// The MutatingWebhookConfiguration does not exist.
    #[error(
        "MutatingWebhookConfiguration {0} not found; apply the webhook configuration first (deploy/base/webhook.yaml)"
    )]
    WebhookConfigurationNotFound(String),
    /// Another writer kept changing the objects.
    #[error("gave up after {ATTEMPTS} conflicting concurrent updates ({what})")]
    Conflict {
        /// The last object in conflict, e.g. `Secret ns/name`.
        what: String,
        /// The last conflict.
        #[source]
        source: kube::Error,
    },
    /// A CA that passed the checks could not be loaded to sign with.
    #[error("cannot use the CA in {secret}: {reason}")]
    Ca {
        /// The Secret, e.g. `Secret ns/name`.
        secret: String,
        /// What is wrong with it.
        reason: RenewReason,
    },
    /// Certificates could not be made.
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// How one attempt ended without an outcome.
enum Stop {
    /// A concurrent writer: read again and re-plan.
    Conflict {
        what: String,
        source: kube::Error,
    },
    Fatal(ClusterError),
}

impl From<ClusterError> for Stop {
    fn from(e: ClusterError) -> Self {
        Self::Fatal(e)
    }
}

impl From<CertError> for Stop {
    fn from(e: CertError) -> Self {
        Self::Fatal(e.into())
    }
}

impl From<rcgen::Error> for Stop {
    fn from(e: rcgen::Error) -> Self {
        CertError::from(e).into()
    }
}

/// Makes sure the CA Secret holds a usable CA, every webhook of the
/// configuration trusts it, and the TLS Secret holds a valid serving
/// certificate signed by it; see the module documentation for the order and
/// the requests. Logs one line per action.
pub async fn ensure(client: Client, target: &Target) -> Result<Outcome, ClusterError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match run_once(&secrets, &configs, target).await {
            Ok(outcome) => return Ok(outcome),
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Conflict { what, source }) => {
                warn!(object = %what, attempt, error = %source, "changed concurrently; reading everything again");
                last = Some((what, source));
            }
        }
    }
    let (what, source) = last.unwrap_or_else(|| {
        let status = kube::core::Status::failure("conflict", "Conflict").with_code(409);
        (String::new(), kube::Error::Api(status.boxed()))
    });
    Err(ClusterError::Conflict { what, source })
}

/// One read-plan-write pass of [`ensure`].
async fn run_once(
    secrets: &Api<Secret>,
    configs: &Api<MutatingWebhookConfiguration>,
    target: &Target,
) -> Result<Outcome, Stop> {
    let tls_name = format!("Secret {}/{}", target.namespace, target.secret);
    let ca_name = format!("Secret {}/{}", target.namespace, target.ca_secret);
    let config_name = format!(
        "MutatingWebhookConfiguration {}",
        target.webhook_configuration
    );
    let tls = get(secrets, &target.secret, &tls_name).await?;
    let ca_secret = get(secrets, &target.ca_secret, &ca_name).await?;
    let config = get(configs, &target.webhook_configuration, &config_name)
        .await?
        .ok_or_else(|| {
            ClusterError::WebhookConfigurationNotFound(target.webhook_configuration.clone())
        })?;

    let tls_data = tls.as_ref().map(secret_data);
    let ca_data = ca_secret.as_ref().map(secret_data);
    let webhooks = config.webhooks.as_deref().unwrap_or_default();
    if webhooks.is_empty() {
        warn!(configuration = %config_name, "webhook configuration has no webhooks; no caBundle to set");
    }
    let bundles: Vec<Vec<u8>> = webhooks
        .iter()
        .map(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.clone())
                .unwrap_or_default()
        })
        .collect();
    let now = OffsetDateTime::now_utc();
    let plan = plan_rotation(
        &Observed {
            ca: ca_data.as_ref(),
            tls: tls_data.as_ref(),
            bundles: &bundles,
        },
        &Wanted {
            sans: &target.sans,
            renew_before: target.lifetimes.renew_before,
            now,
        },
    );

    // 1. The CA Secret.
    let (ca, ca_outcome) = match plan.ca {
        CaStep::Keep => {
            let ca = load(ca_data.as_ref(), &ca_name)?;
            info!(secret = %ca_name, "CA secret unchanged: CA valid");
            (ca, CaOutcome::Unchanged)
        }
        CaStep::MoveFromTls => {
            let ca = load(tls_data.as_ref(), &tls_name)?;
            apply_ca_secret(secrets, target, ca_secret.as_ref(), &ca, &ca_name).await?;
            info!(secret = %ca_name, from = %tls_name, "CA moved out of the TLS secret");
            (ca, CaOutcome::Moved)
        }
        CaStep::New(reason) => {
            let ca = Ca::generate(CA_COMMON_NAME, target.lifetimes.ca_validity)?;
            apply_ca_secret(secrets, target, ca_secret.as_ref(), &ca, &ca_name).await?;
            let outcome = match reason {
                None => {
                    info!(secret = %ca_name, "CA secret created with a new CA");
                    CaOutcome::Created
                }
                Some(reason) => {
                    warn!(secret = %ca_name, %reason, "CA replaced; the previous CA stays in the caBundle until a later run");
                    CaOutcome::Replaced(reason)
                }
            };
            (ca, outcome)
        }
    };
    let ca_pem = ca.cert_pem().to_owned();

    // 2. The caBundles, before the TLS Secret can change.
    let ca_bundle = match &plan.bundle {
        BundleStep::Keep => {
            info!(configuration = %config_name, overlap_seconds = BUNDLE_OVERLAP.as_secs(), "caBundle unchanged");
            CaBundleOutcome::Unchanged
        }
        BundleStep::Publish { previous } => {
            let pem = bundle_pem(previous, &ca_pem);
            let webhooks = patch_ca_bundles(configs, &config, &pem, &config_name).await?;
            info!(configuration = %config_name, webhooks, previous = previous.len(), "caBundle published: the signing CA next to the CAs still trusted");
            CaBundleOutcome::Published { webhooks }
        }
        BundleStep::Prune => {
            let pem = bundle_pem(&[], &ca_pem);
            let webhooks = patch_ca_bundles(configs, &config, &pem, &config_name).await?;
            info!(configuration = %config_name, webhooks, "caBundle pruned to the signing CA");
            CaBundleOutcome::Pruned { webhooks }
        }
    };

    // 3. The TLS Secret.
    let mut tls_version = tls
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone());
    let tls_outcome = match plan.tls {
        TlsStep::Keep => {
            info!(secret = %tls_name, "TLS secret unchanged: certificate valid");
            TlsOutcome::Unchanged
        }
        TlsStep::Issue(reason) => {
            let bundle = ca.issue(&target.sans, target.lifetimes.validity)?;
            let entries = [
                entry(TLS_CRT, &bundle.cert_pem),
                entry(TLS_KEY, &bundle.key_pem),
                entry(CA_CRT, &bundle.ca_cert_pem),
            ];
            let desired = applied_secret(
                target,
                &target.secret,
                tls.as_ref(),
                TLS_SECRET_TYPE,
                entries,
            );
            let written = apply(secrets, &target.secret, &desired, &tls_name).await?;
            tls_version = written.metadata.resource_version;
            if tls.is_none() {
                info!(secret = %tls_name, "TLS secret created");
                TlsOutcome::Created
            } else {
                info!(secret = %tls_name, %reason, "TLS secret renewed");
                TlsOutcome::Renewed(reason)
            }
        }
    };

    // 4. No CA key in the Secret the pods mount.
    if plan.remove_tls_ca_key {
        let ops = vec![
            PatchOperation::Test(TestOperation {
                path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
                value: json!(tls_version.unwrap_or_default()),
            }),
            PatchOperation::Remove(RemoveOperation {
                path: PointerBuf::from_tokens(["data", CA_KEY]),
            }),
        ];
        let patch = Patch::Json::<()>(json_patch::Patch(ops));
        secrets
            .patch(&target.secret, &PatchParams::default(), &patch)
            .await
            .map_err(|e| classify(e, &tls_name, "patch"))?;
        info!(secret = %tls_name, ca_secret = %ca_name, "ca.key removed from the TLS secret");
    }

    Ok(Outcome {
        ca: ca_outcome,
        ca_bundle,
        tls: tls_outcome,
        removed_tls_ca_key: plan.remove_tls_ca_key,
        ca_cert_pem: ca_pem,
    })
}

/// The CA of `data` (which the plan found usable).
fn load(data: Option<&SecretData>, secret: &str) -> Result<Ca, ClusterError> {
    let ca_crt = data.and_then(|d| d.ca_crt.as_deref());
    let ca_key = data.and_then(|d| d.ca_key.as_deref());
    match (ca_crt, ca_key) {
        (Some(cert), Some(key)) => load_ca(cert, key),
        (None, _) => Err(RenewReason::Missing(CA_CRT)),
        (_, None) => Err(RenewReason::Missing(CA_KEY)),
    }
    .map_err(|reason| ClusterError::Ca {
        secret: secret.to_owned(),
        reason,
    })
}

async fn get<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<K>, Stop>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(|source| {
        Stop::Fatal(ClusterError::Api {
            action: format!("get {what}"),
            source,
        })
    })
}

/// A conflict (409, or 422 from a failed JSON Patch `test`) restarts the
/// run; anything else ends it.
fn classify(e: kube::Error, what: &str, verb: &str) -> Stop {
    match &e {
        kube::Error::Api(s) if matches!(s.code, 409 | 422) => Stop::Conflict {
            what: what.to_owned(),
            source: e,
        },
        _ => Stop::Fatal(ClusterError::Api {
            action: format!("{verb} {what}"),
            source: e,
        }),
    }
}

/// Server-side apply of `desired` (see the module documentation).
async fn apply(
    api: &Api<Secret>,
    name: &str,
    desired: &Secret,
    what: &str,
) -> Result<Secret, Stop> {
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
    .map_err(|e| classify(e, what, "apply"))
}

async fn apply_ca_secret(
    api: &Api<Secret>,
    target: &Target,
    existing: Option<&Secret>,
    ca: &Ca,
    what: &str,
) -> Result<(), Stop> {
    let entries = [entry(CA_CRT, ca.cert_pem()), entry(CA_KEY, ca.key_pem())];
    let desired = applied_secret(target, &target.ca_secret, existing, CA_SECRET_TYPE, entries);
    apply(api, &target.ca_secret, &desired, what)
        .await
        .map(drop)
}

/// The object a server-side apply sends: our labels, our data keys, and,
/// for an existing Secret, its `resourceVersion` (the precondition) and its
/// type (immutable; kept as found).
fn applied_secret<const N: usize>(
    target: &Target,
    name: &str,
    existing: Option<&Secret>,
    new_type: &str,
    entries: [(String, ByteString); N],
) -> Secret {
    let type_ = match existing {
        Some(s) => s.type_.clone(),
        None => Some(new_type.to_owned()),
    };
    if existing.is_some() && type_.as_deref() != Some(new_type) {
        warn!(secret = name, r#type = ?type_, "secret has an unexpected type; keeping it (type is immutable)");
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(target.namespace.clone()),
            resource_version: existing.and_then(|s| s.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_owned(),
                    "canary-injector".to_owned(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_,
        data: Some(entries.into_iter().collect()),
        ..Secret::default()
    }
}

/// Sets `clientConfig.caBundle` of every webhook whose bundle is not `pem`,
/// in one JSON Patch guarded by the configuration's `resourceVersion`.
/// Returns how many webhooks changed.
async fn patch_ca_bundles(
    api: &Api<MutatingWebhookConfiguration>,
    config: &MutatingWebhookConfiguration,
    pem: &str,
    what: &str,
) -> Result<usize, Stop> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(pem);
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
        value: json!(config.metadata.resource_version.clone().unwrap_or_default()),
    })];
    let mut changed = 0;
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        let current = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice());
        if current == Some(pem.as_bytes()) {
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", &index, "name"]),
            value: json!(webhook.name),
        }));
        // `add` sets a member whether or not it exists yet.
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", &index, "clientConfig", "caBundle"]),
            value: json!(encoded),
        }));
        changed += 1;
    }
    if changed == 0 {
        return Ok(0);
    }
    let name = config.metadata.name.as_deref().unwrap_or_default();
    let patch = Patch::Json::<()>(json_patch::Patch(ops));
    api.patch(name, &PatchParams::default(), &patch)
        .await
        .map_err(|e| classify(e, what, "patch"))?;
    Ok(changed)
}

fn entry(key: &str, pem: &str) -> (String, ByteString) {
    (key.to_owned(), ByteString(pem.as_bytes().to_vec()))
}

/// The `certs` entries of a Secret as [`SecretData`].
pub fn secret_data(secret: &Secret) -> SecretData {
    let get = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
    };
    SecretData {
        tls_crt: get(TLS_CRT),
        tls_key: get(TLS_KEY),
        ca_crt: get(CA_CRT),
        ca_key: get(CA_KEY),
    }
}

#[cfg(test)]
mod tests;
