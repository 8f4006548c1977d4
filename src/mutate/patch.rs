//! Renders a [`Decision`] as RFC 6902 JSON Patch operations: the one place
//! operations are built, for admission and the offline CLI.
//!
//! Label maps and annotation maps that do not exist are created whole
//! (`add /metadata/labels {..}`), existing ones get one `add` per missing
//! key; userVolume and `proxy.istio.io/config` annotations the pod already
//! has are `replace`d with the merged value, and so is a workload
//! template's different tag annotation; keepalive env entries are
//! appended to `istio-proxy`'s `env`. Keys are escaped per RFC 6901 (`example.com/stage` ->
//! `example.com~1stage`).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use serde_json::{Map, Value, json};

use super::bootstrap::{
    AgentEnv, AnnotationEdit, AnnotationTarget, BootstrapDecision, Edit, Mount, USER_VOLUME,
    USER_VOLUME_MOUNT, mount_fields, volume_source,
};
use super::decision::{Decision, Intent, LabelTarget, TemplateTag};
use super::kinds::Location;

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn pointer<'a>(location: Location, tail: impl IntoIterator<Item = &'a str>) -> PointerBuf {
    PointerBuf::from_tokens(location.tokens().iter().copied().chain(tail))
}

impl Decision<'_> {
    /// The JSON Patch that carries out this decision; empty when there is
    /// nothing to do. Applying it and deciding again gives a no-op decision.
    pub fn to_json_patch(&self) -> Vec<PatchOperation> {
        let mut ops = Vec::new();
        if let Some(intent) = &self.intent {
            for target in &self.targets {
                labels(target, intent, &mut ops);
            }
        }
        if let Some(tag) = &self.template_tag {
            template_tag(tag, &mut ops);
        }
        // When a label operation created a pod's `metadata`, annotations go
        // into it: a second `add /metadata` would replace the labels just
        // added.
        let created = |location: Location| {
            self.intent.is_some()
                && self
                    .targets
                    .iter()
                    .any(|t| t.location == location && !t.has_metadata && !t.is_complete())
        };
        match &self.bootstrap {
            Some(BootstrapDecision::Annotate(a)) => annotations(
                a.target,
                &[
                    (USER_VOLUME, &a.user_volume),
                    (USER_VOLUME_MOUNT, &a.user_volume_mount),
                ],
                created(a.target.location),
                &mut ops,
            ),
            Some(BootstrapDecision::ProxyConfig(p)) => annotations(
                p.target,
                &[(super::bootstrap::PROXY_CONFIG, &p.value)],
                created(p.target.location),
                &mut ops,
            ),
            Some(BootstrapDecision::Mount(m)) => mount(m, &mut ops),
            Some(BootstrapDecision::Env(e)) => env(e, &mut ops),
            Some(BootstrapDecision::AlreadyDone | BootstrapDecision::Skipped(_)) | None => {}
        }
        ops
    }

    /// Only the labels this decision adds to the object's own
    /// `metadata.labels`: what the backfill controller writes to a running
    /// object (never a template, never the bootstrap mount).
    pub fn object_labels_patch(&self) -> Vec<PatchOperation> {
        let mut ops = Vec::new();
        if let Some(intent) = &self.intent {
            for target in self
                .targets
                .iter()
                .filter(|t| t.location == Location::Object)
            {
                labels(target, intent, &mut ops);
            }
        }
        ops
    }
}

fn template_tag(tag: &TemplateTag<'_>, ops: &mut Vec<PatchOperation>) {
    let at = tag.location;
    let value = Value::String(tag.value.to_owned());
    if !tag.has_metadata {
        let mut map = Map::new();
        map.insert(tag.key.to_owned(), value);
        ops.push(add(
            pointer(at, ["metadata"]),
            json!({ "annotations": map }),
        ));
    } else if !tag.has_annotations {
        let mut map = Map::new();
        map.insert(tag.key.to_owned(), value);
        ops.push(add(
            pointer(at, ["metadata", "annotations"]),
            Value::Object(map),
        ));
    } else {
        let path = pointer(at, ["metadata", "annotations", tag.key]);
        ops.push(match tag.previous {
            Some(_) => PatchOperation::Replace(ReplaceOperation { path, value }),
            None => add(path, value),
        });
    }
}

