//! The typed decision: what an object means (its [`Intent`]), which label
//! maps lack which labels ([`LabelTarget`]), which tag annotation a
//! workload's pod template gets ([`TemplateTag`]), what the bootstrap part
//! does ([`BootstrapDecision`]), why it was skipped, and what to tell the
//! user ([`Warning`]). JSON Patch is one rendering of it
//! ([`Decision::to_json_patch`]); controllers read the fields directly.

use std::borrow::Cow;
use std::fmt;

use super::bootstrap::{
    BootstrapDecision, BootstrapOutcome, BootstrapSkip, PROXY_CONFIG, USER_VOLUME,
    USER_VOLUME_MOUNT,
};
use super::kinds::Location;
use super::labels::sanitize_tag;
use super::policy::{LabelPolicy, Policy};
use super::{Deny, SkipReason, StrMap};

/// One label: key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label<'a> {
    /// The label key, from the policy.
    pub key: &'a str,
    /// The value: borrowed from the object or the policy, owned when the
    /// tag annotation had to be made a valid label value.
    pub value: Cow<'a, str>,
}

/// What an object (or a set of labels) means in the stage/tag vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent<'a> {
    /// `<labels.canaryTag>=<tag>`, for a canary.
    pub tag: Option<Label<'a>>,
    /// `<labels.stage>=<stage>`: an existing value wins; else `grayStage`
    /// with a tag and `normalStage` without.
    pub stage: Label<'a>,
}

impl<'a> Intent<'a> {
    /// The canary tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_ref().map(|l| &*l.value)
    }

    /// The stage value.
    pub fn stage(&self) -> &str {
        &self.stage.value
    }

    /// The labels the intent stands for, tag first (the patch order).
    pub fn labels(&self) -> impl Iterator<Item = &Label<'a>> {
        self.tag.iter().chain(std::iter::once(&self.stage))
    }

    fn from_parts(
        policy: &'a LabelPolicy,
        tag: Option<Cow<'a, str>>,
        existing_stage: Option<&'a str>,
    ) -> Self {
        let stage = match (existing_stage, &tag) {
            (Some(stage), _) => stage,
            (None, Some(_)) => policy.gray_stage.as_str(),
            (None, None) => policy.normal_stage.as_str(),
        };
        Self {
            tag: tag.map(|value| Label {
                key: &policy.canary_tag,
                value,
            }),
            stage: Label {
                key: &policy.stage,
                value: Cow::Borrowed(stage),
            },
        }
    }
}

impl LabelPolicy {
    /// What a set of labels means, with no tag annotation to consider: the
    /// question a routes controller or `check` asks of a running pod. A
    /// `canaryTag` label makes a canary; an existing `stage` label wins.
    pub fn intent<'a, M: StrMap + ?Sized>(&'a self, labels: Option<&'a M>) -> Intent<'a> {
        let get = |key: &str| labels.and_then(|l| l.value(key));
        let tag = get(&self.canary_tag).map(Cow::Borrowed);
        Intent::from_parts(self, tag, get(&self.stage))
    }

    /// Resolves the intent from the labels already present (the first
    /// target that has one speaks for all) and the tag annotation. Existing
    /// labels win over the annotation, with a warning when they disagree.
    pub(crate) fn resolve<'a>(
        &'a self,
        existing_tag: Option<&'a str>,
        existing_stage: Option<&'a str>,
        annotation: Option<&'a str>,
        warnings: &mut Vec<Warning>,
    ) -> Result<Intent<'a>, Deny> {
        let tag: Option<Cow<'a, str>> = match (existing_tag, annotation) {
            (Some(tag), Some(requested)) => {
                if sanitize_tag(requested).is_none_or(|s| s.value != tag) {
                    warnings.push(Warning::TagIgnored {
                        label: self.canary_tag.clone(),
                        value: tag.to_owned(),
                        annotation: self.tag_annotation.clone(),
                    });
                }
                Some(Cow::Borrowed(tag))
            }
            (Some(tag), None) => Some(Cow::Borrowed(tag)),
            (None, Some(_)) if existing_stage == Some(self.normal_stage.as_str()) => {
                warnings.push(Warning::TagIgnored {
                    label: self.stage.clone(),
                    value: self.normal_stage.clone(),
                    annotation: self.tag_annotation.clone(),
                });
                None
            }
            (None, Some(requested)) => {
                let Some(sanitized) = sanitize_tag(requested) else {
                    return Err(Deny::UnusableTag {
                        annotation: self.tag_annotation.clone(),
                        value: requested.to_owned(),
                        label: self.canary_tag.clone(),
                    });
                };
                if sanitized.changed {
                    warnings.push(Warning::TagRewritten {
                        annotation: self.tag_annotation.clone(),
                        requested: requested.to_owned(),
                        value: sanitized.value.clone(),
                    });
                }
                Some(Cow::Owned(sanitized.value))
            }
            (None, None) => None,
        };
        Ok(Intent::from_parts(self, tag, existing_stage))
    }
}

