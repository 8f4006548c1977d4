//! Offline mutation (`canary-injector mutate -f`): the admission rules
//! applied to manifests, like `istioctl kube-inject`.
//!
//! Every kind of the table ([`crate::mutate::KINDS`]), matched on API group
//! and kind: Pods and ReplicaSets follow the admission rules; Deployments,
//! StatefulSets, DaemonSets, Jobs and CronJobs get their pod template
//! labelled (a source edit, which is safe). `kind: List` items are handled
//! one by one. Other kinds, including a CRD that reuses a name such as
//! `Deployment` in its own group, pass through unchanged; a document
//! without `apiVersion` is matched on its kind name.

use json_patch::PatchOperation;
use json_patch::jsonptr::PointerBuf;
use serde_json::Value;

use crate::config::Config;
use crate::mutate::{self, ClusterView, Deny, Kind, Mode, ObjectView, Operation, Subject};

/// Why the input could not be mutated.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The input is not YAML or JSON.
    #[error("invalid YAML/JSON input: {0}")]
    Parse(String),
    /// A document is not a mapping.
    #[error("document {index}: not a Kubernetes object (expected a mapping)")]
    NotAnObject {
        /// 1-based document number.
        index: usize,
    },
    /// A document does not have the shape of its kind.
    #[error("document {index} ({kind} {name}): {reason}")]
    Malformed {
        /// 1-based document number.
        index: usize,
        /// The document kind.
        kind: String,
        /// The document name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The rules refuse a document (e.g. an unusable tag).
    #[error("document {index} ({kind} {name}): {deny}")]
    Denied {
        /// 1-based document number.
        index: usize,
        /// The document kind.
        kind: String,
        /// The document name.
        name: String,
        /// The reason.
        deny: Box<Deny>,
    },
    /// The patch did not apply (a bug: the core only adds what is missing
    /// and replaces what it merged).
    #[error("document {index}: patch failed: {reason}")]
    Patch {
        /// 1-based document number.
        index: usize,
        /// The json-patch error.
        reason: String,
    },
    /// Output could not be rendered.
    #[error("cannot render output: {0}")]
    Render(String),
}

/// The result of an offline run.
#[derive(Debug, Default)]
pub struct Output {
    /// The mutated documents (YAML), or one JSON Patch array per document.
    pub text: String,
    /// Warnings, prefixed with the document they concern.
    pub warnings: Vec<String>,
}

/// Parses `input` (one or more YAML or JSON documents) and applies the rules.
/// With `patch_only`, `text` holds one JSON Patch array per document, one
/// per line, instead of the documents.
pub fn mutate_documents(
    input: &str,
    cfg: &Config,
    patch_only: bool,
) -> Result<Output, OfflineError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(input).map_err(|e| OfflineError::Parse(e.to_string()))?;
    let mut out = Output::default();
    let mut rendered = Vec::with_capacity(docs.len());
    let mut patches = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let index = i + 1;
        let mut ops = Vec::new();
        if doc.get("kind").and_then(Value::as_str) == Some("List") {
            if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
                for (j, item) in items.iter_mut().enumerate() {
                    let item_ops = mutate_one(item, index, cfg, &mut out.warnings)?;
                    ops.extend(item_ops.into_iter().map(|op| prefix(op, j)));
                }
            }
        } else {
            ops = mutate_one(&mut doc, index, cfg, &mut out.warnings)?;
        }
        patches.push(ops);
        rendered.push(doc);
    }
    out.text = if patch_only {
        let mut text = String::new();
        for ops in &patches {
            text.push_str(
                &serde_json::to_string(ops).map_err(|e| OfflineError::Render(e.to_string()))?,
            );
            text.push('\n');
        }
        text
    } else {
        serde_saphyr::to_string_multiple(&rendered)
            .map_err(|e| OfflineError::Render(e.to_string()))?
    };
    Ok(out)
}

