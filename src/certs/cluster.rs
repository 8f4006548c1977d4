//! `canary-injector certs --secret`: keep the webhook's TLS Secret and the
//! `caBundle` of its MutatingWebhookConfiguration current, in-cluster.
//!
//! What it calls (and what `deploy/base/rbac.yaml` grants):
//! - `GET` the Secret; `POST` (create) it when absent; `PUT` (replace, with
//!   the `resourceVersion` read, so a concurrent writer gets 409) when the
//!   serving certificate must be renewed.
//! - `GET` the MutatingWebhookConfiguration and, when a `caBundle` differs,
//!   `PATCH` it with an RFC 6902 JSON Patch that sets
//!   `/webhooks/<i>/clientConfig/caBundle`, each guarded by a `test` of
//!   `/webhooks/<i>/name`. A JSON Patch, not a merge patch (which would
//!   replace the whole `webhooks` list) nor a `PUT` of the typed object
//!   (which would drop fields newer than our k8s-openapi).
//!
//! Conflicts (409 from a racing Job or CronJob run, 422 from a failed `test`)
//! make the step start over from a fresh read, up to [`ATTEMPTS`] times.
//!
//! The CA is kept across renewals, so the `caBundle` changes only when the
//! CA itself is replaced (unreadable, or within `--renew-before` of expiry).
//! Then the new serving certificate and the new bundle reach the apiserver a
//! few seconds apart (Secret volume refresh, webhook reload): calls made in
//! that window fail TLS verification and follow the `failurePolicy`.

use std::collections::BTreeMap;

use base64::Engine as _;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use kube::{Api, Client};
use serde_json::json;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::plan::{CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, load_ca};
use super::{
    Bundle, CA_COMMON_NAME, Ca, CertError, Lifetimes, RenewReason, SecretAction, SecretData,
    plan_secret,
};

/// How many times a step is tried when it meets a concurrent writer.
pub const ATTEMPTS: u32 = 3;

/// The Secret type the pods mount.
const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// What to keep current.
#[derive(Debug, Clone)]
pub struct Target {
    /// Namespace of the Secret (the webhook's namespace).
    pub namespace: String,
    /// Name of the TLS Secret.
    pub secret: String,
    /// Name of the MutatingWebhookConfiguration whose webhooks get the
    /// `caBundle`.
    pub webhook_configuration: String,
    /// DNS names of the serving certificate ([`super::service_sans`]).
    pub sans: Vec<String>,
    /// Validity and renewal window.
    pub lifetimes: Lifetimes,
}

/// What happened to the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOutcome {
    /// It did not exist and was created with a new CA.
    Created,
    /// It was valid; nothing was written.
    Unchanged,
    /// A new serving certificate was written.
    Renewed {
        /// The CA was replaced too (so the `caBundle` changed).
        new_ca: bool,
        /// Why the old certificate could not stay.
        reason: RenewReason,
    },
}

/// What happened to the webhook configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaBundleOutcome {
    /// This many webhooks got the CA as their `caBundle`.
    Patched {
        /// Number of webhooks changed.
        webhooks: usize,
    },
    /// Every webhook already had it; nothing was written.
    Unchanged,
}

/// The result of [`ensure`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What happened to the Secret.
    pub secret: SecretOutcome,
    /// What happened to the webhook configuration.
    pub ca_bundle: CaBundleOutcome,
    /// The CA certificate (PEM) now in the Secret and the `caBundle`.
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
    /// Another writer kept changing the object.
    #[error("gave up on {what} after {ATTEMPTS} conflicting concurrent updates")]
    Conflict {
        /// The object, e.g. `Secret ns/name`.
        what: String,
        /// The last conflict.
        #[source]
        source: kube::Error,
    },
    /// Certificates could not be made.
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// Makes sure the Secret holds a valid CA and serving certificate, then that
/// every webhook of the configuration trusts that CA. Logs one line per
/// action.
pub async fn ensure(client: Client, target: &Target) -> Result<Outcome, ClusterError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let (secret, ca_cert_pem) = ensure_secret(&secrets, target).await?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let ca_bundle = ensure_ca_bundle(&configs, &target.webhook_configuration, &ca_cert_pem).await?;
    Ok(Outcome {
        secret,
        ca_bundle,
        ca_cert_pem,
    })
}

