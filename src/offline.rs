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

/// Why the input could not be mutated (or, for [`OfflineError::Denied`],
/// why one document was left as it is).
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The input is not YAML or JSON.
    #[error("{source_name}: invalid YAML/JSON: {reason}")]
    Parse {
        /// The file name (`<stdin>` for standard input).
        source_name: String,
        /// The parser's message, with a snippet naming the file.
        reason: String,
    },
    /// The input holds no document (empty, or only comments and `---`).
    #[error("no documents in {source_name}")]
    Empty {
        /// The file name (`<stdin>` for standard input).
        source_name: String,
    },
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
    /// The rules refuse a document (e.g. an unusable tag): it is printed
    /// unchanged and reported in [`Output::refused`].
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
    /// The documents, mutated (those refused unchanged), in the input's
    /// format: one JSON document in, pretty JSON out; YAML otherwise. With
    /// `patch_only`, one JSON Patch array per document instead.
    pub text: String,
    /// Warnings, prefixed with the document they concern.
    pub warnings: Vec<String>,
    /// The documents (or `List` items) the rules refused
    /// ([`OfflineError::Denied`]); they are in `text` unchanged.
    pub refused: Vec<OfflineError>,
    /// How many documents the input held.
    pub documents: usize,
}

/// Parses `input` (one or more YAML documents, or one JSON document) and
/// applies the rules; `source_name` names the input in errors (`<stdin>`
/// for standard input). With `patch_only`, `text` holds one JSON Patch array
/// per document, one per line, instead of the documents.
///
/// A document the rules refuse is kept as it is and reported in
/// [`Output::refused`]; input that cannot be read at all (not YAML/JSON, no
/// document, a document that is not an object or not of its kind's shape)
/// is an error and nothing is output.
pub fn mutate_documents(
    input: &str,
    source_name: &str,
    cfg: &Config,
    patch_only: bool,
) -> Result<Output, OfflineError> {
    let (docs, json) = parse(input, source_name)?;
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
                    let item_ops = mutate_one(item, index, cfg, &mut out)?;
                    ops.extend(item_ops.into_iter().map(|op| prefix(op, j)));
                }
            }
        } else {
            ops = mutate_one(&mut doc, index, cfg, &mut out)?;
        }
        patches.push(ops);
        rendered.push(doc);
    }
    if rendered.is_empty() {
        return Err(OfflineError::Empty {
            source_name: source_name.to_owned(),
        });
    }
    out.documents = rendered.len();
    let render = |e: &dyn std::fmt::Display| OfflineError::Render(e.to_string());
    out.text = if patch_only {
        let mut text = String::new();
        for ops in &patches {
            text.push_str(&serde_json::to_string(ops).map_err(|e| render(&e))?);
            text.push('\n');
        }
        text
    } else if json {
        serde_json::to_string_pretty(&rendered[0]).map_err(|e| render(&e))? + "\n"
    } else {
        serde_saphyr::to_string_multiple(&rendered).map_err(|e| render(&e))?
    };
    Ok(out)
}