/// Rebases a list item's operation under `/items/<j>`: every path, and the
/// `from` of `move` and `copy`, whatever the operation.
fn prefix(op: PatchOperation, j: usize) -> PatchOperation {
    let rebase = |path: &mut PointerBuf| {
        let mut rebased = PointerBuf::from_tokens(["items".to_string(), j.to_string()]);
        rebased.append(&*path);
        *path = rebased;
    };
    let mut op = op;
    match &mut op {
        PatchOperation::Add(o) => rebase(&mut o.path),
        PatchOperation::Remove(o) => rebase(&mut o.path),
        PatchOperation::Replace(o) => rebase(&mut o.path),
        PatchOperation::Move(o) => {
            rebase(&mut o.from);
            rebase(&mut o.path);
        }
        PatchOperation::Copy(o) => {
            rebase(&mut o.from);
            rebase(&mut o.path);
        }
        PatchOperation::Test(o) => rebase(&mut o.path),
    }
    op
}

/// Applies the rules to one object in place; returns the operations applied.
fn mutate_one(
    doc: &mut Value,
    index: usize,
    cfg: &Config,
    warnings: &mut Vec<String>,
) -> Result<Vec<PatchOperation>, OfflineError> {
    if !doc.is_object() {
        return Err(OfflineError::NotAnObject { index });
    }
    let text = |pointer: &str| doc.pointer(pointer).and_then(Value::as_str);
    let kind_name = text("/kind").unwrap_or_default().to_owned();
    // With an `apiVersion`, its group must match (a CRD may reuse the name
    // `Deployment`); without one, the name decides.
    let kind = match text("/apiVersion") {
        Some(api_version) => Kind::from_api_version(api_version, &kind_name),
        None => Kind::from_name(&kind_name),
    };
    let Some(kind) = kind else {
        return Ok(Vec::new());
    };
    let name = text("/metadata/name")
        .or_else(|| text("/metadata/generateName"))
        .unwrap_or("<unnamed>")
        .to_owned();
    let namespace = text("/metadata/namespace").unwrap_or_default().to_owned();
    let object: ObjectView =
        serde_json::from_value(doc.clone()).map_err(|e| OfflineError::Malformed {
            index,
            kind: kind_name.clone(),
            name: name.clone(),
            reason: e.to_string(),
        })?;
    let subject = Subject {
        kind: Some(kind),
        operation: Operation::Create,
        namespace: &namespace,
        sub_resource: "",
        mode: Mode::Offline,
    };
    let decision =
        mutate::decide(&subject, &object, cfg.policy(), &ClusterView::OFFLINE).map_err(|deny| {
            OfflineError::Denied {
                index,
                kind: kind_name.clone(),
                name: name.clone(),
                deny: Box::new(deny),
            }
        })?;
    warnings.extend(
        decision
            .warnings
            .iter()
            .map(|w| format!("document {index} ({kind_name} {name}): {w}")),
    );
    let ops = decision.to_json_patch();
    json_patch::patch(doc, &ops).map_err(|e| OfflineError::Patch {
        index,
        reason: e.to_string(),
    })?;
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mutate::bootstrap::{USER_VOLUME, USER_VOLUME_MOUNT};

    fn istio_1_5() -> Config {
        let mut cfg = Config::default();
        cfg.istio.proxy_version = Some("1.5".into());
        cfg
    }

    fn patches(text: &str) -> Vec<Vec<PatchOperation>> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A List item whose userVolume annotation exists gets a `replace`,
    /// rebased under `/items/<j>` like every other operation, so the printed
    /// patch applies to the input document and gives the mutated one.
    #[test]
    fn list_patches_rebase_every_operation() {
        let pod = |name: &str, annotations: Value| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "annotations": annotations},
                   "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
        };
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}},
            pod("plain", json!({})),
            pod("with-volume", json!({
                USER_VOLUME: r#"{"data":{"emptyDir":{}}}"#,
                USER_VOLUME_MOUNT: r#"{"data":{"mountPath":"/data"}}"#,
            })),
        ]});
        let input = list.to_string();
        let cfg = istio_1_5();

        let printed = mutate_documents(&input, &cfg, true).unwrap();
        let ops = &patches(&printed.text)[0];
        let replaces: Vec<String> = ops
            .iter()
            .filter(|op| matches!(op, PatchOperation::Replace(_)))
            .map(|op| op.path().to_string())
            .collect();
        assert_eq!(
            replaces,
            [
                "/items/2/metadata/annotations/sidecar.istio.io~1userVolume",
                "/items/2/metadata/annotations/sidecar.istio.io~1userVolumeMount",
            ]
        );
        assert!(
            ops.iter()
                .all(|op| op.path().to_string().starts_with("/items/")),
            "{ops:?}"
        );

        let mut patched = list.clone();
        json_patch::patch(&mut patched, ops).unwrap();
        let mutated = mutate_documents(&input, &cfg, false).unwrap();
        let expected: Value = serde_saphyr::from_str(&mutated.text).unwrap();
        assert_eq!(patched, expected);
        let volumes: Value = serde_json::from_str(
            patched["items"][2]["metadata"]["annotations"][USER_VOLUME]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(volumes["data"], json!({"emptyDir": {}}), "user volume kept");
        assert!(volumes.get("canary-injector-bootstrap").is_some());
        assert_eq!(patched["items"][0], list["items"][0], "Service untouched");

        // The output is a fixed point.
        let again = mutate_documents(&mutated.text, &cfg, true).unwrap();
        assert_eq!(again.text.trim(), "[]");
    }

    #[test]
    fn every_operation_kind_is_rebased() {
        let ops: Vec<PatchOperation> = serde_json::from_value(json!([
            {"op": "add", "path": "/a", "value": 1},
            {"op": "remove", "path": "/b"},
            {"op": "replace", "path": "/c", "value": 2},
            {"op": "move", "from": "/d", "path": "/e"},
            {"op": "copy", "from": "/f", "path": "/g/x~1y"},
            {"op": "test", "path": "", "value": 3},
        ]))
        .unwrap();
        let rebased: Vec<PatchOperation> = ops.into_iter().map(|op| prefix(op, 7)).collect();
        assert_eq!(
            serde_json::to_value(&rebased).unwrap(),
            json!([
                {"op": "add", "path": "/items/7/a", "value": 1},
                {"op": "remove", "path": "/items/7/b"},
                {"op": "replace", "path": "/items/7/c", "value": 2},
                {"op": "move", "from": "/items/7/d", "path": "/items/7/e"},
                {"op": "copy", "from": "/items/7/f", "path": "/items/7/g/x~1y"},
                {"op": "test", "path": "/items/7", "value": 3},
            ])
        );
    }

    /// A CRD that reuses the name `Deployment` in its own group is not ours.
    #[test]
    fn kind_names_in_other_groups_pass_through() {
        let doc = json!({"apiVersion": "example.com/v1", "kind": "Deployment",
            "metadata": {"name": "web", "annotations": {"canary-injector.io/tag": "v2"}},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {}}}});
        let out = mutate_documents(&doc.to_string(), &Config::default(), true).unwrap();
        assert_eq!(out.text.trim(), "[]");
        assert!(out.warnings.is_empty());
        let out = mutate_documents(&doc.to_string(), &Config::default(), false).unwrap();
        let back: Value = serde_saphyr::from_str(&out.text).unwrap();
        assert_eq!(back, doc);

        let mut apps = doc.clone();
        apps["apiVersion"] = json!("apps/v1");
        let out = mutate_documents(&apps.to_string(), &Config::default(), false).unwrap();
        let back: Value = serde_saphyr::from_str(&out.text).unwrap();
        assert_eq!(
            back["spec"]["template"]["metadata"]["labels"],
            json!({"app": "web", "canarytag": "v2", "stage": "gray"})
        );
    }

    #[test]
    fn warnings_name_the_document() {
        let doc = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: \
                   {canary-injector.io/tag: feature/x}\n";
        let out = mutate_documents(doc, &Config::default(), true).unwrap();
        assert_eq!(
            out.warnings,
            [
                "document 1 (Pod web): annotation canary-injector.io/tag: \"feature/x\" is not a \
              valid label value; using \"feature-x\""
            ]
        );
    }
}