/// The Secret step of [`ensure`]; returns what it did and the CA PEM.
pub async fn ensure_secret(
    api: &Api<Secret>,
    target: &Target,
) -> Result<(SecretOutcome, String), ClusterError> {
    let what = format!("Secret {}/{}", target.namespace, target.secret);
    let lifetimes = &target.lifetimes;
    let mut last_conflict = None;
    for attempt in 1..=ATTEMPTS {
        let existing = api
            .get_opt(&target.secret)
            .await
            .map_err(|source| ClusterError::Api {
                action: format!("get {what}"),
                source,
            })?;
        let data = existing.as_ref().map(secret_data);
        let now = OffsetDateTime::now_utc();
        let action = plan_secret(data.as_ref(), now, &target.sans, lifetimes.renew_before);
        let (ca, new_ca, reason) = match action {
            SecretAction::Keep => {
                let ca_pem = data.and_then(|d| d.ca_crt).unwrap_or_default();
                info!(secret = %what, "TLS secret unchanged: certificate valid");
                return Ok((
                    SecretOutcome::Unchanged,
                    String::from_utf8_lossy(&ca_pem).into_owned(),
                ));
            }
            SecretAction::Create => (new_ca(lifetimes)?, true, None),
            SecretAction::Renew { keep_ca, reason } => {
                let kept = keep_ca
                    .then(|| {
                        let d = data.as_ref()?;
                        load_ca(d.ca_crt.as_deref()?, d.ca_key.as_deref()?).ok()
                    })
                    .flatten();
                match kept {
                    Some(ca) => (ca, false, Some(reason)),
                    None => (new_ca(lifetimes)?, true, Some(reason)),
                }
            }
        };
        let bundle = ca.issue(&target.sans, lifetimes.validity)?;
        let result = match existing {
            None => {
                let secret = new_secret(target, &bundle);
                api.create(&PostParams::default(), &secret)
                    .await
                    .map(|_| SecretOutcome::Created)
                    .map_err(|e| (e, "create"))
            }
            Some(mut secret) => {
                let reason = reason.unwrap_or(RenewReason::Missing(TLS_CRT));
                if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
                    warn!(secret = %what, r#type = ?secret.type_, "TLS secret has an unexpected type; keeping it (type is immutable)");
                }
                let entries = secret.data.get_or_insert_with(BTreeMap::new);
                entries.extend(bundle_entries(&bundle));
                secret.string_data = None;
                // `secret.metadata.resource_version` is the one just read: the
                // apiserver refuses the write with 409 if anyone wrote since.
                api.replace(&target.secret, &PostParams::default(), &secret)
                    .await
                    .map(|_| SecretOutcome::Renewed { new_ca, reason })
                    .map_err(|e| (e, "replace"))
            }
        };
        match result {
            Ok(outcome) => {
                match &outcome {
                    SecretOutcome::Created => {
                        info!(secret = %what, "TLS secret created with a new CA");
                    }
                    SecretOutcome::Renewed { new_ca, reason } => {
                        info!(secret = %what, %reason, new_ca, "TLS secret renewed");
                    }
                    SecretOutcome::Unchanged => {}
                }
                return Ok((outcome, bundle.ca_cert_pem));
            }
            Err((e, verb)) if api_code(&e) == Some(409) => {
                // Create: a racing Job/CronJob made it first. Replace: someone
                // wrote since our read. Either way: read again and re-decide.
                warn!(secret = %what, attempt, verb, "TLS secret changed concurrently; reading it again");
                last_conflict = Some(e);
            }
            Err((source, verb)) => {
                return Err(ClusterError::Api {
                    action: format!("{verb} {what}"),
                    source,
                });
            }
        }
    }
    Err(conflict(what, last_conflict))
}

/// The `caBundle` step of [`ensure`]: sets `clientConfig.caBundle` of every
/// webhook in configuration `name` to `ca_pem`, unless all have it already.
pub async fn ensure_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<CaBundleOutcome, ClusterError> {
    let what = format!("MutatingWebhookConfiguration {name}");
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut last_conflict = None;
    for attempt in 1..=ATTEMPTS {
        let config = api
            .get_opt(name)
            .await
            .map_err(|source| ClusterError::Api {
                action: format!("get {what}"),
                source,
            })?
            .ok_or_else(|| ClusterError::WebhookConfigurationNotFound(name.to_owned()))?;
        let webhooks = config.webhooks.unwrap_or_default();
        if webhooks.is_empty() {
            warn!(configuration = %what, "webhook configuration has no webhooks; nothing to patch");
        }
        let mut ops = Vec::new();
        for (i, webhook) in webhooks.iter().enumerate() {
            if webhook
                .client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.as_slice())
                == Some(ca_pem.as_bytes())
            {
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
        }
        if ops.is_empty() {
            info!(configuration = %what, "caBundle unchanged");
            return Ok(CaBundleOutcome::Unchanged);
        }
        let patched = ops.len() / 2;
        let patch = Patch::Json::<()>(json_patch::Patch(ops));
        match api.patch(name, &PatchParams::default(), &patch).await {
            Ok(_) => {
                info!(configuration = %what, webhooks = patched, "caBundle patched");
                return Ok(CaBundleOutcome::Patched { webhooks: patched });
            }
            // 409: a concurrent write; 422: a `test` failed because the list
            // changed under us. Read again and rebuild the patch.
            Err(e) if matches!(api_code(&e), Some(409 | 422)) => {
                warn!(configuration = %what, attempt, error = %e, "webhook configuration changed concurrently; reading it again");
                last_conflict = Some(e);
            }
            Err(source) => {
                return Err(ClusterError::Api {
                    action: format!("patch {what}"),
                    source,
                });
            }
        }
    }
    Err(conflict(what, last_conflict))
}

/// The error after [`ATTEMPTS`] conflicts. Every path that loops again
/// records its conflict first, so `last` is always set.
fn conflict(what: String, last: Option<kube::Error>) -> ClusterError {
    let source = last.unwrap_or_else(|| {
        kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        )
    });
    ClusterError::Conflict { what, source }
}

fn new_ca(lifetimes: &Lifetimes) -> Result<Ca, CertError> {
    Ca::generate(CA_COMMON_NAME, lifetimes.ca_validity)
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The four entries of a Secret as [`SecretData`].
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

fn bundle_entries(bundle: &Bundle) -> [(String, ByteString); 4] {
    let entry = |k: &str, v: &str| (k.to_owned(), ByteString(v.as_bytes().to_vec()));
    [
        entry(TLS_CRT, &bundle.cert_pem),
        entry(TLS_KEY, &bundle.key_pem),
        entry(CA_CRT, &bundle.ca_cert_pem),
        entry(CA_KEY, &bundle.ca_key_pem),
    ]
}

fn new_secret(target: &Target, bundle: &Bundle) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(target.secret.clone()),
            namespace: Some(target.namespace.clone()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_owned(),
                    "canary-injector".to_owned(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "canary-injector-certs".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(TLS_SECRET_TYPE.to_owned()),
        data: Some(bundle_entries(bundle).into_iter().collect()),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests;
