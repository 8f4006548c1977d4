//! What a review leaves behind besides its answer, never awaited: a
//! Kubernetes Event (type Warning) on the owner of an object a controller
//! created, for each warning and for a deny (nobody reads the admission
//! warnings of a pod a ReplicaSet created), and the count of rewritten
//! tags (once per object that carries the tag itself: [`counts_tag`]). Events only queue ([`EventSink::emit`] never blocks: a full queue
//! drops and counts), so a slow or failing event publisher never slows or
//! fails a review. Dry-run reviews leave nothing (`sideEffects:
//! NoneOnDryRun`).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;

use super::State;
use crate::admission::Reviewed;
use crate::cluster::events::EventRequest;

/// The `reason` code of a rewritten tag ([`crate::mutate::Warning::reason`]).
const TAG_REWRITTEN: &str = "tag-rewritten";

/// Queues the Events and counts the rewritten tags of `reviewed`.
pub(super) fn report(state: &State, reviewed: &Reviewed) {
    if reviewed.dry_run {
        return;
    }
    if counts_tag(reviewed) {
        let rewritten = reviewed
            .warning_reasons
            .iter()
            .filter(|r| **r == TAG_REWRITTEN)
            .count();
        if rewritten > 0 {
            state.metrics.tags_rewritten(rewritten as u64);
        }
    }
    for event in owner_events(reviewed) {
        state.events.emit(event);
    }
}

/// Whether a rewritten tag in `reviewed` is counted: once per object that
/// carries the tag itself, when it takes it on. That is an object without
/// a managing controller (a workload, a Pod or ReplicaSet someone created)
/// at its `CREATE`, or at an `UPDATE` that copies a changed tag into its
/// pod template. Not the ReplicaSets and Pods a controller creates from a
/// template (they inherit the tag: a Deployment of 50 replicas would count
/// 52, and every restart once more), nor a workload's other `UPDATE`s.
/// Their warnings still become Events on their owners.
fn counts_tag(reviewed: &Reviewed) -> bool {
    reviewed.owner.is_none()
        && (reviewed.operation == "CREATE" || reviewed.mutations.contains(&"template-tag"))
}

/// Warnings worth an Event on the object itself when no controller owns
/// it (its creator may never read an admission warning, say an apply in a
/// pipeline): what leaves it out of every route.
const SELF_REPORTED: &[&str] = &["gray-without-tag"];

/// One Event per warning and one for a deny, on the object's managing
/// controller. An object without one gets Events only for the warnings of
/// [`SELF_REPORTED`], on itself (its creator saw the others in the API
/// response).
pub(crate) fn owner_events(reviewed: &Reviewed) -> Vec<EventRequest> {
    if reviewed.warnings.is_empty() && reviewed.deny_reason.is_none() {
        return Vec::new();
    }
    let Some(owner) = &reviewed.owner else {
        return self_events(reviewed);
    };
    let regarding = ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: Some(reviewed.namespace.clone()).filter(|ns| !ns.is_empty()),
        uid: Some(owner.uid.clone()),
        ..ObjectReference::default()
    };
    // The owner's Events name the object: a controller's pods share a
    // generateName, so repeats of one warning aggregate into a series.
    let about = |text: &str| format!("{} {}: {text}", reviewed.kind, reviewed.name);
    let warnings = reviewed
        .warning_reasons
        .iter()
        .zip(&reviewed.warnings)
        .map(|(reason, text)| (pascal_case("", reason), "Admit", about(text)));
    let deny = reviewed
        .deny_reason
        .zip(reviewed.denied.as_deref())
        .map(|(reason, text)| (pascal_case("Denied", reason), "Deny", about(text)));
    warnings
        .chain(deny)
        .map(|(reason, action, note)| EventRequest {
            regarding: regarding.clone(),
            type_: EventType::Warning,
            reason,
            action: action.into(),
            note,
        })
        .collect()
}

/// The Events of [`SELF_REPORTED`] warnings, on the object itself (when it
/// has a name: a controller's pods have one only after admission).
fn self_events(reviewed: &Reviewed) -> Vec<EventRequest> {
    if reviewed.name.is_empty() || reviewed.name.ends_with('*') {
        return Vec::new();
    }
    let regarding = ObjectReference {
        api_version: Some(reviewed.api_version.clone()),
        kind: Some(reviewed.kind.clone()),
        name: Some(reviewed.name.clone()),
        namespace: Some(reviewed.namespace.clone()).filter(|ns| !ns.is_empty()),
        ..ObjectReference::default()
    };
    reviewed
        .warning_reasons
        .iter()
        .zip(&reviewed.warnings)
        .filter(|(reason, _)| SELF_REPORTED.contains(reason))
        .map(|(reason, text)| EventRequest {
            regarding: regarding.clone(),
            type_: EventType::Warning,
            reason: pascal_case("", reason),
            action: "Admit".into(),
            note: text.clone(),
        })
        .collect()
}

/// `prefix` + a kebab-case code in PascalCase (`tag-rewritten` ->
/// `TagRewritten`), the spelling of Event reasons.
fn pascal_case(prefix: &str, code: &str) -> String {
    let mut out = String::from(prefix);
    for word in code.split('-') {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests;
