//! `canary-injector check`: is canary routing sound here, and what to fix.
//!
//! The pure part: a [`Snapshot`] of plain data (what the adapter in
//! [`cluster`] read from the API) goes in, a [`Report`] of [`Finding`]s comes out, rendered for people
//! ([`Report::render`]) or machines ([`Report::to_json`]). Every finding has a
//! stable `code`, says where, what is wrong and what to do.
//!
//! The rules reuse the webhook's own ([`crate::mutate::decide`],
//! [`LabelPolicy::intent`]) so `check` and admission can never disagree on
//! what a pod should carry.

pub mod cluster;
pub mod manifests;
pub mod native;
pub mod routing;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::certs::plan::{bundle_trusts, not_after};
use crate::mutate::bootstrap::BootstrapDecision;
use crate::mutate::{
    Availability, ClusterView, Contradiction, Kind, LabelPolicy, Mode, NamespaceMesh, ObjectView,
    Operation, Policy, StrMap, Subject,
};
use crate::owners::index::{Change, OwnerIndex, Row, WorkloadKind};
use crate::routes::gateway::RouteApi;

/// Every finding code; docs/check.md documents each (a test checks).
pub const CODES: &[&str] = &[
    "webhook-missing",
    "ca-bundle-missing",
    "ca-bundle-mismatch",
    "certificate-expired",
    "certificate-expiring",
    "certificate-invalid",
    "certificate-unreadable",
    "no-ready-endpoints",
    "selector-mismatch",
    "config-invalid",
    "namespace-not-opted-in",
    "namespace-excluded",
    "pod-without-stage",
    "gray-without-tag",
    "pod-replicaset-disagree",
    "canary-labelled-normal",
    "normal-labelled-canary",
    "tag-rewritten",
    "bootstrap-configmap-missing",
    "bootstrap-configmap-stale",
    "sidecar-without-template",
    "subset-selects-no-pod",
    "route-to-missing-subset",
    "live-tag-without-route",
    "duplicate-rules",
    "routes-conflict",
    "host-not-found",
    "backend-not-found",
    "backend-selects-no-pod",
    "route-not-accepted",
    "ambient-without-waypoint",
    "no-normal-pod",
    "webhook-url",
    "route-weight-invalid",
    "route-weights-invalid",
    "route-settings-invalid",
    "native-policy-incomplete",
    "native-policy-stale",
];

/// Certificates expiring sooner than this are a warning.
pub const EXPIRY_WARNING_SECONDS: i64 = 30 * 86400;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Breaks routing or admission now: fix it.
    Error,
    /// Will break, or breaks part of it: fix it.
    Warning,
    /// Worth knowing; nothing to fix.
    Info,
}

impl Severity {
    /// Stable name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Info => "info",
        }
    }
}

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// Stable kebab-case code (docs/check.md lists them all).
    pub code: &'static str,
    /// Where: `webhook`, a namespace, or `<namespace>/<Kind>/<name>`.
    pub place: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// What `check` found, and how much it looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Findings, most severe first, then by place and code.
    pub findings: Vec<Finding>,
    /// Namespaces looked at.
    pub namespaces: usize,
    /// Their names, sorted.
    pub namespace_names: Vec<String>,
    /// Pods looked at (workloads with `check -f`).
    pub pods: usize,
    /// What `pods` counts: `pod`, or `workload` with `check -f`.
    pub unit: &'static str,
}

impl Report {
    fn new(findings: Vec<Finding>, namespaces: Vec<String>, pods: usize) -> Self {
        Self::counting(findings, namespaces, pods, "pod")
    }

    fn counting(
        mut findings: Vec<Finding>,
        mut namespaces: Vec<String>,
        pods: usize,
        unit: &'static str,
    ) -> Self {
        findings.sort_by(|a, b| {
            (a.severity, &a.place, a.code, &a.message)
                .cmp(&(b.severity, &b.place, b.code, &b.message))
        });
        namespaces.sort();
        namespaces.dedup();
        Self {
            findings,
            namespaces: namespaces.len(),
            namespace_names: namespaces,
            pods,
            unit,
        }
    }