/// One label map the core fills, where it is and what it lacks. A
/// backfill controller builds a label-only patch from exactly this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelTarget {
    /// Whose `metadata.labels`: the object's, or its pod template's.
    pub location: Location,
    /// Whether that holder has `metadata` (absent: it is created).
    pub has_metadata: bool,
    /// Whether `metadata.labels` exists and is not null (absent: created).
    pub has_labels: bool,
    /// Lacks the intent's tag label (never set without a tag).
    pub lacks_tag: bool,
    /// Lacks the stage label.
    pub lacks_stage: bool,
}

impl LabelTarget {
    /// The labels of `intent` this map lacks, as `(key, value)`, tag first.
    pub fn missing<'i, 'a>(&self, intent: &'i Intent<'a>) -> impl Iterator<Item = &'i Label<'a>> {
        let tag = intent.tag.as_ref().filter(|_| self.lacks_tag);
        let stage = Some(&intent.stage).filter(|_| self.lacks_stage);
        tag.into_iter().chain(stage)
    }

    /// True when nothing is missing.
    pub fn is_complete(&self) -> bool {
        !self.lacks_tag && !self.lacks_stage
    }

    /// The mutations-metric type of filling it.
    pub fn mutation(&self) -> &'static str {
        match self.location {
            Location::Object => "labels",
            Location::PodTemplate | Location::CronJobPodTemplate => "template-labels",
        }
    }
}

/// A workload's tag annotation copied into its pod template at admission,
/// so the pods created from the template (and the ReplicaSets between)
/// carry the tag the workload asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateTag<'a> {
    /// Where the pod template is.
    pub location: Location,
    /// The tag annotation key.
    pub key: &'a str,
    /// The workload's own annotation value, copied as is (the pods'
    /// admission makes it a valid label value, with its warning).
    pub value: &'a str,
    /// The template's different value it replaces, if any.
    pub previous: Option<&'a str>,
    /// Whether the template has `metadata` (absent: it is created).
    pub has_metadata: bool,
    /// Whether that `metadata` has `annotations` (absent: created).
    pub has_annotations: bool,
}

