//! Upgrades by `kubectl apply`, checked without a cluster: the install of
//! this version, then the install of the next one over it.
//!
//! `kubectl apply` patches every object the two have in common (same group,
//! kind, namespace and name; the API version may differ) and creates the
//! others. A patch fails when it changes a field the apiserver treats as
//! immutable, and then the whole upgrade stops half way. So, object by
//! object, no such field may change between the two renders. Which fields
//! are immutable is Kubernetes' validation on update ([`IMMUTABLE`]); every
//! kind an install holds must be listed there, so a new kind is a decision,
//! not a silent pass.
//!
//! "The next version" is this repository with the version bumped where a
//! release bumps it (tests/release.rs checks those are all the places): the
//! image tags in the kustomizations and manifests, and the certgen Job's
//! name, which carries the version because a Job's pod template is
//! immutable.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMAGE: &str = "ghcr.io/canary-injector/canary-injector";

/// The entry points that install the webhook (the add-ons next to them
/// hold no Job and no workload).
const INSTALLS: &[&str] = &[
    "deploy",
    "deploy/overlays/legacy",
    "deploy/overlays/cert-manager",
    "deploy/native-policy",
];

/// Fields the apiserver refuses to change on update, as JSON pointers, per
/// (API group, kind). Kinds listed with none are mutable throughout.
const IMMUTABLE: &[(&str, &str, &[&str])] = &[
    // A Job's selector, pod template and completion settings are fixed at
    // creation (batch validation `ValidateJobSpecUpdate`); parallelism,
    // ttlSecondsAfterFinished, suspend and backoffLimit may change.
    (
        "batch",
        "Job",
        &[
            "/spec/selector",
            "/spec/manualSelector",
            "/spec/template",
            "/spec/completions",
            "/spec/completionMode",
            "/spec/podFailurePolicy",
            "/spec/backoffLimitPerIndex",
            "/spec/successPolicy",
            "/spec/managedBy",
        ],
    ),
    // A CronJob's jobTemplate may change: only Jobs created later see it.
    ("batch", "CronJob", &[]),
    // apps/v1 workloads: the selector (a change would orphan the pods).
    ("apps", "Deployment", &["/spec/selector"]),
    ("apps", "ReplicaSet", &["/spec/selector"]),
    ("apps", "DaemonSet", &["/spec/selector"]),
    (
        "apps",
        "StatefulSet",
        &[
            "/spec/selector",
            "/spec/serviceName",
            "/spec/podManagementPolicy",
            "/spec/volumeClaimTemplates",
        ],
    ),
    // A Service's cluster IPs, once allocated.
    ("", "Service", &["/spec/clusterIP", "/spec/clusterIPs"]),
    // A binding's roleRef (delete and create the binding to change it).
    ("rbac.authorization.k8s.io", "RoleBinding", &["/roleRef"]),
    (
        "rbac.authorization.k8s.io",
        "ClusterRoleBinding",
        &["/roleRef"],
    ),
    ("rbac.authorization.k8s.io", "Role", &[]),
    ("rbac.authorization.k8s.io", "ClusterRole", &[]),
    // A Secret's type; ConfigMaps and Secrets marked `immutable: true` also
    // their data (see `immutable_changes`).
    ("", "Secret", &["/type"]),
    ("", "ConfigMap", &[]),
    ("", "Namespace", &[]),
    ("", "ServiceAccount", &[]),
    // Updatable since Kubernetes 1.15 (policy/v1beta1) and in policy/v1.
    ("policy", "PodDisruptionBudget", &[]),
    ("networking.k8s.io", "NetworkPolicy", &[]),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
        &[],
    ),
    (
        "admissionregistration.k8s.io",
        "MutatingAdmissionPolicy",
        &[],
    ),
    (
        "admissionregistration.k8s.io",
        "MutatingAdmissionPolicyBinding",
        &[],
    ),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicy",
        &[],
    ),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
        &[],
    ),
    // cert-manager's resources: updatable (its webhook validates content,
    // not changes).
    ("cert-manager.io", "Issuer", &[]),
    ("cert-manager.io", "Certificate", &[]),
];

fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (client only) is needed to build deploy/; see CONTRIBUTING.md");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// What `kubectl apply` matches objects by: group, kind, namespace, name.
fn key(o: &Value) -> (String, String, String, String) {
    let api = o["apiVersion"].as_str().unwrap_or_default();
    let group = api.rsplit_once('/').map_or("", |(g, _)| g);
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        group.to_owned(),
        s(&o["kind"]),
        s(&o["metadata"]["namespace"]),
        s(&o["metadata"]["name"]),
    )
}

