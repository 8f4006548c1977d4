//! `AdmissionReview` (v1 and v1beta1) in, `AdmissionReview` out, around
//! the pure core in [`crate::mutate`]. No HTTP types here: the server and the
//! tests call [`review`] with body bytes.
//!
//! Own request/response types rather than `kube::core::admission`, which
//! models v1 only and serialises the patch as an array of numbers instead of
//! base64 (kube-rs issue 1781). The object is kept as raw JSON and only the
//! fields the core needs are read from it.
//!
//! Spec: <https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#request>

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

mod reader;

use crate::config::Config;
use crate::mutate::{
    self, BootstrapOutcome, ClusterView, Decision, Deny, Kind, Mode, ObjectView, Operation,
    OwnerRef, OwnerTag, SkipReason, Subject,
};

/// What the core may know about the cluster, from caches (never I/O): per
/// namespace, whether the bootstrap ConfigMap exists there and the Istio
/// version the injector injects ([`ClusterView`]); per object, the tag the
/// workloads that own it ask for on their metadata ([`OwnerTag`]). A plain
/// `Fn(&str) -> ClusterView` knows no owners.
pub trait ClusterLookup: Send + Sync {
    /// What is known of `namespace`.
    fn view(&self, namespace: &str) -> ClusterView;

    /// The tag the owner chain of an object in `namespace` whose managing
    /// controller is `controller` asks for, if any is known.
    fn owner_tag(&self, namespace: &str, controller: &OwnerRef) -> Option<OwnerTag> {
        let _ = (namespace, controller);
        None
    }

    /// The workload at the top of the chain of an object whose managing
    /// controller is `controller` (a ReplicaSet's Deployment, a Job's
    /// CronJob), as far as known; else `controller` itself.
    fn workload(&self, namespace: &str, controller: &OwnerRef) -> OwnerRef {
        let _ = namespace;
        controller.clone()
    }

    /// False while owners are still being learnt: a decision now could miss
    /// a tag only an owner carries.
    fn owners_synced(&self) -> bool {
        true
    }
}

impl<F: Fn(&str) -> ClusterView + Send + Sync> ClusterLookup for F {
    fn view(&self, namespace: &str) -> ClusterView {
        self(namespace)
    }
}

/// The lookup admission and the backfill decide with.
pub type ConfigMapLookup = dyn ClusterLookup;

/// A lookup for when no cluster is known: [`ClusterView::UNKNOWN`].
pub fn no_cluster(_namespace: &str) -> ClusterView {
    ClusterView::UNKNOWN
}

/// `apiVersion` values the webhook answers.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"];