/// Something the user should know about a decision. [`Warning::reason`]
/// is a stable code (Event reasons, metric labels); `Display` is the text
/// users see (admission `warnings`, stderr offline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// A label already set (`label=value`) wins over the tag annotation.
    TagIgnored {
        /// The label key already set.
        label: String,
        /// Its value.
        value: String,
        /// The tag annotation key.
        annotation: String,
    },
    /// The tag annotation was not a valid label value and was rewritten.
    TagRewritten {
        /// The tag annotation key.
        annotation: String,
        /// The value given.
        requested: String,
        /// The label value used instead.
        value: String,
    },
    /// The bootstrap ConfigMap is missing in the object's namespace, so the
    /// template was not mounted.
    ConfigMapMissing {
        /// The ConfigMap name.
        config_map: String,
    },
    /// The pod's userVolume annotations are not JSON objects, so the
    /// template was not mounted.
    MalformedAnnotation,
    /// The pod's `proxy.istio.io/config` annotation is not a YAML/JSON
    /// mapping, so the agent keepalive was not set.
    MalformedProxyConfig,
    /// An `UPDATE` carries a tag annotation with nothing usable as a label
    /// value: allowed (never refused for what it already carried), but
    /// the tag is not copied into the pod template.
    TagUnusable {
        /// The annotation key.
        annotation: String,
        /// The value given.
        value: String,
        /// The label it would have become.
        label: String,
    },
    /// A workload's tag annotation was copied into its pod template over a
    /// different value, or by an `UPDATE` (a changed template rolls out
    /// new pods).
    TemplateTagCopied {
        /// The tag annotation key.
        annotation: String,
        /// The workload's value, now also the template's.
        value: String,
        /// The template's value before, if it had one.
        previous: Option<String>,
    },
    /// The object's own tag annotation is not what its pod template says,
    /// and a controller owns that template: the labels follow the
    /// template (what the pods get), not the object's annotation.
    TemplateTagDiffers {
        /// The tag annotation key.
        annotation: String,
        /// The object's own value.
        value: String,
        /// The template's value, if it has one.
        template: Option<String>,
    },
    /// A tag the object did not ask for itself (its owner's, or a copy of
    /// its Deployment's on an owned ReplicaSet) has nothing usable as a
    /// label value: the object is admitted without labels.
    OwnerTagUnusable {
        /// The annotation key.
        annotation: String,
        /// The value given.
        value: String,
        /// Where it is: `Deployment web`, or this object's own metadata.
        on: String,
    },
    /// Labelled `<stage>: <grayStage>` with no canary tag at all: no
    /// subset selects it (gray subsets select a tag too, `normal` selects
    /// the normal stage), so no route reaches it.
    GrayWithoutTag {
        /// The stage label, as `key=value`.
        stage: String,
        /// The tag label key.
        label: String,
        /// The tag annotation key.
        annotation: String,
    },
}

impl Warning {
    /// Every reason code, for documentation and tests.
    pub const REASONS: [&'static str; 10] = [
        "tag-ignored",
        "tag-rewritten",
        "configmap-missing",
        "malformed-annotation",
        "malformed-proxy-config",
        "tag-unusable",
        "template-tag-copied",
        "template-tag-differs",
        "gray-without-tag",
        "owner-tag-unusable",
    ];

    /// What to tell the user about a keepalive fix that was skipped, for the
    /// skips they can act on: a missing ConfigMap copy, a malformed
    /// annotation. The other skips are counted, not warned about.
    pub fn for_bootstrap_skip(skip: BootstrapSkip, policy: Policy<'_>) -> Option<Self> {
        match skip {
            BootstrapSkip::ConfigMapMissing => Some(Self::ConfigMapMissing {
                config_map: policy.bootstrap.config_map_name.clone(),
            }),
            BootstrapSkip::MalformedAnnotation => Some(Self::MalformedAnnotation),
            BootstrapSkip::MalformedProxyConfig => Some(Self::MalformedProxyConfig),
            _ => None,
        }
    }