    /// Sound when nothing needs fixing (info findings aside).
    pub fn is_sound(&self) -> bool {
        self.findings.iter().all(|f| f.severity == Severity::Info)
    }

    /// The report as JSON (`-o json`).
    pub fn to_json(&self) -> Value {
        json!({
            "sound": self.is_sound(),
            "checked": {
                "namespaces": self.namespaces,
                "namespaceNames": self.namespace_names,
                format!("{}s", self.unit): self.pods,
            },
            "findings": self.findings.iter().map(|f| json!({
                "severity": f.severity.as_str(),
                "code": f.code,
                "place": f.place,
                "message": f.message,
                "fix": f.fix,
            })).collect::<Vec<_>>(),
        })
    }

    /// The report for people: one block per finding, then a summary line.
    /// `colour` adds ANSI colours (only on a terminal).
    pub fn render(&self, colour: bool) -> String {
        let paint = |code: &str, text: &str| {
            if colour {
                format!("\x1b[{code}m{text}\x1b[0m")
            } else {
                text.to_owned()
            }
        };
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.severity {
                Severity::Error => paint("31;1", "error  "),
                Severity::Warning => paint("33;1", "warning"),
                Severity::Info => paint("36", "info   "),
            };
            let _ = writeln!(out, "{tag} {:<28} {}", f.code, f.place);
            let _ = writeln!(out, "        {}", f.message);
            let _ = writeln!(out, "        fix: {}", f.fix);
        }
        let count = |s: Severity| self.findings.iter().filter(|f| f.severity == s).count();
        let names = if self.namespace_names.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.namespace_names.join(", "))
        };
        let summary = format!(
            "{} namespace(s){names}, {} {}(s) checked: {} error(s), {} warning(s), {} info",
            self.namespaces,
            self.pods,
            self.unit,
            count(Severity::Error),
            count(Severity::Warning),
            count(Severity::Info),
        );
        if self.is_sound() {
            let _ = writeln!(out, "{} {summary}", paint("32;1", "sound:"));
        } else {
            let _ = writeln!(out, "{} {summary}", paint("31;1", "needs fixing:"));
        }
        out
    }
}

// === inputs ===

/// One webhook of the MutatingWebhookConfiguration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookEntry {
    /// `webhooks[].name`.
    pub name: String,
    /// `clientConfig.caBundle`, decoded (PEM); `None` when empty.
    pub ca_bundle: Option<Vec<u8>>,
    /// `namespaceSelector.matchLabels`.
    pub namespace_selector: BTreeMap<String, String>,
    /// `clientConfig.url`: called outside the cluster, not by Service.
    pub url: Option<String>,
}

/// Where the webhook's CA and serving certificate come from: what fixes a
/// caBundle that does not verify the certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CaSource {
    /// The certgen Job and its renewal CronJob (the default install).
    #[default]
    Certgen,
    /// cert-manager (`cert-manager.io/inject-ca-from` on the configuration).
    CertManager,
    /// A certificate of the user's own.
    Own,
}

/// What the webhook side looks like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookView {
    /// The configuration's name.
    pub configuration_name: String,
    /// Its webhooks; `None` when the configuration does not exist.
    pub webhooks: Option<Vec<WebhookEntry>>,
    /// The serving certificate (PEM, `tls.crt` of the TLS Secret), when readable.
    pub serving_certificate: Option<Vec<u8>>,
    /// Why the serving certificate could not be read, when it could not.
    pub serving_certificate_error: Option<String>,
    /// Ready endpoints behind the webhook's Service, when known.
    pub ready_endpoints: Option<usize>,
    /// `namespace/name` of the Service, for messages.
    pub service: String,
    /// Where the CA comes from.
    pub ca_source: CaSource,
    /// The webhook's namespace, for commands.
    pub namespace: String,
}

