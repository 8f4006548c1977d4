//! Make before break: the next write that brings a Service's DestinationRule
//! and VirtualService closer to its live tags, as a pure function of what
//! the cluster holds now. The controller applies one [`Step`], reads the
//! result back, and asks again until [`plan`] has nothing left to do.
//!
//! Two rules make every intermediate state safe, whatever order steps come in:
//! - the VirtualService routes only to subsets the DestinationRule already
//!   holds and that have a ready pod (a new tag's route comes after its
//!   subset was written; the default route goes to `normal` only while a
//!   normal pod is ready, else to the Service host without a subset;
//!   without a `normal` subset there is no VirtualService write at all, so
//!   the subset exists before the default route can name it);
//! - the DestinationRule keeps every subset the VirtualService still routes
//!   to (a tag's subset goes after its route was removed).
//!
//! A tag that is no longer live loses its route at once and its subset
//! when `grace` has passed since it went away (Envoy sidecars get the route
//! change before the subset disappears). When both objects need a write, the
//! VirtualService goes first: removing a route to pods that are gone matters
//! most. The time each such subset may go is written on the DestinationRule
//! ([`REMOVAL_DUE_ANNOTATION`]), so a restart or a new leader keeps it
//! rather than starting the grace again. Times are wall-clock times, in
//! whole seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;

use super::objects::{DestinationRuleSpec, Observed, REMOVAL_DUE_ANNOTATION, VirtualServiceSpec};
use super::{
    DefaultRoute, DestinationRule, Live, NORMAL_SUBSET, RouteSettings, ServiceRef, VirtualService,
    assign_names, destination_rule, virtual_service, weighted,
};
use crate::mutate::LabelPolicy;

/// Everything [`plan`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The Service.
    pub service: &'a ServiceRef,
    /// The request header that selects a tag.
    pub header: &'a str,
    /// The label vocabulary (subset selectors).
    pub labels: &'a LabelPolicy,
    /// What has at least one ready endpoint now: tags, and normal pods.
    pub live: &'a Live,
    /// Our DestinationRule as the cluster holds it (`None`: absent). The
    /// caller has ruled out conflicts: an object here is ours.
    pub destination_rule: Option<&'a Observed<DestinationRuleSpec>>,
    /// Our VirtualService as the cluster holds it.
    pub virtual_service: Option<&'a Observed<VirtualServiceSpec>>,
    /// When the subset of each tag that is not live may go, as returned by
    /// the last plan (empty at first: the DestinationRule's
    /// [`REMOVAL_DUE_ANNOTATION`] says, else a tag found gone starts its
    /// grace now).
    pub due: &'a BTreeMap<String, Timestamp>,
    /// Now (wall clock).
    pub now: Timestamp,
    /// How long a subset outlives its tag (`routes.removalGraceSeconds`).
    pub grace: Duration,
    /// The Service's route settings (timeout, retries) for every route.
    pub settings: &'a RouteSettings,
}

/// A write of one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Write<T> {
    /// The object to write.
    pub object: T,
    /// The object is absent: create it. Else apply it over the observed one.
    pub create: bool,
    /// The observed `resourceVersion` (a precondition of the apply).
    pub resource_version: Option<String>,
    /// Tags that gain a subset (DestinationRule) or a route (VirtualService).
    pub added: Vec<String>,
    /// Tags that lose theirs.
    pub removed: Vec<String>,
    /// Where the default route goes now, when this VirtualService write
    /// changes it (`None` for a DestinationRule write and when it stays).
    pub default: Option<DefaultChange>,
}

/// A change of where the default route sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultChange {
    /// Where it went before: `None` when the VirtualService is created, or
    /// its default route was not one canary-injector writes.
    pub from: Option<DefaultRoute>,
    /// Where it goes now.
    pub to: DefaultRoute,
}

/// The next write.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Write the DestinationRule.
    DestinationRule(Write<DestinationRule>),
    /// Write the VirtualService.
    VirtualService(Write<VirtualService>),
}

/// What [`plan`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The next write; `None` when everything is in place (for now).
    pub step: Option<Step>,
    /// When the subset of each tag that is not live may go: pass it to
    /// the next plan.
    pub due: BTreeMap<String, Timestamp>,
    /// When to plan again even if nothing changes (a grace period ends).
    pub wake_at: Option<Timestamp>,
    /// The live canaries' weights add up to this, more than 100: the
    /// default route keeps the split it has (to report).
    pub weights_over: Option<u32>,
}

/// Reads [`REMOVAL_DUE_ANNOTATION`]: tag -> time. Entries that do not read
/// are left out (their subsets get a fresh grace period).
pub fn removal_due(annotation: Option<&str>) -> BTreeMap<String, Timestamp> {
    annotation
        .and_then(|a| serde_json::from_str::<BTreeMap<String, String>>(a).ok())
        .into_iter()
        .flatten()
        .filter_map(|(tag, at)| Some((tag, at.parse().ok()?)))
        .collect()
}