    /// Stable kebab-case code: an Event reason and a metric label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TagIgnored { .. } => Self::REASONS[0],
            Self::TagRewritten { .. } => Self::REASONS[1],
            Self::ConfigMapMissing { .. } => Self::REASONS[2],
            Self::MalformedAnnotation => Self::REASONS[3],
            Self::MalformedProxyConfig => Self::REASONS[4],
            Self::TagUnusable { .. } => Self::REASONS[5],
            Self::TemplateTagCopied { .. } => Self::REASONS[6],
            Self::TemplateTagDiffers { .. } => Self::REASONS[7],
            Self::GrayWithoutTag { .. } => Self::REASONS[8],
            Self::OwnerTagUnusable { .. } => Self::REASONS[9],
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TagIgnored {
                label,
                value,
                annotation,
            } => write!(
                f,
                "label {label}={value} is already set; annotation {annotation} ignored"
            ),
            Self::TagRewritten {
                annotation,
                requested,
                value,
            } => write!(
                f,
                "annotation {annotation}: {requested:?} is not a valid label value; using {value:?}"
            ),
            Self::ConfigMapMissing { config_map } => write!(
                f,
                "ConfigMap {config_map} is missing in this namespace; the Istio sidecar keeps \
                 its default xds-grpc keepalive"
            ),
            Self::MalformedAnnotation => write!(
                f,
                "annotation {USER_VOLUME} or {USER_VOLUME_MOUNT} is not a JSON object; \
                 bootstrap keepalive template not mounted"
            ),
            Self::MalformedProxyConfig => write!(
                f,
                "annotation {PROXY_CONFIG} is not a YAML or JSON mapping with a proxyMetadata \
                 mapping; the Istio agent keeps its default keepalive"
            ),
            Self::TagUnusable {
                annotation,
                value,
                label,
            } => write!(
                f,
                "annotation {annotation}: {value:?} has no letters or digits to use as a canary \
                 tag, so it is not copied into the pod template; set it to a name made of \
                 [A-Za-z0-9._-] (it becomes the {label} label, at most 63 characters)"
            ),
            Self::TemplateTagCopied {
                annotation,
                value,
                previous,
            } => {
                write!(
                    f,
                    "annotation {annotation}: {value:?} copied into the pod template"
                )?;
                if let Some(previous) = previous {
                    write!(f, " over {previous:?}")?;
                }
                write!(f, "; a changed pod template rolls out new pods")
            }
            Self::TemplateTagDiffers {
                annotation,
                value,
                template,
            } => {
                write!(
                    f,
                    "annotation {annotation}: {value:?} is on this object but "
                )?;
                match template {
                    Some(t) => write!(f, "its pod template has {t:?}")?,
                    None => write!(f, "not on its pod template")?,
                }
                write!(
                    f,
                    ", which its controller owns: labels follow the pod template; set the tag \
                     in the controller's pod template"
                )
            }
            Self::OwnerTagUnusable {
                annotation,
                value,
                on,
            } => write!(
                f,
                "annotation {annotation}: {value:?} on {on} has no letters or digits to use as a \
                 canary tag: these pods get no labels (no subset selects them) until it is set \
                 to a name made of [A-Za-z0-9._-]"
            ),
            Self::GrayWithoutTag {
                stage,
                label,
                annotation,
            } => write!(
                f,
                "label {stage} without a {label} label: no subset selects these pods, so no \
                 route reaches them; set the annotation {annotation} on the pod template (or \
                 remove the label {stage})"
            ),
        }
    }
}

/// The canary tag the workload that owns an object asks for on its own
/// metadata: the nearest owner up the chain (Pod -> ReplicaSet ->
/// Deployment; Pod -> StatefulSet / DaemonSet / Job -> CronJob) whose
/// metadata carries the tag annotation, as the adapter's caches know it.
/// The core never looks it up itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerTag {
    /// The owner's API version, e.g. `apps/v1`.
    pub api_version: String,
    /// Its kind, e.g. `Deployment`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its uid (for Events about it).
    pub uid: String,
    /// The tag annotation's value, as written.
    pub value: String,
}

/// Where the tag annotation an object's intent came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagSource<'a> {
    /// The object's own metadata.
    Object,
    /// Its pod template.
    Template,
    /// The metadata of a workload that owns it.
    Owner(&'a OwnerTag),
}

/// The tag annotation an intent was resolved from, and where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedTag<'a> {
    /// The value as written.
    pub value: &'a str,
    /// Where it was found.
    pub source: TagSource<'a>,
}

/// Labels that say the opposite of what the object's workload asks for.
/// Labels are never overwritten, so the object stays in the wrong subset
/// until its pods are replaced: `check` reports it and the backfill warns
/// on the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contradiction {
    /// Labelled `<stage>: <normalStage>` while its tag annotation (its
    /// own, its template's or its owner's) asks for canary `tag`: canary
    /// code in the normal subset.
    CanaryLabelledNormal {
        /// The tag asked for, as a label value.
        tag: String,
    },
    /// Labelled a canary of `tag` while no tag annotation asks for one and
    /// its pod template does not label it so: out of the normal subset.
    NormalLabelledCanary {
        /// The tag it is labelled with.
        tag: String,
    },
}