fn describe(o: &Value) -> String {
    let (_, kind, ns, name) = key(o);
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

/// The immutable fields `new` changes in objects `old` has too, as
/// "Kind ns/name: /field"; `Err` for a kind [`IMMUTABLE`] does not know.
fn immutable_changes(old: &[Value], new: &[Value]) -> Result<Vec<String>, String> {
    let mut changes = Vec::new();
    for n in new {
        let k = key(n);
        let (group, kind) = (k.0.as_str(), k.1.as_str());
        let Some((_, _, fields)) = IMMUTABLE
            .iter()
            .find(|(g, kd, _)| (*g, *kd) == (group, kind))
        else {
            return Err(format!(
                "{group}/{kind}: add its immutable fields to IMMUTABLE in tests/upgrade.rs"
            ));
        };
        let Some(o) = old.iter().find(|o| key(o) == k) else {
            continue;
        };
        let mut fields: Vec<&str> = fields.to_vec();
        if matches!(kind, "ConfigMap" | "Secret") && o["immutable"] == true {
            fields.extend(["/immutable", "/data", "/binaryData", "/stringData"]);
        }
        for field in fields {
            if o.pointer(field) != n.pointer(field) {
                changes.push(format!("{}: {field}", describe(n)));
            }
        }
    }
    Ok(changes)
}

/// The version after this one (next minor).
fn next_version() -> String {
    let core = VERSION.split(['-', '+']).next().unwrap();
    let parts: Vec<u64> = core.split('.').map(|p| p.parse().unwrap()).collect();
    format!("{}.{}.0", parts[0], parts[1] + 1)
}

/// The certgen Job's name for a version (deploy/base/certgen.yaml).
fn job_name(version: &str) -> String {
    format!("canary-injector-certgen-{}", version.replace('.', "-"))
}

/// A copy of deploy/ in a temporary directory.
fn copy_of_deploy() -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    copy(&Path::new(ROOT).join("deploy"), &deploy);
    (dir, deploy)
}

/// Rewrites every file under `dir` with `edit`; returns how many changed.
fn edit_files(dir: &Path, edit: &dyn Fn(&str) -> String) -> usize {
    let mut changed = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            changed += edit_files(&path, edit);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let new = edit(&text);
            if new != text {
                std::fs::write(&path, new).unwrap();
                changed += 1;
            }
        }
    }
    changed
}

/// The version bump a release makes, in the text of a manifest.
fn bump(text: &str, from: &str, to: &str) -> String {
    text.replace(&format!("{IMAGE}:{from}"), &format!("{IMAGE}:{to}"))
        .replace(&format!("newTag: {from}"), &format!("newTag: {to}"))
        .replace(&job_name(from), &job_name(to))
}