/// `now + grace`, rounded up to a whole second (what the annotation holds).
fn due_after(now: Timestamp, grace: Duration) -> Timestamp {
    let at = now + grace;
    let whole = at.as_second() + i64::from(at.subsec_nanosecond() > 0);
    Timestamp::from_second(whole).unwrap_or(at)
}

/// Tags of the gray subsets of a DestinationRule spec (tag -> subset name),
/// and whether it has the `normal` subset as we write it. Subsets of
/// another shape are not ours to interpret (and are dropped by our next
/// write).
pub fn subsets(
    spec: &DestinationRuleSpec,
    labels: &LabelPolicy,
) -> (bool, BTreeMap<String, String>) {
    let mut normal = false;
    let mut tags = BTreeMap::new();
    for subset in &spec.subsets {
        let l = &subset.labels;
        if subset.name == NORMAL_SUBSET {
            normal |= l.len() == 1 && l.get(&labels.stage) == Some(&labels.normal_stage);
        } else if l.len() == 2
            && l.get(&labels.stage) == Some(&labels.gray_stage)
            && let Some(tag) = l.get(&labels.canary_tag).filter(|t| !t.is_empty())
        {
            tags.entry(tag.clone())
                .or_insert_with(|| subset.name.clone());
        }
    }
    (normal, tags)
}

/// The tags a VirtualService spec routes by `header` (tag -> subset), and
/// every subset any of its routes sends to.
pub fn routes(
    spec: &VirtualServiceSpec,
    header: &str,
) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut tags = BTreeMap::new();
    let mut referenced = BTreeSet::new();
    for route in &spec.http {
        let subsets: Vec<&String> = route
            .route
            .iter()
            .filter_map(|r| r.destination.subset.as_ref())
            .collect();
        referenced.extend(subsets.iter().map(|s| (*s).clone()));
        let tag = route
            .matches
            .iter()
            .find_map(|m| m.headers.get(header)?.exact.as_ref());
        if let (Some(tag), Some(subset)) = (tag, subsets.first()) {
            tags.entry(tag.clone()).or_insert_with(|| (*subset).clone());
        }
    }
    (tags, referenced)
}

/// Where the default route (the last route, without a match) of a
/// VirtualService spec for `host` sends requests, when it is one
/// canary-injector writes.
pub fn default_route(spec: &VirtualServiceSpec, host: &str) -> Option<DefaultRoute> {
    let last = spec.http.last().filter(|r| r.matches.is_empty())?;
    if last.route.iter().any(|d| d.destination.host != host) {
        return None;
    }
    let weighted =
        |d: &super::objects::RouteDestination| d.destination.subset.is_some() && d.weight.is_some();
    match last.route.as_slice() {
        [only] => match only.destination.subset.as_deref() {
            Some(NORMAL_SUBSET) => Some(DefaultRoute::Normal),
            None => Some(DefaultRoute::Service),
            Some(_) if only.weight == Some(100) => Some(DefaultRoute::Normal),
            Some(_) => None,
        },
        [] => None,
        // A weighted gray stage: the split of the normal default route.
        many if many.iter().all(weighted) => Some(DefaultRoute::Normal),
        _ => None,
    }
}

/// The weighted split of a VirtualService spec's default route: subset ->
/// percent, for the subsets other than `normal`.
pub fn split_of(spec: &VirtualServiceSpec) -> BTreeMap<String, u8> {
    spec.http
        .last()
        .filter(|r| r.matches.is_empty())
        .into_iter()
        .flat_map(|r| &r.route)
        .filter_map(|d| {
            let subset = d.destination.subset.as_ref()?;
            let weight = u8::try_from(d.weight?).ok()?;
            (subset != NORMAL_SUBSET).then(|| (subset.clone(), weight))
        })
        .collect()
}