/// A request that is not a well-formed `AdmissionReview` at all: the server
/// answers HTTP 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON, or not the shape of an AdmissionReview.
    #[error("malformed AdmissionReview: {0}")]
    Json(#[source] serde_json::Error),
    /// The response could not be serialised (a bug, never user input).
    #[error("cannot serialise the response: {0}")]
    Serialize(#[source] serde_json::Error),
    /// An `apiVersion` other than admission.k8s.io/v1 or v1beta1.
    #[error(
        "unsupported apiVersion {0:?}; expected admission.k8s.io/v1 or admission.k8s.io/v1beta1"
    )]
    UnsupportedVersion(String),
    /// A `kind` other than `AdmissionReview`.
    #[error("unsupported kind {0:?}; expected AdmissionReview")]
    WrongKind(String),
    /// `request` does not have the shape of an AdmissionRequest.
    #[error("malformed AdmissionReview request: {0}")]
    Request(#[source] serde_json::Error),
    /// No `request` member.
    #[error("AdmissionReview has no request")]
    MissingRequest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<O> {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<RequestIn<O>>,
}

/// The object as the chosen path delivered it.
enum ObjectIn<'a> {
    Parsed(Box<ObjectView<'a>>),
    Raw(&'a RawValue),
}

impl<O> RequestIn<O> {
    fn map_object<P>(self, f: impl FnOnce(O) -> P) -> RequestIn<P> {
        RequestIn {
            uid: self.uid,
            kind: self.kind,
            sub_resource: self.sub_resource,
            name: self.name,
            namespace: self.namespace,
            operation: self.operation,
            dry_run: self.dry_run,
            object: self.object.map(f),
        }
    }
}

/// What the core gets to see of a request.
enum Input<'a> {
    /// A skip rule applies without reading the object.
    Skip(SkipReason),
    /// The object, to decide about.
    Object(Box<ObjectView<'a>>),
    /// No usable object: refused.
    Refuse(Deny),
}

/// Only the envelope, to explain a review that did not parse.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Reads the review with serde_json. A body that is UTF-8 (every real
/// review: JSON is UTF-8) is checked once and read as `str`, so serde_json
/// does not check each key and string it reads again; other bytes are read
/// as they always were (only the strings read are checked).
fn read_review(body: &[u8]) -> Result<ReviewIn<ObjectView<'_>>, serde_json::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// Parses the review with the object kept raw; on failure, says whether the
/// JSON, the envelope or the request is wrong.
fn parse_raw(body: &[u8]) -> Result<ReviewIn<&RawValue>, ReviewError> {
    match serde_json::from_slice::<ReviewIn<&RawValue>>(body) {
        Ok(parsed) => Ok(parsed),
        Err(error) if !error.is_data() || !body.trim_ascii_start().starts_with(b"{") => {
            Err(ReviewError::Json(error))
        }
        Err(error) => Err(match serde_json::from_slice::<EnvelopeIn>(body) {
            Ok(envelope) => match check_envelope(&envelope.api_version, &envelope.kind) {
                Err(envelope_error) => envelope_error,
                Ok(()) => ReviewError::Request(error),
            },
            Err(_) => ReviewError::Json(error),
        }),
    }
}

fn check_envelope(api_version: &str, kind: &str) -> Result<(), ReviewError> {
    if !SUPPORTED_VERSIONS.contains(&api_version) {
        return Err(ReviewError::UnsupportedVersion(api_version.to_owned()));
    }
    if kind != "AdmissionReview" {
        return Err(ReviewError::WrongKind(kind.to_owned()));
    }
    Ok(())
}

/// The request; `O` is how the object is read: parsed into the core's view
/// in the same pass (fast path), or kept raw (fallback, to tell a malformed
/// object apart from a malformed review).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<O> {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default)]
    dry_run: Option<bool>,
    // A missing Option field is None without `default` (which would
    // require `O: Default`).
    object: Option<O>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
struct StatusOut {
    code: u16,
    message: String,
}

/// How a review ended; the `outcome` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed with a patch.
    Patched,
    /// Allowed, nothing was missing.
    Allowed,
    /// Allowed untouched by a skip rule.
    Skipped(SkipReason),
    /// Refused with a message.
    Denied,
}

impl Outcome {
    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patched => "patched",
            Self::Allowed => "allowed",
            Self::Skipped(_) => "skipped",
            Self::Denied => "denied",
        }
    }
}

/// The answer to one review plus what logs and metrics need to know.
#[derive(Debug)]
pub struct Reviewed {
    /// The serialised `AdmissionReview` response (HTTP 200 body).
    pub body: Vec<u8>,
    /// `request.uid`.
    pub uid: String,
    /// `request.kind.kind`.
    pub kind: String,
    /// `request.kind` as an `apiVersion` (`apps/v1`, `v1`).
    pub api_version: String,
    /// `request.namespace`.
    pub namespace: String,
    /// `request.name`, else `metadata.generateName` + `*` (controller pods).
    pub name: String,
    /// `request.operation`.
    pub operation: String,
    /// `request.dryRun`.
    pub dry_run: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Number of patch operations.
    pub patch_ops: usize,
    /// Size of the JSON Patch before base64, in bytes.
    pub patch_bytes: usize,
    /// The deny message, when denied.
    pub denied: Option<String>,
    /// The deny's reason code ([`Deny::reason`]), when denied.
    pub deny_reason: Option<&'static str>,
    /// Warnings returned to the user.
    pub warnings: Vec<String>,
    /// The reason code of each warning ([`mutate::Warning::reason`]), in
    /// the same order.
    pub warning_reasons: Vec<&'static str>,
    /// The object's managing controller (its ownerReference with
    /// `controller: true`), when the object was read and the review has a
    /// warning or a deny to report: where Events about an object a
    /// controller created go, since nobody sees its warnings. `None`
    /// otherwise, so a quiet review copies nothing.
    pub owner: Option<OwnerRef>,
    /// What was changed, for the mutations metric.
    pub mutations: Vec<&'static str>,
    /// What the bootstrap part did, when considered.
    pub bootstrap: Option<BootstrapOutcome>,
}