fn images(o: &Value) -> Vec<String> {
    let mut found = Vec::new();
    fn walk(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("image", Value::String(image)) => found.push(image.clone()),
                        _ => walk(v, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    walk(o, &mut found);
    found
}

#[test]
fn the_next_version_applies_over_this_one_without_touching_an_immutable_field() {
    let next = next_version();
    let (_dir, deploy) = copy_of_deploy();
    let bumped = edit_files(&deploy, &|text| bump(text, VERSION, &next));
    assert!(
        bumped >= 4,
        "the bump reached the kustomizations, the manifests and the Job ({bumped} files)"
    );
    for entry in INSTALLS {
        let old = if *entry == "deploy" {
            // What users apply: the committed install.yaml.
            docs(&std::fs::read_to_string(format!("{ROOT}/deploy/install.yaml")).unwrap())
        } else {
            docs(&kustomize(&Path::new(ROOT).join(entry)))
        };
        let rel = entry
            .strip_prefix("deploy")
            .unwrap()
            .trim_start_matches('/');
        let new = docs(&kustomize(&deploy.join(rel)));

        let changes = immutable_changes(&old, &new).unwrap();
        assert!(
            changes.is_empty(),
            "{entry}: `kubectl apply` of {next} over {VERSION} would be refused for {changes:?}"
        );

        // What the upgrade does: the Deployment and the CronJob run the new
        // image; the new version's certgen Job is a new object, the old one
        // is left to its TTL.
        let new_image = format!("{IMAGE}:{next}");
        let only = |a: &[Value], b: &[Value]| -> Vec<String> {
            a.iter()
                .filter(|x| !b.iter().any(|y| key(x) == key(y)))
                .map(describe)
                .collect()
        };
        let has_job = *entry != "deploy/overlays/cert-manager";
        let expect = |v: &str| -> Vec<String> {
            if has_job {
                vec![format!("Job canary-injector/{}", job_name(v))]
            } else {
                Vec::new()
            }
        };
        assert_eq!(
            only(&new, &old),
            expect(&next),
            "{entry}: created by the upgrade"
        );
        assert_eq!(only(&old, &new), expect(VERSION), "{entry}: left behind");
        for o in &new {
            for image in images(o) {
                assert_eq!(image, new_image, "{entry}: {}", describe(o));
            }
        }
        let deployment = new
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("a Deployment");
        assert_eq!(
            images(deployment),
            std::slice::from_ref(&new_image),
            "{entry}"
        );
        assert!(
            old.iter()
                .any(|o| o["kind"] == "Deployment" && images(o) != images(deployment)),
            "{entry}: the Deployment's image changes (a rolling update)"
        );
    }
}

/// `kubectl apply` keeps a copy of each object in the annotation
/// kubectl.kubernetes.io/last-applied-configuration, which the apiserver
/// caps at 256 KiB together with the other annotations.
#[test]
fn every_installed_object_fits_kubectl_apply_s_annotation() {
    for entry in INSTALLS {
        for o in docs(&kustomize(&Path::new(ROOT).join(entry))) {
            let size = serde_json::to_string(&o).unwrap().len();
            assert!(
                size < 200 * 1024,
                "{entry}: {} is {size} bytes",
                describe(&o)
            );
        }
    }
}

/// The check is not vacuous: an image of another tag at the same version
/// keeps the Job's name and changes its pod template, which the apiserver
/// refuses (what the Job name carrying the version avoids for releases;
/// docs/install.md "Upgrade" says to delete the finished Job first in this case).
#[test]
fn another_image_at_the_same_version_changes_only_the_job_template() {
    let (_dir, deploy) = copy_of_deploy();
    // What `cd deploy && kustomize edit set image ...` writes.
    let path = deploy.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace(
        &format!("newTag: {VERSION}"),
        &format!("newName: registry.example/mine/canary-injector\n    newTag: {VERSION}-custom"),
    );
    assert_ne!(edited, text);
    std::fs::write(&path, edited).unwrap();
    let old = docs(&std::fs::read_to_string(format!("{ROOT}/deploy/install.yaml")).unwrap());
    let new = docs(&kustomize(&deploy));
    assert_eq!(
        immutable_changes(&old, &new).unwrap(),
        [format!(
            "Job canary-injector/{}: /spec/template",
            job_name(VERSION)
        )]
    );
}

/// The checker on small objects: each immutable field is caught, a mutable
/// change is not, and a kind it does not know is an error.
#[test]
fn immutable_fields_are_told_from_mutable_ones() {
    let deployment = |selector: &str, image: &str| {
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "n"},
            "spec": {"selector": {"matchLabels": {"app": selector}},
                     "template": {"spec": {"containers": [{"name": "c", "image": image}]}}}})
    };
    let old = [deployment("a", "x:1")];
    assert_eq!(
        immutable_changes(&old, &[deployment("a", "x:2")]),
        Ok(vec![])
    );
    assert_eq!(
        immutable_changes(&old, &[deployment("b", "x:1")]),
        Ok(vec!["Deployment n/d: /spec/selector".to_owned()])
    );
    // Same group and name, another API version: the same object.
    let mut v1beta = deployment("b", "x:1");
    v1beta["apiVersion"] = "apps/v1beta2".into();
    assert_eq!(immutable_changes(&old, &[v1beta]).unwrap().len(), 1);

    let binding = |role: &str| {
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "b"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}})
    };
    assert_eq!(
        immutable_changes(&[binding("r")], &[binding("s")]),
        Ok(vec!["ClusterRoleBinding b: /roleRef".to_owned()])
    );

    let config_map = |immutable: bool, value: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "n"}, "immutable": immutable, "data": {"k": value}})
    };
    assert_eq!(
        immutable_changes(&[config_map(false, "1")], &[config_map(false, "2")]),
        Ok(vec![])
    );
    assert_eq!(
        immutable_changes(&[config_map(true, "1")], &[config_map(true, "2")]),
        Ok(vec!["ConfigMap n/c: /data".to_owned()])
    );

    let unknown = serde_json::json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
    assert!(immutable_changes(&[], &[unknown]).is_err());
}