/// The tags in `after` and not in `before`, and those in `before` and not
/// in `after`.
pub(super) fn changes(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> (Vec<String>, Vec<String>) {
    let added = after
        .keys()
        .filter(|t| !before.contains_key(*t))
        .cloned()
        .collect();
    let removed = before
        .keys()
        .filter(|t| !after.contains_key(*t))
        .cloned()
        .collect();
    (added, removed)
}

/// The next write for one Service (see the module docs).
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let dr_spec = input.destination_rule.and_then(|o| o.spec.as_ref());
    let vs_spec = input.virtual_service.and_then(|o| o.spec.as_ref());
    let (has_normal, written) = dr_spec
        .map(|s| subsets(s, input.labels))
        .unwrap_or_default();
    let (routed, referenced) = vs_spec.map(|s| routes(s, input.header)).unwrap_or_default();

    // When each gone tag's subset may go: as written on the
    // DestinationRule, else as planned before, else a grace from now.
    let persisted = removal_due(
        input
            .destination_rule
            .and_then(|o| o.removal_due.as_deref()),
    );
    let due: BTreeMap<String, Timestamp> = written
        .keys()
        .chain(routed.keys())
        .filter(|t| !input.live.tags.contains(*t))
        .map(|t| {
            let at = persisted
                .get(t)
                .or_else(|| input.due.get(t))
                .copied()
                .unwrap_or_else(|| due_after(input.now, input.grace));
            (t.clone(), at)
        })
        .collect();
    let in_grace = |tag: &str| due.get(tag).is_some_and(|at| input.now < *at);

    // The DestinationRule: live tags, tags in their grace period, and every
    // subset the VirtualService still routes to. Existing names are kept.
    let keep = written
        .iter()
        .filter(|(tag, name)| in_grace(tag) || referenced.contains(*name))
        .map(|(tag, _)| tag.as_str())
        .chain(input.live.tags.iter().map(String::as_str));
    let names = assign_names(keep, &written);
    let mut dr = destination_rule(input.service, &names, input.labels);
    let kept_for_grace: BTreeMap<&str, String> = names
        .keys()
        .filter_map(|t| Some((t.as_str(), due.get(t)?.to_string())))
        .collect();
    // Once written, the annotation stays (`{}` when nothing is due): an
    // apply that leaves a field out removes it only when no other write
    // (our own create among them) set it too.
    let has_annotation = input
        .destination_rule
        .is_some_and(|o| o.removal_due.is_some());
    if !kept_for_grace.is_empty() || has_annotation {
        dr.metadata.annotations.insert(
            REMOVAL_DUE_ANNOTATION.to_owned(),
            serde_json::to_string(&kept_for_grace).unwrap_or_default(),
        );
    }
    let dr_step = match input.destination_rule {
        Some(o) if o.holds(&dr.metadata, &dr.spec) => None,
        observed => {
            let (added, removed) = changes(&written, &names);
            Some(Step::DestinationRule(Write {
                create: observed.is_none(),
                resource_version: observed.and_then(|o| o.resource_version.clone()),
                object: dr,
                added,
                removed,
                default: None,
            }))
        }
    };

    // The VirtualService: routes only to subsets the DestinationRule holds
    // and that have a ready pod; the default route to `normal` only while a
    // normal pod is ready (split by the canaries' weights), else to the
    // whole Service.
    let mut weights_over = None;
    let vs_step = has_normal
        .then(|| {
            let targets: BTreeMap<String, String> = written
                .iter()
                .filter(|(tag, _)| input.live.tags.contains(*tag))
                .map(|(t, n)| (t.clone(), n.clone()))
                .collect();
            let to = input.live.default_route();
            let split = match weighted(&targets, input.live, to) {
                Ok(split) => split,
                // Over 100: the split written before stands, for the
                // canaries it still routes to.
                Err(sum) => {
                    weights_over = Some(sum);
                    let kept: BTreeSet<&String> = targets.values().collect();
                    vs_spec
                        .map(split_of)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(subset, _)| kept.contains(subset))
                        .collect()
                }
            };
            let vs = virtual_service(
                input.service,
                input.header,
                &targets,
                to,
                &split,
                input.settings,
            );
            match input.virtual_service {
                Some(o) if o.holds(&vs.metadata, &vs.spec) => None,
                observed => {
                    let (added, removed) = changes(&routed, &targets);
                    let from = vs_spec.and_then(|s| default_route(s, &input.service.name));
                    Some(Step::VirtualService(Write {
                        create: observed.is_none(),
                        resource_version: observed.and_then(|o| o.resource_version.clone()),
                        object: vs,
                        added,
                        removed,
                        default: (from != Some(to)).then_some(DefaultChange { from, to }),
                    }))
                }
            }
        })
        .flatten();

    let wake_at = due
        .iter()
        .filter(|(tag, _)| written.contains_key(*tag))
        .map(|(_, at)| *at)
        .filter(|at| *at > input.now)
        .min();
    Plan {
        step: vs_step.or(dr_step),
        due,
        wake_at,
        weights_over,
    }
}

/// A delete of one of our objects, with the preconditions that make sure it
/// is still the object we saw (never someone else's that took its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Which object (named after the Service).
    pub kind: super::RuleKind,
    /// Its uid.
    pub uid: Option<String>,
    /// Its resourceVersion.
    pub resource_version: Option<String>,
}

/// The next delete when a Service no longer wants routes (annotation
/// removed, namespace opted out): the VirtualService first (requests go to
/// the whole Service again), then the DestinationRule. Objects not labelled
/// as ours are never deleted.
pub fn plan_removal(
    destination_rule: Option<&Observed<DestinationRuleSpec>>,
    virtual_service: Option<&Observed<VirtualServiceSpec>>,
) -> Option<Removal> {
    if let Some(vs) = virtual_service.filter(|o| o.managed) {
        return Some(Removal {
            kind: super::RuleKind::VirtualService,
            uid: vs.uid.clone(),
            resource_version: vs.resource_version.clone(),
        });
    }
    destination_rule.filter(|o| o.managed).map(|dr| Removal {
        kind: super::RuleKind::DestinationRule,
        uid: dr.uid.clone(),
        resource_version: dr.resource_version.clone(),
    })
}