/// One namespace to check: an opted-in one, or the one `check -n` names.
/// Only its name and labels are read when it has not opted in or is
/// excluded (nothing there is the webhook's to check).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceView {
    /// Its name.
    pub name: String,
    /// The Namespace's labels (whether it opted in).
    pub labels: BTreeMap<String, String>,
    /// Its pods, as the API returns them.
    pub pods: Vec<Value>,
    /// Its ReplicaSets, as the API returns them.
    pub replicasets: Vec<Value>,
    /// `data` of its copy of the bootstrap ConfigMap, when it has one.
    pub bootstrap_copy: Option<BTreeMap<String, String>>,
    /// Its Services, as the API returns them.
    pub services: Vec<Value>,
    /// Its EndpointSlices, as the API returns them.
    pub endpoint_slices: Vec<Value>,
    /// Its DestinationRules and VirtualServices (any version), when Istio's
    /// API is served.
    pub rules: Vec<Value>,
    /// Its Deployments, StatefulSets, DaemonSets, Jobs and CronJobs
    /// (metadata only: `kind` and `metadata`), for the owner chains.
    pub workloads: Vec<Value>,
}

/// Everything `check` looks at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The webhook side; `None` to skip those checks (`check -f`).
    pub webhook: Option<WebhookView>,
    /// `data` of the source bootstrap ConfigMap, when it exists.
    pub bootstrap_source: Option<BTreeMap<String, String>>,
    /// The namespaces to check.
    pub namespaces: Vec<NamespaceView>,
    /// Unix time now (certificate expiry).
    pub now: i64,
    /// Why the webhook's deployed configuration is unusable, when it is
    /// (the check then uses the built-in defaults).
    pub config_error: Option<String>,
    /// The native admission policy's objects, when installed.
    pub native: native::NativeView,
    /// The route API of a Service without `canary-injector.io/route-api`
    /// (`routes.api` and what the cluster serves); `None`: none served.
    pub route_api: Option<RouteApi>,
}

// === the rules ===

/// Checks `snapshot` against the webhook's policy.
pub fn check(snapshot: &Snapshot, policy: Policy<'_>) -> Report {
    let mut findings = Vec::new();
    if let Some(error) = &snapshot.config_error {
        findings.push(finding(
            Severity::Error,
            "config-invalid",
            "webhook",
            format!(
                "the webhook's config.yaml is invalid ({error}): the webhook pods cannot start"
            ),
            "fix deploy/base/config.yaml (the message names the key) and re-apply",
        ));
    }
    if let Some(webhook) = &snapshot.webhook {
        check_webhook(webhook, policy, snapshot.now, &mut findings);
    }
    native::check_native(&snapshot.native, policy, &mut findings);
    let mut pods = 0;
    for ns in &snapshot.namespaces {
        if check_scope(ns, policy, &mut findings) {
            pods += ns.pods.len();
            check_namespace(ns, snapshot, policy, &mut findings);
        }
    }
    let names = snapshot.namespaces.iter().map(|n| n.name.clone()).collect();
    Report::new(findings, names, pods)
}

pub(crate) fn finding(
    severity: Severity,
    code: &'static str,
    place: impl Into<String>,
    message: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    debug_assert!(CODES.contains(&code), "{code} is missing from CODES");
    Finding {
        severity,
        code,
        place: place.into(),
        message: message.into(),
        fix: fix.into(),
    }
}