fn labels(target: &LabelTarget, intent: &Intent<'_>, ops: &mut Vec<PatchOperation>) {
    if target.is_complete() {
        return;
    }
    let map = || {
        Value::Object(
            target
                .missing(intent)
                .map(|l| {
                    (
                        l.key.to_owned(),
                        Value::String(l.value.clone().into_owned()),
                    )
                })
                .collect(),
        )
    };
    let at = target.location;
    if !target.has_metadata {
        ops.push(add(pointer(at, ["metadata"]), json!({ "labels": map() })));
    } else if !target.has_labels {
        ops.push(add(pointer(at, ["metadata", "labels"]), map()));
    } else {
        for label in target.missing(intent) {
            ops.push(add(
                pointer(at, ["metadata", "labels", label.key]),
                Value::String(label.value.clone().into_owned()),
            ));
        }
    }
}

/// Sets `edits` on the annotations of `at`; `metadata_created`: an earlier
/// operation created its `metadata`.
fn annotations(
    at: AnnotationTarget,
    edits: &[(&str, &AnnotationEdit)],
    metadata_created: bool,
    ops: &mut Vec<PatchOperation>,
) {
    let location = at.location;
    let all = || {
        Value::Object(
            edits
                .iter()
                .map(|(key, edit)| ((*key).to_owned(), Value::String(edit.value.clone())))
                .collect(),
        )
    };
    if !at.has_metadata && !metadata_created {
        ops.push(add(
            pointer(location, ["metadata"]),
            json!({ "annotations": all() }),
        ));
        return;
    }
    if !at.has_annotations || metadata_created {
        ops.push(add(pointer(location, ["metadata", "annotations"]), all()));
        return;
    }
    for (key, edit) in edits {
        let path = pointer(location, ["metadata", "annotations", key]);
        let value = Value::String(edit.value.clone());
        match edit.edit {
            Edit::Add => ops.push(add(path, value)),
            Edit::Replace => ops.push(PatchOperation::Replace(ReplaceOperation { path, value })),
            Edit::Keep => {}
        }
    }
}

fn with_name(name: &str, fields: Value) -> Value {
    let mut map = Map::new();
    map.insert("name".into(), Value::String(name.into()));
    if let Value::Object(rest) = fields {
        map.extend(rest);
    }
    Value::Object(map)
}

fn mount(m: &Mount<'_>, ops: &mut Vec<PatchOperation>) {
    let at = m.location;
    let volume = with_name(&m.volume_name, volume_source(m.config_map_name));
    if m.has_volumes {
        ops.push(add(pointer(at, ["spec", "volumes", "-"]), volume));
    } else {
        ops.push(add(pointer(at, ["spec", "volumes"]), json!([volume])));
    }
    let mount = with_name(&m.volume_name, mount_fields());
    let index = m.index.to_string();
    let list = m.container.field();
    if m.has_volume_mounts {
        ops.push(add(
            pointer(at, ["spec", list, &index, "volumeMounts", "-"]),
            mount,
        ));
    } else {
        ops.push(add(
            pointer(at, ["spec", list, &index, "volumeMounts"]),
            json!([mount]),
        ));
    }
}

/// Appends the keepalive variables to `istio-proxy`'s `env` (created when
/// absent); existing entries are never touched.
fn env(e: &AgentEnv, ops: &mut Vec<PatchOperation>) {
    let var = |(name, value): &(&str, String)| json!({"name": name, "value": value});
    let index = e.index.to_string();
    let list = e.container.field();
    if e.has_env {
        for v in &e.vars {
            ops.push(add(
                pointer(e.location, ["spec", list, &index, "env", "-"]),
                var(v),
            ));
        }
    } else {
        ops.push(add(
            pointer(e.location, ["spec", list, &index, "env"]),
            Value::Array(e.vars.iter().map(var).collect()),
        ));
    }
}