impl Contradiction {
    /// Stable kebab-case code (a `check` finding, an Event reason).
    pub fn code(&self) -> &'static str {
        match self {
            Self::CanaryLabelledNormal { .. } => "canary-labelled-normal",
            Self::NormalLabelledCanary { .. } => "normal-labelled-canary",
        }
    }

    /// The command that fixes it for pods of the workload `kind`/`name` in
    /// `namespace` (a pod without one: `kind` `Pod`): labels are never
    /// overwritten, so the pods must be created again, and new ones are
    /// admitted with the labels their workload asks for.
    pub fn fix(&self, namespace: &str, kind: &str, name: &str) -> String {
        match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" => format!(
                "kubectl -n {namespace} rollout restart {}/{name}",
                kind.to_ascii_lowercase()
            ),
            "ReplicaSet" | "Job" => format!(
                "delete its pods so the {kind} creates them again: kubectl -n {namespace} delete \
                 pods -l <the {kind}'s selector>"
            ),
            "CronJob" => format!(
                "the next Job of CronJob {name} gets the right labels; delete the running pods to \
                 have them created again (kubectl -n {namespace} delete pod <name>)"
            ),
            _ => format!(
                "delete the pod and create it again (kubectl -n {namespace} delete pod {name})"
            ),
        }
    }
}

impl LabelPolicy {
    /// Whether `labels` (an object's, as they are) contradict `requested`
    /// (the tag annotation its intent was resolved from, if any; see
    /// [`Decision::requested`]). `template_labels_canary`: its pod template
    /// itself labels its pods a canary (then canary labels are the
    /// workload's own definition, not a contradiction).
    pub fn contradiction<M: StrMap + ?Sized>(
        &self,
        labels: Option<&M>,
        requested: Option<&str>,
        template_labels_canary: bool,
    ) -> Option<Contradiction> {
        let get = |key: &str| labels.and_then(|l| l.value(key));
        let stage = get(&self.stage)?;
        if stage == self.normal_stage {
            let tag = sanitize_tag(requested?)?.value;
            return Some(Contradiction::CanaryLabelledNormal { tag });
        }
        if stage == self.gray_stage && requested.is_none() && !template_labels_canary {
            let tag = get(&self.canary_tag)?.to_owned();
            return Some(Contradiction::NormalLabelledCanary { tag });
        }
        None
    }
}

/// What to do with an object that is not denied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision<'a> {
    /// Set when the object was left alone; everything else is then empty.
    pub skipped: Option<SkipReason>,
    /// What the object means; `None` when skipped or when it has no label
    /// map to fill (a workload without a pod template).
    pub intent: Option<Intent<'a>>,
    /// The label maps, primary first (the object, then its pod template),
    /// complete ones included.
    pub targets: Vec<LabelTarget>,
    /// The tag annotation a workload's pod template gets, at admission.
    pub template_tag: Option<TemplateTag<'a>>,
    /// What the bootstrap part decided, when it was considered.
    pub bootstrap: Option<BootstrapDecision<'a>>,
    /// Messages for the user.
    pub warnings: Vec<Warning>,
    /// The tag annotation the intent was resolved from (whether or not
    /// existing labels won over it), when there was one.
    pub requested: Option<RequestedTag<'a>>,
}