fn check_webhook(w: &WebhookView, policy: Policy<'_>, now: i64, out: &mut Vec<Finding>) {
    use Severity::{Error, Warning};
    let Some(webhooks) = &w.webhooks else {
        out.push(finding(
            Error,
            "webhook-missing",
            "webhook",
            format!(
                "MutatingWebhookConfiguration {} does not exist: no pod is labelled",
                w.configuration_name
            ),
            "install it: kubectl apply -f deploy/install.yaml",
        ));
        return;
    };
    match &w.serving_certificate {
        None => out.push(finding(
            Warning,
            "certificate-unreadable",
            "webhook",
            format!(
                "cannot read the serving certificate ({}), so the caBundle and expiry are not checked",
                w.serving_certificate_error.as_deref().unwrap_or("no tls.crt")
            ),
            "run check with a user that may get the TLS Secret, or pass --tls-secret NAME",
        )),
        Some(cert) => {
            for hook in webhooks {
                match &hook.ca_bundle {
                    None => out.push(finding(
                        Error,
                        "ca-bundle-missing",
                        "webhook",
                        format!("webhook {} has no caBundle: the apiserver cannot verify it and every call fails", hook.name),
                        "let the certgen Job fill it: kubectl -n canary-injector create job --from=cronjob/canary-injector-cert-renew certgen-now",
                    )),
                    Some(bundle) if !bundle_trusts(bundle, cert) => out.push(finding(
                        Error,
                        "ca-bundle-mismatch",
                        "webhook",
                        format!("the caBundle of webhook {} does not verify the serving certificate: pod creation fails with x509 errors", hook.name),
                        ca_fix(w),
                    )),
                    Some(_) => {}
                }
            }
            match not_after(cert) {
                Some(t) if t <= now => out.push(finding(
                    Error,
                    "certificate-expired",
                    "webhook",
                    "the serving certificate has expired: the apiserver refuses the webhook",
                    "renew it: kubectl -n canary-injector create job --from=cronjob/canary-injector-cert-renew certgen-now",
                )),
                Some(t) if t - now < EXPIRY_WARNING_SECONDS => out.push(finding(
                    Warning,
                    "certificate-expiring",
                    "webhook",
                    format!("the serving certificate expires in {} day(s)", (t - now) / 86400),
                    "check the renewal CronJob: kubectl -n canary-injector get cronjob canary-injector-cert-renew",
                )),
                Some(_) => {}
                None => out.push(finding(
                    Error,
                    "certificate-invalid",
                    "webhook",
                    "the TLS Secret's tls.crt is not a PEM certificate",
                    "re-run the certgen Job",
                )),
            }
        }
    }
    for hook in webhooks {
        if let Some(url) = &hook.url {
            out.push(finding(
                Severity::Info,
                "webhook-url",
                "webhook",
                format!(
                    "webhook {} is called at {url} (clientConfig.url, outside the cluster): \
                     whether it answers is not checked",
                    hook.name
                ),
                "nothing, if this is a development setup; in a cluster use the Service \
                 (kubectl apply -f deploy/install.yaml)",
            ));
        }
    }
    if w.ready_endpoints == Some(0) {
        out.push(finding(
            Error,
            "no-ready-endpoints",
            "webhook",
            format!("Service {} has no ready endpoint: with failurePolicy Fail, pod creation in opted-in namespaces stops", w.service),
            "kubectl -n canary-injector get pods; kubectl -n canary-injector describe deployment canary-injector",
        ));
    }
    let wanted = &policy.namespaces.opt_in;
    for hook in webhooks {
        if &hook.namespace_selector != wanted {
            out.push(finding(
                Error,
                "selector-mismatch",
                "webhook",
                format!(
                    "webhook {} selects namespaces by {}, the controllers by {}: they act on different namespaces",
                    hook.name,
                    selector_text(&hook.namespace_selector),
                    selector_text(wanted)
                ),
                "make namespaces.optIn in the webhook's config.yaml equal the webhook configuration's namespaceSelector.matchLabels",
            ));
        }
    }
}

/// What makes the caBundle verify the serving certificate again, for the
/// install method in use.
fn ca_fix(w: &WebhookView) -> String {
    let ns = &w.namespace;
    match w.ca_source {
        CaSource::Certgen => format!(
            "run the certgen Job again, which fills the caBundle from the CA it keeps: kubectl -n \
             {ns} create job --from=cronjob/canary-injector-cert-renew certgen-now"
        ),
        CaSource::CertManager => format!(
            "check the Certificate that the annotation cert-manager.io/inject-ca-from names and \
             cert-manager's cainjector (kubectl -n {ns} describe certificate \
             canary-injector-serving; kubectl -n cert-manager logs deploy/cert-manager-cainjector)"
        ),
        CaSource::Own => format!(
            "put the CA that signed your certificate into every webhook's clientConfig.caBundle \
             (base64 of the PEM: kubectl patch mutatingwebhookconfiguration {} --type=json ...; \
             see certs/README.md)",
            w.configuration_name
        ),
    }
}

