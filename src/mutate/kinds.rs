//! The one table of kinds the core knows: API group, version, resource,
//! scope, whether admission acts on it, and where its pod lives.
//!
//! Admission ([`Kind::from_gvk`] on `request.kind`), offline
//! ([`Kind::from_api_version`] on a manifest's `apiVersion` and `kind`), the
//! skip rules, the bootstrap target, the metric label and
//! `deploy/base/webhook.yaml` (a test compares its rules with this table)
//! all read [`KINDS`]. Acting on one more kind at admission is one row's
//! `admission: true` plus one webhook rule.

/// A kind the core knows. `Kind as usize` indexes [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `v1/Pod`.
    Pod,
    /// `apps/v1/ReplicaSet`.
    ReplicaSet,
    /// `apps/v1/Deployment`.
    Deployment,
    /// `apps/v1/StatefulSet`.
    StatefulSet,
    /// `apps/v1/DaemonSet`.
    DaemonSet,
    /// `batch/v1/Job`.
    Job,
    /// `batch/v1/CronJob`.
    CronJob,
}

/// Whether objects of a kind live in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Namespaced (every kind the core knows today).
    Namespaced,
    /// Cluster-scoped.
    Cluster,
}

impl Scope {
    /// The spelling of webhook rules (`scope: Namespaced`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespaced => "Namespaced",
            Self::Cluster => "Cluster",
        }
    }
}

/// Where a pod (its `metadata` and `spec`) lives inside an object: the
/// object itself, or a pod template. Label targets and the bootstrap mount
/// are addressed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// The object itself (`/metadata`, `/spec`).
    Object,
    /// `spec.template` (ReplicaSet, Deployment, StatefulSet, DaemonSet, Job).
    PodTemplate,
    /// `spec.jobTemplate.spec.template` (CronJob).
    CronJobPodTemplate,
}

impl Location {
    /// JSON Pointer tokens of the object holding `metadata` and `spec`
    /// (empty for the object itself).
    pub fn tokens(self) -> &'static [&'static str] {
        match self {
            Self::Object => &[],
            Self::PodTemplate => &["spec", "template"],
            Self::CronJobPodTemplate => &["spec", "jobTemplate", "spec", "template"],
        }
    }
}

/// One row of [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// The kind this row describes.
    pub kind: Kind,
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// The API version the webhook rules and manifests name.
    pub version: &'static str,
    /// The `kind` name.
    pub name: &'static str,
    /// The resource (plural), as webhook rules name it.
    pub resource: &'static str,
    /// Namespaced or cluster-scoped.
    pub scope: Scope,
    /// Whether admission acts on it (else only `mutate -f` does, and
    /// `deploy/base/webhook.yaml` has no rule for it).
    pub admission: bool,
    /// Whether admission also acts on `UPDATE` (workloads whose pod
    /// template may change: their tag annotation must keep reaching it).
    /// Not Jobs: a Job's template is immutable once created.
    pub update: bool,
    /// Where its pod lives: the object itself for a Pod, else its template.
    pub pod: Location,
    /// Whether the object's own `metadata.labels` get the labels (Pods and
    /// ReplicaSets); workloads get them on their pod template only.
    pub labels_on_object: bool,
    /// Whether the pod template is left alone when a controller owns the
    /// object: a Deployment compares its ReplicaSets' templates and creates
    /// new ones forever on a mismatch (kubernetes#57167), and an operator
    /// that owns a Deployment would fight a changed template the same way.
    /// True for every kind with a template.
    pub owned_template_untouched: bool,
}

const fn row(
    kind: Kind,
    group: &'static str,
    name: &'static str,
    resource: &'static str,
    update: bool,
    pod: Location,
) -> KindInfo {
    KindInfo {
        kind,
        group,
        version: "v1",
        name,
        resource,
        scope: Scope::Namespaced,
        admission: true,
        update,
        pod,
        labels_on_object: matches!(kind, Kind::Pod | Kind::ReplicaSet),
        owned_template_untouched: !matches!(pod, Location::Object),
    }
}