/// The documents of `input`, and whether it is one JSON document (answered
/// in JSON). The YAML parser's error names `source_name` instead of
/// `<input>`.
fn parse(input: &str, source_name: &str) -> Result<(Vec<Value>, bool), OfflineError> {
    if let Ok(doc) = serde_json::from_str::<Value>(input) {
        return Ok((vec![doc], true));
    }
    let docs = serde_saphyr::from_multiple(input).map_err(|e: serde_saphyr::Error| {
        let rendered = e.to_string();
        let reason = rendered
            .strip_prefix("error: ")
            .unwrap_or(&rendered)
            .replace(" --> <input>:", &format!(" --> {source_name}:"));
        OfflineError::Parse {
            source_name: source_name.to_owned(),
            reason,
        }
    })?;
    Ok((docs, false))
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

/// Applies the rules to one object in place; returns the operations
/// applied. A refused object is left as it is and recorded in `out`.
fn mutate_one(
    doc: &mut Value,
    index: usize,
    cfg: &Config,
    out: &mut Output,
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
        ObjectView::from_value(doc.clone()).map_err(|e| OfflineError::Malformed {
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
        owner_tag: None,
    };
    let decision = match mutate::decide(&subject, &object, cfg.policy(), &ClusterView::OFFLINE) {
        Ok(decision) => decision,
        Err(deny) => {
            out.refused.push(OfflineError::Denied {
                index,
                kind: kind_name,
                name,
                deny: Box::new(deny),
            });
            return Ok(Vec::new());
        }
    };
    out.warnings.extend(
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

        let printed = mutate_documents(&input, "in.yaml", &cfg, true).unwrap();
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
        let mutated = mutate_documents(&input, "in.yaml", &cfg, false).unwrap();
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
        let again = mutate_documents(&mutated.text, "in.yaml", &cfg, true).unwrap();
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
        let out = mutate_documents(&doc.to_string(), "in.yaml", &Config::default(), true).unwrap();
        assert_eq!(out.text.trim(), "[]");
        assert!(out.warnings.is_empty());
        let out = mutate_documents(&doc.to_string(), "in.yaml", &Config::default(), false).unwrap();
        let back: Value = serde_saphyr::from_str(&out.text).unwrap();
        assert_eq!(back, doc);

        let mut apps = doc.clone();
        apps["apiVersion"] = json!("apps/v1");
        let out =
            mutate_documents(&apps.to_string(), "in.yaml", &Config::default(), false).unwrap();
        let back: Value = serde_saphyr::from_str(&out.text).unwrap();
        assert_eq!(
            back["spec"]["template"]["metadata"]["labels"],
            json!({"app": "web", "canarytag": "v2", "stage": "gray"})
        );
    }

    /// One document refused: the others are mutated, the refused one is
    /// kept as it was (in the output, nothing lost) and reported; inside a
    /// List too.
    #[test]
    fn a_refused_document_is_kept_and_the_others_mutated() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n\
                     apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  annotations: {canary-injector.io/tag: '///'}\n---\n\
                     apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n";
        let out = mutate_documents(input, "in.yaml", &Config::default(), false).unwrap();
        assert_eq!(out.documents, 3);
        assert_eq!(out.refused.len(), 1);
        let refused = out.refused[0].to_string();
        assert!(refused.starts_with("document 2 (Pod bad): "), "{refused}");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out.text).unwrap();
        let original: Vec<Value> = serde_saphyr::from_multiple(input).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["metadata"]["labels"]["stage"], "normal");
        assert_eq!(docs[1], original[1], "refused document unchanged");
        assert_eq!(docs[2]["metadata"]["labels"]["stage"], "normal");

        let patches = mutate_documents(input, "in.yaml", &Config::default(), true).unwrap();
        let lines: Vec<&str> = patches.text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "[]");

        let list = json!({"apiVersion": "v1", "kind": "List", "items": [
            original[0], original[1], original[2]]});
        let out =
            mutate_documents(&list.to_string(), "in.json", &Config::default(), false).unwrap();
        assert_eq!(out.refused.len(), 1);
        let back: Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(back["items"][1], original[1]);
        assert_eq!(back["items"][2]["metadata"]["labels"]["stage"], "normal");
    }

    /// One JSON document in, JSON out (a List too); YAML in, YAML out.
    #[test]
    fn the_answer_is_in_the_input_format() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}});
        let out =
            mutate_documents(&pod.to_string(), "pod.json", &Config::default(), false).unwrap();
        let back: Value = serde_json::from_str(&out.text).expect("JSON out");
        assert_eq!(back["metadata"]["labels"]["stage"], "normal");
        assert!(out.text.ends_with("}\n"));
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n";
        let out = mutate_documents(yaml, "pod.yaml", &Config::default(), false).unwrap();
        assert!(
            serde_json::from_str::<Value>(&out.text).is_err(),
            "YAML out"
        );
        assert!(out.text.contains("stage: normal"), "{}", out.text);
        // JSON documents in a YAML stream are a YAML stream.
        let stream = format!("{pod}\n---\n{pod}\n");
        let out = mutate_documents(&stream, "pods.yaml", &Config::default(), false).unwrap();
        assert!(out.text.contains("stage: normal"), "{}", out.text);
        assert_eq!(out.documents, 2);
    }

    #[test]
    fn errors_name_the_file_and_empty_input_is_an_error() {
        let err = mutate_documents(
            "kind: Pod\nmetadata: [unclosed\n",
            "deploy/app.yaml",
            &Config::default(),
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("deploy/app.yaml: invalid YAML/JSON: "),
            "{text}"
        );
        assert!(text.contains(" --> deploy/app.yaml:2:"), "{text}");
        assert!(!text.contains("<input>"), "{text}");
        for empty in ["", "\n", "# only a comment\n", "---\n---\n", "null"] {
            let err = mutate_documents(empty, "<stdin>", &Config::default(), false).unwrap_err();
            assert_eq!(err.to_string(), "no documents in <stdin>", "{empty:?}");
        }
    }

    #[test]
    fn warnings_name_the_document() {
        let doc = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: \
                   {canary-injector.io/tag: feature/x}\n";
        let out = mutate_documents(doc, "in.yaml", &Config::default(), true).unwrap();
        assert_eq!(
            out.warnings,
            [
                "document 1 (Pod web): annotation canary-injector.io/tag: \"feature/x\" is not a \
              valid label value; using \"feature-x\""
            ]
        );
    }
}