fn selector_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "{} (everything)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `<namespace>/<kind>/<name>` of an object as the API returns it.
fn place(namespace: &str, kind: &str, object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or("<unnamed>");
    format!("{namespace}/{kind}/{name}")
}

/// Whether `ns` is the webhook's to check: it opted in and is not
/// excluded. Else one finding says why not (its pods would all show up as
/// unlabelled, which is not what is wrong).
fn check_scope(ns: &NamespaceView, policy: Policy<'_>, out: &mut Vec<Finding>) -> bool {
    let namespaces = policy.namespaces;
    let opted_in = namespaces.opts_in(&ns.labels);
    let label_args = || {
        namespaces
            .opt_in
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if namespaces.is_excluded(&ns.name) {
        let why = if namespaces.own.as_deref() == Some(ns.name.as_str()) {
            "the webhook's own namespace"
        } else {
            "namespaces.excluded"
        };
        let (message, fix) = if opted_in && !namespaces.opt_in.is_empty() {
            let remove = namespaces
                .opt_in
                .keys()
                .map(|k| format!("{k}-"))
                .collect::<Vec<_>>()
                .join(" ");
            (
                format!(
                    "namespace {} is labelled {} but canary-injector never acts on it ({why}): \
                     its pods get no labels, yet the apiserver still calls the webhook for them, \
                     and with failurePolicy Fail their creation stops while the webhook is down",
                    ns.name,
                    selector_text(&namespaces.opt_in)
                ),
                format!("kubectl label namespace {} {remove}", ns.name),
            )
        } else {
            (
                format!(
                    "canary-injector never acts on namespace {} ({why}): its pods are not \
                     labelled, so it was not checked",
                    ns.name
                ),
                format!(
                    "run canary workloads in an opted-in namespace (kubectl label namespace \
                     <name> {})",
                    label_args()
                ),
            )
        };
        out.push(finding(
            Severity::Warning,
            "namespace-excluded",
            ns.name.clone(),
            message,
            fix,
        ));
        return false;
    }
    if !opted_in {
        out.push(finding(
            Severity::Error,
            "namespace-not-opted-in",
            ns.name.clone(),
            format!(
                "namespace {} has not opted in (no {}): the webhook labels none of its pods and \
                 no controller acts on it, so it was not checked",
                ns.name,
                selector_text(&namespaces.opt_in)
            ),
            format!("kubectl label namespace {} {}", ns.name, label_args()),
        ));
        return false;
    }
    true
}

fn check_namespace(
    ns: &NamespaceView,
    snapshot: &Snapshot,
    policy: Policy<'_>,
    out: &mut Vec<Finding>,
) {
    use Severity::{Error, Warning};
    let labels = policy.labels;
    let availability = match (&snapshot.bootstrap_source, &ns.bootstrap_copy) {
        (_, Some(_)) => Availability::Present,
        (Some(_), None) => Availability::Missing,
        (None, None) => Availability::NotConfigured,
    };
    if policy.bootstrap.enabled
        && let Some(source) = &snapshot.bootstrap_source
    {
        match &ns.bootstrap_copy {
            None => out.push(finding(
                Warning,
                "bootstrap-configmap-missing",
                ns.name.clone(),
                format!("no copy of ConfigMap {}: Istio 1.5-1.7 sidecars here keep the 300 s xds-grpc keepalive", policy.bootstrap.config_map_name),
                "check the copier: kubectl -n canary-injector logs deploy/canary-injector | grep bootstrap (canary_injector_reconcile_errors_total)",
            )),
            Some(copy) if copy != source => out.push(finding(
                Warning,
                "bootstrap-configmap-stale",
                ns.name.clone(),
                format!("the copy of ConfigMap {} differs from the source", policy.bootstrap.config_map_name),
                "the copier repairs it within minutes; if not, check canary_injector_reconcile_errors_total{controller=\"bootstrap-copier\"}",
            )),
            Some(_) => {}
        }
    }
    // Running pods carry their proxy's version in its image tag; the
    // injector version only matters for pods not injected yet.
    let cluster = ClusterView {
        bootstrap_configmap: availability,
        injector_version: None,
        mesh: NamespaceMesh::of(Some(&ns.labels)),
    };
    let replicasets: BTreeMap<&str, &Value> = ns
        .replicasets
        .iter()
        .filter_map(|rs| Some((rs["metadata"]["name"].as_str()?, rs)))
        .collect();
    let owners = owner_index(ns, &labels.tag_annotation);
    let mut contradicted: BTreeMap<(String, &'static str), (Contradiction, Vec<String>)> =
        BTreeMap::new();
    for pod in &ns.pods {
        let Ok(view) = ObjectView::from_value(pod.clone()) else {
            continue;
        };
        let at = place(&ns.name, "Pod", pod);
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or("<unnamed>");
        let controller = view.controller();
        let owner_tag = controller.and_then(|c| {
            let kind = WorkloadKind::of(&c.api_version, &c.kind)?;
            owners.owner_tag(&ns.name, kind, &c.name)
        });
        // The workload to restart or fix: the top of the pod's chain.
        let (wl_kind, wl_name) = match controller {
            Some(c) => WorkloadKind::of(&c.api_version, &c.kind)
                .and_then(|k| owners.workload(&ns.name, k, &c.name))
                .map_or((c.kind.clone(), c.name.clone()), |w| (w.kind, w.name)),
            None => ("Pod".to_owned(), pod_name.to_owned()),
        };
        let restart = restart_fix(&ns.name, &wl_kind, &wl_name);
        let subject = Subject {
            kind: Some(Kind::Pod),
            operation: Operation::Create,
            namespace: &ns.name,
            sub_resource: "",
            mode: Mode::Admission,
            owner_tag: owner_tag.as_ref(),
        };
        let Ok(decision) = crate::mutate::decide(&subject, &view, policy, &cluster) else {
            continue;
        };
        if decision.skipped.is_some() {
            continue;
        }
        let meta = view.metadata.as_ref();
        let pod_labels = meta.and_then(|m| m.labels.as_ref());
        if !pod_labels.is_some_and(|l| l.has(&labels.stage)) {
            out.push(finding(
                Error,
                "pod-without-stage",
                at.clone(),
                format!(
                    "no {} label: the pod is in no DestinationRule subset (503s)",
                    labels.stage
                ),
                format!(
                    "let serve's backfill label it (it passes over every opted-in namespace when \
                     its leader starts and every 30 minutes; backfill.enabled), or restart its \
                     workload: {restart}"
                ),
            ));
            continue;
        }
        let rs_template_canary = controller
            .filter(|c| c.kind == "ReplicaSet")
            .and_then(|c| replicasets.get(c.name.as_str()))
            .is_some_and(|rs| {
                rs["spec"]["template"]["metadata"]["labels"][&labels.stage]
                    == labels.gray_stage.as_str()
            });
        if let Some(c) = labels.contradiction(
            pod_labels,
            decision.requested.map(|r| r.value),
            rs_template_canary,
        ) {
            contradicted
                .entry((format!("{}/{wl_kind}/{wl_name}", ns.name), c.code()))
                .or_insert_with(|| (c, Vec::new()))
                .1
                .push(pod_name.to_owned());
            continue;
        }
        let intent = labels.intent(pod_labels);
        if intent.stage() == labels.gray_stage && intent.tag().is_none() {
            out.push(finding(
                Error,
                "gray-without-tag",
                at.clone(),
                format!(
                    "{}={} but no {} label: no header route can reach it",
                    labels.stage, labels.gray_stage, labels.canary_tag
                ),
                format!(
                    "set the annotation {} on its pod template, or label it {}=<tag>",
                    labels.tag_annotation, labels.canary_tag
                ),
            ));
        }
        check_tag_rewritten(&view, labels, &at, out);
        if let Some(owner) = replicaset_owner(pod)
            && let Some(rs) = replicasets.get(owner)
        {
            let rs_labels = rs["metadata"]["labels"].as_object().map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<BTreeMap<_, _>>()
            });
            if rs_labels
                .as_ref()
                .is_some_and(|l| l.contains_key(&labels.stage))
            {
                let rs_intent = labels.intent(rs_labels.as_ref());
                if (rs_intent.stage(), rs_intent.tag()) != (intent.stage(), intent.tag()) {
                    out.push(finding(
                        Error,
                        "pod-replicaset-disagree",
                        at.clone(),
                        format!(
                            "the pod is {} but its ReplicaSet {owner} is {}: routes built from either miss the other",
                            describe(intent.stage(), intent.tag()),
                            describe(rs_intent.stage(), rs_intent.tag()),
                        ),
                        "put the tag annotation on the workload's pod template (not its own metadata) and roll it out",
                    ));
                }
            }
        }
        if matches!(decision.bootstrap, Some(BootstrapDecision::Mount(_))) {
            out.push(finding(
                Warning,
                "sidecar-without-template",
                at.clone(),
                "an Istio 1.5-1.7 sidecar without the patched bootstrap template (created before it was available): it notices a dead istiod after ~16 minutes",
                format!("restart the workload so its new pods get the template: {restart}"),
            ));
        }
    }
    for ((workload, code), (c, pods)) in contradicted {
        let kind = workload.split('/').nth(1).unwrap_or_default();
        let name = workload.rsplit('/').next().unwrap_or_default();
        let normal = format!("{}={}", labels.stage, labels.normal_stage);
        let message = match &c {
            Contradiction::CanaryLabelledNormal { tag } => format!(
                "pod(s) {} labelled {normal}, but this {kind} asks for canary {tag} (annotation \
                 {}): canary code in the normal subset, serving requests without the header \
                 (labels are never overwritten)",
                pods.join(", "),
                labels.tag_annotation
            ),
            Contradiction::NormalLabelledCanary { tag } => format!(
                "pod(s) {} labelled canary {tag}, but neither they nor this {kind} ask for a \
                 canary (no {} annotation): out of the normal subset (labels are never \
                 overwritten)",
                pods.join(", "),
                labels.tag_annotation
            ),
        };
        let fix = c.fix(&ns.name, kind, name);
        out.push(finding(Error, code, workload.clone(), message, fix));
    }
    let services = services_with_ready_pods(ns, labels);
    routing::check_routing(
        &routing::RoutingInput {
            namespace: &ns.name,
            services: &services,
            rules: &ns.rules,
            backend: "ready pod",
            all_services: true,
            default_api: snapshot.route_api.unwrap_or(RouteApi::Istio),
            namespace_labels: &ns.labels,
        },
        labels,
        out,
    );
}