impl KindInfo {
    /// The operations of this kind's webhook rule (empty when admission
    /// does not act on it).
    pub fn operations(&self) -> &'static [&'static str] {
        match (self.admission, self.update) {
            (false, _) => &[],
            (true, false) => &["CREATE"],
            (true, true) => &["CREATE", "UPDATE"],
        }
    }
}

/// Every kind the core knows, in [`Kind`] order. Admission acts on all of
/// them: Pods and ReplicaSets get labels, workloads get their tag
/// annotation copied into their pod template (`update`: also on `UPDATE`).
pub const KINDS: [KindInfo; 7] = [
    row(Kind::Pod, "", "Pod", "pods", false, Location::Object),
    row(
        Kind::ReplicaSet,
        "apps",
        "ReplicaSet",
        "replicasets",
        false,
        Location::PodTemplate,
    ),
    row(
        Kind::Deployment,
        "apps",
        "Deployment",
        "deployments",
        true,
        Location::PodTemplate,
    ),
    row(
        Kind::StatefulSet,
        "apps",
        "StatefulSet",
        "statefulsets",
        true,
        Location::PodTemplate,
    ),
    row(
        Kind::DaemonSet,
        "apps",
        "DaemonSet",
        "daemonsets",
        true,
        Location::PodTemplate,
    ),
    // A Job's template is immutable: an UPDATE that changed it would be
    // refused by the apiserver, so only its CREATE is admitted.
    row(
        Kind::Job,
        "batch",
        "Job",
        "jobs",
        false,
        Location::PodTemplate,
    ),
    row(
        Kind::CronJob,
        "batch",
        "CronJob",
        "cronjobs",
        true,
        Location::CronJobPodTemplate,
    ),
];

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 7] = [
        Kind::Pod,
        Kind::ReplicaSet,
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::DaemonSet,
        Kind::Job,
        Kind::CronJob,
    ];

    /// This kind's row of [`KINDS`].
    pub fn info(self) -> &'static KindInfo {
        &KINDS[self as usize]
    }

    /// The kind named by an API group and a `kind` name (an admission
    /// request's `kind`); `None` for anything else, such as a `Deployment`
    /// of some CRD group. The version is not compared: webhook rules use
    /// `matchPolicy: Equivalent`.
    pub fn from_gvk(group: &str, kind: &str) -> Option<Self> {
        KINDS
            .iter()
            .find(|r| r.name == kind && r.group == group)
            .map(|r| r.kind)
    }

    /// The kind named `kind` in the table, whatever its group: for a
    /// manifest that omits `apiVersion` (names are unique in the table).
    pub fn from_name(kind: &str) -> Option<Self> {
        KINDS.iter().find(|r| r.name == kind).map(|r| r.kind)
    }

    /// The kind of a manifest, from its `apiVersion` (`apps/v1`, or `v1`
    /// for the core group) and `kind`.
    pub fn from_api_version(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        Self::from_gvk(group, kind)
    }

    /// The Kubernetes `kind` name.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The value of the `kind` metric label for a request kind name: the
    /// name of a kind admission acts on, `unknown` when empty, else `other`
    /// (bounded whatever the apiserver sends).
    pub fn metric_label(name: &str) -> &'static str {
        match KINDS.iter().find(|r| r.admission && r.name == name) {
            Some(r) => r.name,
            None if name.is_empty() => "unknown",
            None => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    #[test]
    fn rows_are_in_kind_order_and_unique() {
        for (i, kind) in Kind::ALL.iter().enumerate() {
            assert_eq!(KINDS[i].kind, *kind);
            assert_eq!(kind.info().kind, *kind);
        }
        let names: BTreeSet<_> = KINDS.iter().map(|r| (r.group, r.name)).collect();
        assert_eq!(names.len(), KINDS.len());
        let resources: BTreeSet<_> = KINDS.iter().map(|r| (r.group, r.resource)).collect();
        assert_eq!(resources.len(), KINDS.len());
    }

    #[test]
    fn group_is_part_of_the_kind() {
        assert_eq!(Kind::from_gvk("", "Pod"), Some(Kind::Pod));
        assert_eq!(Kind::from_gvk("apps", "ReplicaSet"), Some(Kind::ReplicaSet));
        assert_eq!(Kind::from_gvk("example.com", "Pod"), None);
        assert_eq!(Kind::from_gvk("", "Deployment"), None);
        assert_eq!(
            Kind::from_gvk("apps", "pod"),
            None,
            "kinds are case-sensitive"
        );
        assert_eq!(
            Kind::from_api_version("apps/v1", "Deployment"),
            Some(Kind::Deployment)
        );
        assert_eq!(Kind::from_api_version("v1", "Pod"), Some(Kind::Pod));
        assert_eq!(Kind::from_api_version("example.com/v1", "Deployment"), None);
        assert_eq!(Kind::from_api_version("", "Deployment"), None);
        assert_eq!(Kind::from_name("Deployment"), Some(Kind::Deployment));
        assert_eq!(Kind::from_name("Service"), None);
        assert_eq!(
            Kind::from_api_version("batch/v1", "CronJob"),
            Some(Kind::CronJob)
        );
    }

    #[test]
    fn metric_labels_are_bounded() {
        assert_eq!(Kind::metric_label("Pod"), "Pod");
        assert_eq!(Kind::metric_label("ReplicaSet"), "ReplicaSet");
        assert_eq!(Kind::metric_label("Deployment"), "Deployment");
        assert_eq!(Kind::metric_label("CronJob"), "CronJob");
        assert_eq!(Kind::metric_label("EvilKind-1234"), "other");
        assert_eq!(Kind::metric_label(""), "unknown");
    }

    /// The webhook configuration sends exactly the table's admission kinds,
    /// each with its operations (`CREATE`, plus `UPDATE` for workloads whose
    /// template may change).
    #[test]
    fn webhook_rules_match_the_admission_rows() {
        let manifest = include_str!("../../deploy/base/webhook.yaml");
        let hook: Value = serde_saphyr::from_str(manifest).unwrap();
        let webhooks = hook["webhooks"].as_array().unwrap();
        // One entry per (rule, group, version, resource).
        let mut sent = Vec::new();
        for w in webhooks {
            for rule in w["rules"].as_array().unwrap() {
                let strings = |key: &str| -> Vec<String> {
                    rule[key]
                        .as_array()
                        .unwrap_or_else(|| panic!("rule without {key}: {rule}"))
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect()
                };
                let scope = rule["scope"].as_str().unwrap_or("*").to_owned();
                for group in strings("apiGroups") {
                    for version in strings("apiVersions") {
                        for resource in strings("resources") {
                            sent.push((
                                strings("operations"),
                                group.clone(),
                                version.clone(),
                                resource,
                                scope.clone(),
                            ));
                        }
                    }
                }
            }
        }
        let admitted: Vec<&KindInfo> = KINDS.iter().filter(|r| r.admission).collect();
        for row in &admitted {
            let expected = (
                row.operations().iter().map(|s| s.to_string()).collect(),
                row.group.to_owned(),
                row.version.to_owned(),
                row.resource.to_owned(),
                row.scope.as_str().to_owned(),
            );
            assert!(
                sent.contains(&expected),
                "no webhook rule for {}: want {expected:?} in {sent:?}",
                row.name
            );
        }
        assert_eq!(
            sent.len(),
            admitted.len(),
            "a webhook rule sends a kind admission does not act on: {sent:?}"
        );
    }

    #[test]
    fn only_workloads_with_a_mutable_template_are_admitted_on_update() {
        let updated: Vec<&str> = KINDS
            .iter()
            .filter(|r| r.operations().contains(&"UPDATE"))
            .map(|r| r.name)
            .collect();
        assert_eq!(
            updated,
            ["Deployment", "StatefulSet", "DaemonSet", "CronJob"]
        );
        assert!(KINDS.iter().all(|r| r.operations().contains(&"CREATE")));
        assert!(
            KINDS
                .iter()
                .all(|r| r.owned_template_untouched == (r.pod != Location::Object))
        );
    }
}