/// Answers one `AdmissionReview` body. `Err` only when the body is not a
/// well-formed review (HTTP 400); anything about the object itself is a
/// review response (HTTP 200), possibly a deny.
pub fn review(
    body: &[u8],
    cfg: &Config,
    configmaps: &ConfigMapLookup,
) -> Result<Reviewed, ReviewError> {
    // Fast path: one pass over the body, the object read straight into the
    // core's view (unknown fields skipped once), by the fast reader; what it
    // does not take, serde_json reads (the same value, or its error).
    let parsed = match reader::from_slice::<ReviewIn<ObjectView>>(body) {
        Ok(parsed) => Ok(parsed),
        Err(reader::GiveUp) => read_review(body),
    };
    let (api_version, req): (String, RequestIn<ObjectIn<'_>>) = match parsed {
        Ok(parsed) => {
            check_envelope(&parsed.api_version, &parsed.kind)?;
            let req = parsed.request.ok_or(ReviewError::MissingRequest)?;
            (
                parsed.api_version,
                req.map_object(|o| ObjectIn::Parsed(Box::new(o))),
            )
        }
        // Fallback: keep the object raw, so a malformed object is a
        // deny (or a skip) rather than a malformed review.
        Err(_) => {
            let parsed = parse_raw(body)?;
            check_envelope(&parsed.api_version, &parsed.kind)?;
            let req = parsed.request.ok_or(ReviewError::MissingRequest)?;
            (parsed.api_version, req.map_object(ObjectIn::Raw))
        }
    };

    // The kind is only ours when the group matches too (a CRD may reuse
    // the name `Pod`).
    let kind = Kind::from_gvk(&req.kind.group, &req.kind.kind);
    let namespace = req.namespace.as_deref().unwrap_or_default();
    let subject = Subject {
        kind,
        operation: Operation::from_name(&req.operation),
        namespace,
        sub_resource: req.sub_resource.as_deref().unwrap_or_default(),
        mode: Mode::Admission,
        owner_tag: None,
    };
    let policy = cfg.policy();

    // The object is read only when no skip rule applies; the decision
    // borrows from it.
    let input = match mutate::pre_skip(&subject, policy) {
        Some(reason) => Input::Skip(reason),
        None => match req.object {
            None => Input::Refuse(Deny::MissingObject),
            Some(ObjectIn::Parsed(view)) => Input::Object(view),
            Some(ObjectIn::Raw(raw)) => match serde_json::from_str::<ObjectView>(raw.get()) {
                Ok(view) => Input::Object(Box::new(view)),
                Err(e) => Input::Refuse(Deny::MalformedObject {
                    kind: req.kind.kind.clone(),
                    reason: e.to_string(),
                }),
            },
        },
    };
    let owner_tag = match &input {
        Input::Object(object) => object
            .controller()
            .and_then(|c| configmaps.owner_tag(namespace, c)),
        _ => None,
    };
    let subject = Subject {
        owner_tag: owner_tag.as_ref(),
        ..subject
    };
    let decided: Result<Decision<'_>, Deny> = match &input {
        Input::Object(object) => {
            let cluster = configmaps.view(namespace);
            mutate::decide(&subject, object, policy, &cluster)
        }
        Input::Skip(reason) => Ok(Decision::skip(*reason)),
        Input::Refuse(deny) => Err(deny.clone()),
    };
    let generate_name = match &input {
        Input::Object(o) => o.metadata.as_ref().and_then(|m| m.generate_name.as_deref()),
        _ => None,
    };
    // Only a warning or a deny is reported on the owner: copy it only then.
    let reportable = match &decided {
        Ok(d) => !d.warnings.is_empty(),
        Err(_) => true,
    };
    let owner = match &input {
        Input::Object(o) if reportable => o.controller().cloned(),
        _ => None,
    };
    let name = match (req.name.as_deref(), generate_name) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(g)) => format!("{g}*"),
        _ => String::new(),
    };

    let (mutations, bootstrap) = match &decided {
        Ok(d) => (d.mutations().collect(), d.bootstrap_outcome()),
        Err(_) => (Vec::new(), None),
    };
    let deny_reason = decided.as_ref().err().map(Deny::reason);
    let warning_reasons = match &decided {
        Ok(d) => d.warnings.iter().map(mutate::Warning::reason).collect(),
        Err(_) => Vec::new(),
    };
    let (outcome, patch, status, warnings, patch_ops, patch_bytes) = match decided {
        Ok(decision) => {
            let warnings: Vec<String> = decision.warnings.iter().map(|w| w.to_string()).collect();
            let ops = decision.to_json_patch();
            if ops.is_empty() {
                let outcome = decision.skipped.map_or(Outcome::Allowed, Outcome::Skipped);
                (outcome, None, None, warnings, 0, 0)
            } else {
                let json = serde_json::to_vec(&ops).map_err(ReviewError::Serialize)?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&json);
                (
                    Outcome::Patched,
                    Some(b64),
                    None,
                    warnings,
                    ops.len(),
                    json.len(),
                )
            }
        }
        Err(deny) => {
            let status = StatusOut {
                code: 403,
                message: deny.to_string(),
            };
            (Outcome::Denied, None, Some(status), Vec::new(), 0, 0)
        }
    };
    let denied = status.as_ref().map(|s| s.message.clone());
    let out = ReviewOut {
        api_version: &api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid: &req.uid,
            allowed: outcome != Outcome::Denied,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            status,
            warnings: &warnings,
        },
    };
    let body = serde_json::to_vec(&out).map_err(ReviewError::Serialize)?;
    Ok(Reviewed {
        body,
        uid: req.uid,
        api_version: if req.kind.group.is_empty() {
            req.kind.version.clone()
        } else {
            format!("{}/{}", req.kind.group, req.kind.version)
        },
        kind: req.kind.kind,
        namespace: namespace.to_owned(),
        name,
        operation: req.operation,
        dry_run: req.dry_run.unwrap_or(false),
        outcome,
        patch_ops,
        patch_bytes,
        denied,
        deny_reason,
        warnings,
        warning_reasons,
        owner,
        mutations,
        bootstrap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn body(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn pod_review(version: &str, labels: Value) -> Value {
        json!({
            "apiVersion": version,
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"generateName": "web-", "labels": labels},
                           "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
            }
        })
    }

    fn response(r: &Reviewed) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn echoes_version_kind_and_uid() {
        for version in SUPPORTED_VERSIONS {
            let r = review(
                &body(&pod_review(version, json!({"app": "web"}))),
                &Config::default(),
                &no_cluster,
            )
            .unwrap();
            let out = response(&r);
            assert_eq!(out["apiVersion"], version);
            assert_eq!(out["kind"], "AdmissionReview");
            assert_eq!(
                out["response"]["uid"],
                "705ab4f5-6393-11e8-b7cc-42010a800002"
            );
            assert_eq!(out["response"]["allowed"], true);
            assert_eq!(out["response"]["patchType"], "JSONPatch");
            assert_eq!(r.name, "web-*");
        }
    }

    #[test]
    fn no_patch_means_no_patch_type() {
        let r = review(
            &body(&pod_review(
                "admission.k8s.io/v1",
                json!({"stage": "normal"}),
            )),
            &Config::default(),
            &no_cluster,
        )
        .unwrap();
        let out = response(&r);
        assert_eq!(r.outcome, Outcome::Allowed);
        assert!(out["response"].get("patchType").is_none());
        assert!(out["response"].get("patch").is_none());
    }

    #[test]
    fn not_a_review_is_an_error() {
        let cfg = Config::default();
        assert!(matches!(
            review(b"{", &cfg, &no_cluster),
            Err(ReviewError::Json(_))
        ));
        assert!(matches!(
            review(b"[]", &cfg, &no_cluster),
            Err(ReviewError::Json(_))
        ));
        let mut v = pod_review("admission.k8s.io/v2", json!({}));
        assert!(matches!(
            review(&body(&v), &cfg, &no_cluster),
            Err(ReviewError::UnsupportedVersion(s)) if s == "admission.k8s.io/v2"
        ));
        v["apiVersion"] = json!("admission.k8s.io/v1");
        v["kind"] = json!("Pod");
        assert!(matches!(
            review(&body(&v), &cfg, &no_cluster),
            Err(ReviewError::WrongKind(_))
        ));
        v["kind"] = json!("AdmissionReview");
        v.as_object_mut().unwrap().remove("request");
        assert!(matches!(
            review(&body(&v), &cfg, &no_cluster),
            Err(ReviewError::MissingRequest)
        ));
    }

    #[test]
    fn object_of_the_wrong_shape_is_denied() {
        let mut v = pod_review("admission.k8s.io/v1", json!({}));
        v["request"]["object"]["metadata"]["labels"] = json!("not-a-map");
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.outcome, Outcome::Denied);
        let out = response(&r);
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["code"], 403);
        let msg = out["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.starts_with("cannot read the Pod object"), "{msg}");
    }

    #[test]
    fn update_is_skipped_without_reading_the_object() {
        let mut v = pod_review("admission.k8s.io/v1", json!({}));
        v["request"]["operation"] = json!("UPDATE");
        v["request"]["object"] = json!("garbage that is not a pod");
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.outcome, Outcome::Skipped(SkipReason::Operation));
    }

    #[test]
    fn the_controller_owner_and_reason_codes_are_reported() {
        let mut v = pod_review("admission.k8s.io/v1", json!({}));
        let object = &mut v["request"]["object"]["metadata"];
        object["annotations"] = json!({"canary-injector.io/tag": "feature/x"});
        object["ownerReferences"] = json!([
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1"},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "2",
             "controller": true}]);
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        let owner = r.owner.as_ref().unwrap();
        assert_eq!(
            (&*owner.api_version, &*owner.kind, &*owner.name, &*owner.uid),
            ("apps/v1", "ReplicaSet", "web-abc", "2")
        );
        assert_eq!(r.warning_reasons, ["tag-rewritten"]);
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.deny_reason, None);

        v["request"]["object"]["metadata"]["annotations"] = json!({"canary-injector.io/tag": "-"});
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.deny_reason, Some("unusable-tag"));
        assert!(r.owner.is_some());
        assert!(r.warning_reasons.is_empty());

        // Nothing to report: the owner is not even copied.
        v["request"]["object"]["metadata"]["annotations"] = json!({"canary-injector.io/tag": "x"});
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.outcome, Outcome::Patched);
        assert!(r.warnings.is_empty() && r.deny_reason.is_none());
        assert!(r.owner.is_none());
    }

    #[test]
    fn bytes_that_are_not_utf8_in_fields_not_read_are_tolerated_as_before() {
        let v = pod_review("admission.k8s.io/v1", json!({"app": "web", "tier": "é"}));
        let text = String::from_utf8(body(&v)).unwrap();
        let utf8 = review(text.as_bytes(), &Config::default(), &no_cluster).unwrap();
        assert_eq!(utf8.outcome, Outcome::Patched);
        // A string the webhook skips holds a byte that is not UTF-8: read
        // through the fallback, with the same answer.
        let skipped = text.replacen("\"resource\":{", "\"junk\":\"\u{1}\",\"resource\":{", 1);
        let mut bytes = skipped.into_bytes();
        let at = bytes.iter().position(|&b| b == 1).unwrap();
        bytes[at] = 0xff;
        assert!(std::str::from_utf8(&bytes).is_err());
        let r = review(&bytes, &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.outcome, Outcome::Patched);
        assert_eq!(r.body, utf8.body);
    }

    #[test]
    fn pod_kind_in_another_group_is_not_ours() {
        let mut v = pod_review("admission.k8s.io/v1", json!({}));
        v["request"]["kind"]["group"] = json!("example.com");
        let r = review(&body(&v), &Config::default(), &no_cluster).unwrap();
        assert_eq!(r.outcome, Outcome::Skipped(SkipReason::Kind));
    }
}