/// The owner chains of `ns`'s pods, from its ReplicaSets and workloads
/// as read.
fn owner_index(ns: &NamespaceView, tag_annotation: &str) -> OwnerIndex {
    let mut index = OwnerIndex::default();
    let objects = ns
        .replicasets
        .iter()
        .map(|o| (Some("ReplicaSet"), o))
        .chain(ns.workloads.iter().map(|o| (o["kind"].as_str(), o)));
    for (kind, object) in objects {
        let Some(kind) = kind.and_then(|k| WorkloadKind::ALL.into_iter().find(|w| w.name() == k))
        else {
            continue;
        };
        let Ok(view) = ObjectView::from_value(json!({"metadata": object["metadata"]})) else {
            continue;
        };
        let Some(meta) = view.metadata.as_ref() else {
            continue;
        };
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        let row = Row::of(
            kind,
            uid,
            meta.annotations.as_ref(),
            meta.controller(),
            tag_annotation,
        );
        let name = meta.name.as_deref().unwrap_or_default().to_owned();
        index.apply(kind, Change::Applied(ns.name.clone(), name, row));
    }
    index
}

/// The command that restarts the pods of `kind`/`name` in `namespace`.
fn restart_fix(namespace: &str, kind: &str, name: &str) -> String {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" => format!(
            "kubectl -n {namespace} rollout restart {}/{name}",
            kind.to_ascii_lowercase()
        ),
        "Pod" => {
            format!("delete and create the pod again (kubectl -n {namespace} delete pod {name})")
        }
        _ => format!(
            "delete its pods so the {kind} {name} creates them again (kubectl -n {namespace} \
             delete pod <name>)"
        ),
    }
}