impl Decision<'_> {
    /// A decision to leave the object alone.
    pub fn skip(reason: SkipReason) -> Self {
        Self {
            skipped: Some(reason),
            ..Self::default()
        }
    }

    /// True when nothing would change: every target complete, no tag to
    /// copy and no bootstrap mount, annotation or keepalive env to add.
    pub fn is_noop(&self) -> bool {
        self.targets.iter().all(LabelTarget::is_complete)
            && self.template_tag.is_none()
            && self
                .bootstrap
                .as_ref()
                .is_none_or(|b| b.outcome().mutation().is_none())
    }

    /// What would change, for the mutations metric (`labels`,
    /// `template-labels`, `template-tag`, `bootstrap-annotations`,
    /// `bootstrap-volume`, `keepalive-proxy-config`, `keepalive-env`).
    pub fn mutations(&self) -> impl Iterator<Item = &'static str> + '_ {
        let labels = self
            .targets
            .iter()
            .filter(|t| !t.is_complete())
            .map(LabelTarget::mutation);
        let tag = self.template_tag.map(|_| "template-tag");
        let bootstrap = self.bootstrap.as_ref().and_then(|b| b.outcome().mutation());
        labels.chain(tag).chain(bootstrap)
    }

    /// What the bootstrap part did, for its metric.
    pub fn bootstrap_outcome(&self) -> Option<BootstrapOutcome> {
        self.bootstrap.as_ref().map(BootstrapDecision::outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_alone_have_a_meaning() {
        let policy = LabelPolicy::default();
        let none = policy.intent(None::<&BTreeMap<String, String>>);
        assert_eq!((none.tag(), none.stage()), (None, "normal"));
        let tagged = labels(&[("canarytag", "v2")]);
        let i = policy.intent(Some(&tagged));
        assert_eq!((i.tag(), i.stage()), (Some("v2"), "gray"));
        let custom = labels(&[("canarytag", "v2"), ("stage", "beta")]);
        let i = policy.intent(Some(&custom));
        assert_eq!((i.tag(), i.stage()), (Some("v2"), "beta"));
        let pairs: Vec<(&str, &str)> = i.labels().map(|l| (l.key, &*l.value)).collect();
        assert_eq!(pairs, [("canarytag", "v2"), ("stage", "beta")]);
    }

    #[test]
    fn labels_that_say_the_opposite_of_the_tag_asked_for_are_contradictions() {
        let policy = LabelPolicy::default();
        let normal = labels(&[("app", "web"), ("stage", "normal")]);
        let gray = labels(&[("stage", "gray"), ("canarytag", "beta")]);
        assert_eq!(
            policy.contradiction(Some(&normal), Some("feature/beta"), false),
            Some(Contradiction::CanaryLabelledNormal {
                tag: "feature-beta".into()
            })
        );
        assert_eq!(policy.contradiction(Some(&normal), None, false), None);
        // A tag with nothing usable asks for nothing a subset could select.
        assert_eq!(
            policy.contradiction(Some(&normal), Some("///"), false),
            None
        );
        assert_eq!(
            policy.contradiction(Some(&gray), None, false),
            Some(Contradiction::NormalLabelledCanary { tag: "beta".into() })
        );
        assert_eq!(policy.contradiction(Some(&gray), None, true), None);
        assert_eq!(policy.contradiction(Some(&gray), Some("beta"), false), None);
        // Unlabelled: nothing to contradict (the backfill labels it).
        assert_eq!(
            policy.contradiction(None::<&BTreeMap<String, String>>, Some("beta"), false),
            None
        );
        let codes = [
            Contradiction::CanaryLabelledNormal { tag: "a".into() }.code(),
            Contradiction::NormalLabelledCanary { tag: "a".into() }.code(),
        ];
        assert_eq!(codes, ["canary-labelled-normal", "normal-labelled-canary"]);
    }

    #[test]
    fn missing_labels_follow_the_flags() {
        let policy = LabelPolicy::default();
        let tagged = labels(&[("canarytag", "v2")]);
        let intent = policy.intent(Some(&tagged));
        let target = LabelTarget {
            location: Location::PodTemplate,
            has_metadata: true,
            has_labels: true,
            lacks_tag: false,
            lacks_stage: true,
        };
        let missing: Vec<_> = target
            .missing(&intent)
            .map(|l| (l.key, &*l.value))
            .collect();
        assert_eq!(missing, [("stage", "gray")]);
        assert!(!target.is_complete());
        assert_eq!(target.mutation(), "template-labels");
    }

    #[test]
    fn warnings_have_stable_reasons_and_the_messages_users_know() {
        let cases = [
            (
                Warning::TagIgnored {
                    label: "canarytag".into(),
                    value: "a".into(),
                    annotation: "canary-injector.io/tag".into(),
                },
                "tag-ignored",
                "label canarytag=a is already set; annotation canary-injector.io/tag ignored",
            ),
            (
                Warning::TagRewritten {
                    annotation: "canary-injector.io/tag".into(),
                    requested: "feature/x".into(),
                    value: "feature-x".into(),
                },
                "tag-rewritten",
                "annotation canary-injector.io/tag: \"feature/x\" is not a valid label value; \
                 using \"feature-x\"",
            ),
            (
                Warning::ConfigMapMissing {
                    config_map: "canary-injector-bootstrap".into(),
                },
                "configmap-missing",
                "ConfigMap canary-injector-bootstrap is missing in this namespace; the Istio \
                 sidecar keeps its default xds-grpc keepalive",
            ),
            (
                Warning::MalformedAnnotation,
                "malformed-annotation",
                "annotation sidecar.istio.io/userVolume or sidecar.istio.io/userVolumeMount is \
                 not a JSON object; bootstrap keepalive template not mounted",
            ),
            (
                Warning::MalformedProxyConfig,
                "malformed-proxy-config",
                "annotation proxy.istio.io/config is not a YAML or JSON mapping with a \
                 proxyMetadata mapping; the Istio agent keeps its default keepalive",
            ),
            (
                Warning::TagUnusable {
                    annotation: "canary-injector.io/tag".into(),
                    value: "///".into(),
                    label: "canarytag".into(),
                },
                "tag-unusable",
                "annotation canary-injector.io/tag: \"///\" has no letters or digits to use as a \
                 canary tag, so it is not copied into the pod template; set it to a name made of \
                 [A-Za-z0-9._-] (it becomes the canarytag label, at most 63 characters)",
            ),
            (
                Warning::TemplateTagCopied {
                    annotation: "canary-injector.io/tag".into(),
                    value: "v3".into(),
                    previous: Some("v2".into()),
                },
                "template-tag-copied",
                "annotation canary-injector.io/tag: \"v3\" copied into the pod template over \
                 \"v2\"; a changed pod template rolls out new pods",
            ),
            (
                Warning::TemplateTagDiffers {
                    annotation: "canary-injector.io/tag".into(),
                    value: "feature-x".into(),
                    template: None,
                },
                "template-tag-differs",
                "annotation canary-injector.io/tag: \"feature-x\" is on this object but not on \
                 its pod template, which its controller owns: labels follow the pod template; \
                 set the tag in the controller's pod template",
            ),
            (
                Warning::OwnerTagUnusable {
                    annotation: "canary-injector.io/tag".into(),
                    value: "///".into(),
                    on: "Deployment web".into(),
                },
                "owner-tag-unusable",
                "annotation canary-injector.io/tag: \"///\" on Deployment web has no letters or \
                 digits to use as a canary tag: these pods get no labels (no subset selects them) \
                 until it is set to a name made of [A-Za-z0-9._-]",
            ),
            (
                Warning::GrayWithoutTag {
                    stage: "stage=gray".into(),
                    label: "canarytag".into(),
                    annotation: "canary-injector.io/tag".into(),
                },
                "gray-without-tag",
                "label stage=gray without a canarytag label: no subset selects these pods, so no \
                 route reaches them; set the annotation canary-injector.io/tag on the pod \
                 template (or remove the label stage=gray)",
            ),
        ];
        for (warning, reason, text) in &cases {
            assert_eq!(warning.reason(), *reason);
            assert_eq!(warning.to_string(), *text);
            assert!(reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
        }
        assert_eq!(cases.len(), Warning::REASONS.len());
        let copied = Warning::TemplateTagCopied {
            annotation: "canary-injector.io/tag".into(),
            value: "v3".into(),
            previous: None,
        };
        assert_eq!(
            copied.to_string(),
            "annotation canary-injector.io/tag: \"v3\" copied into the pod template; a changed \
             pod template rolls out new pods"
        );
        let differs = Warning::TemplateTagDiffers {
            annotation: "canary-injector.io/tag".into(),
            value: "a".into(),
            template: Some("b".into()),
        };
        assert!(
            differs
                .to_string()
                .contains("\"a\" is on this object but its pod template has \"b\", which")
        );
    }
}