/// Each Service of `ns` with the labels of the pods behind its ready
/// endpoints, and the weights its canaries ask for.
fn services_with_ready_pods(ns: &NamespaceView, labels: &LabelPolicy) -> Vec<routing::ServiceInfo> {
    // Each pod's labels and annotations, by name.
    type Meta = (BTreeMap<String, String>, BTreeMap<String, String>);
    let labels_of: BTreeMap<&str, Meta> = ns
        .pods
        .iter()
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?,
                (
                    string_map(&p["metadata"]["labels"]),
                    string_map(&p["metadata"]["annotations"]),
                ),
            ))
        })
        .collect();
    let weights: BTreeMap<&str, Option<crate::routes::PodWeight>> = labels_of
        .iter()
        .map(|(name, (_, a))| (*name, crate::routes::shape::pod_weight(Some(a))))
        .collect();
    ns.services
        .iter()
        .filter_map(|svc| {
            let name = svc["metadata"]["name"].as_str()?;
            let ready: Vec<&str> = ns
                .endpoint_slices
                .iter()
                .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == name)
                .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                // An unset condition counts as ready, as the API says.
                .filter(|e| e["conditions"]["ready"] != false)
                .filter(|e| e["targetRef"]["kind"] == "Pod")
                .filter_map(|e| e["targetRef"]["name"].as_str())
                .filter(|p| labels_of.contains_key(p))
                .collect();
            let live = crate::routes::live(
                ready.iter().map(|p| crate::routes::EndpointView {
                    pod: Some(p),
                    ready: true,
                }),
                |p| {
                    let stage = crate::routes::pod_stage(labels, &labels_of.get(p)?.0)?;
                    Some((stage, weights.get(p)?.as_ref()))
                },
            );
            Some(routing::ServiceInfo {
                name: name.to_owned(),
                annotations: string_map(&svc["metadata"]["annotations"]),
                labels: string_map(&svc["metadata"]["labels"]),
                backends: ready.iter().map(|p| labels_of[p].0.clone()).collect(),
                weights: live.weights,
            })
        })
        .collect()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

fn describe(stage: &str, tag: Option<&str>) -> String {
    match tag {
        Some(t) => format!("{stage}/{t}"),
        None => stage.to_owned(),
    }
}

fn replicaset_owner(pod: &Value) -> Option<&str> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["kind"] == "ReplicaSet" && o["controller"] == true)?["name"]
        .as_str()
}

/// A pod whose tag annotation was rewritten into a different label value.
fn check_tag_rewritten(view: &ObjectView, labels: &LabelPolicy, at: &str, out: &mut Vec<Finding>) {
    let meta = view.metadata.as_ref();
    let requested = meta
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.value(&labels.tag_annotation));
    let applied = meta
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.value(&labels.canary_tag));
    if let (Some(requested), Some(applied)) = (requested, applied)
        && requested != applied
    {
        out.push(finding(
            Severity::Info,
            "tag-rewritten",
            at.to_owned(),
            format!(
                "annotation {}={requested:?} became label {}={applied}",
                labels.tag_annotation, labels.canary_tag
            ),
            format!("send the header with {applied:?}, or use a tag of [A-Za-z0-9._-] only"),
        ));
    }
}

#[cfg(test)]
mod tests;
