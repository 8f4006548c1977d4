//! The chain rules on a hand-filled index, and the cache against the
//! shared apiserver model (metadata-only watches).

use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::testing::FakeApiServer;

const TAG: &str = "canary-injector.io/tag";

fn meta(v: Value) -> ObjectMeta {
    serde_json::from_value(v).unwrap()
}

fn owner(kind: &str, api_version: &str, name: &str) -> Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": name, "uid": format!("{name}-uid"),
            "controller": true}])
}

/// The row of an object of `kind` with this metadata, as the cache makes
/// it.
fn row_of(kind: WorkloadKind, m: &ObjectMeta) -> Option<Row> {
    let controller = m
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerRef {
            api_version: o.api_version.clone(),
            kind: o.kind.clone(),
            name: o.name.clone(),
            uid: o.uid.clone(),
            controller: o.controller,
        });
    Row::of(
        kind,
        m.uid.as_deref().unwrap_or_default(),
        m.annotations.as_ref(),
        controller.as_ref(),
        TAG,
    )
}

/// Applies `object` (its metadata) as a listed row of `kind`.
fn put(index: &mut OwnerIndex, kind: WorkloadKind, object: Value) {
    let m = meta(object);
    let row = row_of(kind, &m);
    index.apply(
        kind,
        Change::Applied(
            m.namespace.unwrap_or_default(),
            m.name.unwrap_or_default(),
            row,
        ),
    );
}

fn tag_of(index: &OwnerIndex, kind: WorkloadKind, name: &str) -> Option<(String, String)> {
    index
        .owner_tag("shop", kind, name)
        .map(|t| (format!("{}/{}", t.kind, t.name), t.value))
}

#[test]
fn kinds_are_read_from_owner_references_with_their_group() {
    assert_eq!(
        WorkloadKind::of("apps/v1", "ReplicaSet"),
        Some(WorkloadKind::ReplicaSet)
    );
    assert_eq!(
        WorkloadKind::of("batch/v1", "CronJob"),
        Some(WorkloadKind::CronJob)
    );
    assert_eq!(WorkloadKind::of("example.com/v1", "Deployment"), None);
    assert_eq!(WorkloadKind::of("batch/v1", "Deployment"), None);
    assert_eq!(WorkloadKind::of("v1", "Pod"), None);
}

#[test]
fn only_tagged_objects_and_chain_links_are_kept() {
    let plain = meta(json!({"name": "a", "namespace": "shop"}));
    assert_eq!(row_of(WorkloadKind::Deployment, &plain), None);
    let standalone_rs = meta(json!({"name": "a", "namespace": "shop"}));
    assert_eq!(row_of(WorkloadKind::ReplicaSet, &standalone_rs), None);
    let owned_rs = meta(json!({"name": "web-abc", "namespace": "shop", "uid": "u",
        "annotations": {"deployment.kubernetes.io/revision": "3"},
        "ownerReferences": owner("Deployment", "apps/v1", "web")}));
    assert_eq!(
        row_of(WorkloadKind::ReplicaSet, &owned_rs),
        Some(Row {
            uid: "u".into(),
            tag: None,
            owner: Some((WorkloadKind::Deployment, "web".into())),
            revision: Some("3".into()),
        })
    );
    // A Job of a custom controller is no link.
    let job = meta(json!({"name": "j", "namespace": "shop",
        "ownerReferences": owner("Workflow", "argoproj.io/v1alpha1", "wf")}));
    assert_eq!(row_of(WorkloadKind::Job, &job), None);
}

#[test]
fn the_nearest_tag_up_the_chain_wins() {
    let mut index = OwnerIndex::default();
    // A Deployment tagged on its metadata; its current ReplicaSet carries a
    // copy, an older one (revision 1) does not.
    put(
        &mut index,
        WorkloadKind::Deployment,
        json!({"name": "web", "namespace": "shop", "uid": "d",
               "annotations": {TAG: "beta", "deployment.kubernetes.io/revision": "2"}}),
    );
    put(
        &mut index,
        WorkloadKind::ReplicaSet,
        json!({"name": "web-new", "namespace": "shop",
               "annotations": {"deployment.kubernetes.io/revision": "2"},
               "ownerReferences": owner("Deployment", "apps/v1", "web")}),
    );
    put(
        &mut index,
        WorkloadKind::ReplicaSet,
        json!({"name": "web-old", "namespace": "shop",
               "annotations": {"deployment.kubernetes.io/revision": "1"},
               "ownerReferences": owner("Deployment", "apps/v1", "web")}),
    );
    assert_eq!(
        tag_of(&index, WorkloadKind::ReplicaSet, "web-new"),
        Some(("Deployment/web".into(), "beta".into()))
    );
    assert_eq!(
        tag_of(&index, WorkloadKind::ReplicaSet, "web-old"),
        None,
        "an older ReplicaSet runs what its own template says"
    );
    // The ReplicaSet's own annotation comes first.
    put(
        &mut index,
        WorkloadKind::ReplicaSet,
        json!({"name": "web-new", "namespace": "shop",
               "annotations": {TAG: "gamma", "deployment.kubernetes.io/revision": "2"},
               "ownerReferences": owner("Deployment", "apps/v1", "web")}),
    );
    assert_eq!(
        tag_of(&index, WorkloadKind::ReplicaSet, "web-new"),
        Some(("ReplicaSet/web-new".into(), "gamma".into()))
    );
    // Job -> CronJob; StatefulSet; another namespace knows nothing.
    put(
        &mut index,
        WorkloadKind::CronJob,
        json!({"name": "nightly", "namespace": "shop", "annotations": {TAG: "n1"}}),
    );
    put(
        &mut index,
        WorkloadKind::Job,
        json!({"name": "nightly-1", "namespace": "shop",
               "ownerReferences": owner("CronJob", "batch/v1", "nightly")}),
    );
    put(
        &mut index,
        WorkloadKind::StatefulSet,
        json!({"name": "db", "namespace": "shop", "annotations": {TAG: "s1"}}),
    );
    assert_eq!(
        tag_of(&index, WorkloadKind::Job, "nightly-1"),
        Some(("CronJob/nightly".into(), "n1".into()))
    );
    assert_eq!(
        tag_of(&index, WorkloadKind::StatefulSet, "db"),
        Some(("StatefulSet/db".into(), "s1".into()))
    );
    assert_eq!(
        index.owner_tag("other", WorkloadKind::StatefulSet, "db"),
        None
    );
    let top = index
        .workload("shop", WorkloadKind::ReplicaSet, "web-old")
        .unwrap();
    assert_eq!(
        (top.kind.as_str(), top.name.as_str(), top.uid.as_str()),
        ("Deployment", "web", "d")
    );
    // Untagged again: gone from the index.
    put(
        &mut index,
        WorkloadKind::StatefulSet,
        json!({"name": "db", "namespace": "shop"}),
    );
    assert_eq!(tag_of(&index, WorkloadKind::StatefulSet, "db"), None);
}

#[test]
fn a_relist_replaces_the_rows_of_its_kind_and_marks_it_synced() {
    let mut index = OwnerIndex::default();
    let row = |t: &str| {
        row_of(
            WorkloadKind::DaemonSet,
            &meta(json!({"name": "x", "annotations": {TAG: t}})),
        )
    };
    index.apply(
        WorkloadKind::DaemonSet,
        Change::Applied("shop".into(), "old".into(), row("a")),
    );
    index.apply(WorkloadKind::DaemonSet, Change::Init);
    index.apply(
        WorkloadKind::DaemonSet,
        Change::Listed("shop".into(), "new".into(), row("b")),
    );
    // Until the list completes, the old rows answer.
    assert!(
        index
            .owner_tag("shop", WorkloadKind::DaemonSet, "old")
            .is_some()
    );
    index.apply(WorkloadKind::DaemonSet, Change::InitDone);
    assert!(
        index
            .owner_tag("shop", WorkloadKind::DaemonSet, "old")
            .is_none()
    );
    assert!(
        index
            .owner_tag("shop", WorkloadKind::DaemonSet, "new")
            .is_some()
    );
    assert!(!index.is_synced(), "the other kinds have not listed");
    for kind in WorkloadKind::ALL {
        index.not_served(kind);
    }
    assert!(!index.is_synced(), "the namespaces have not listed");
    index.apply_namespace(NamespaceChange::Init);
    index.apply_namespace(NamespaceChange::Listed(
        "shop".into(),
        NamespaceMesh::Ambient,
    ));
    index.apply_namespace(NamespaceChange::InitDone);
    assert!(index.is_synced());
    assert_eq!(index.mesh("shop"), NamespaceMesh::Ambient);
    assert_eq!(index.mesh("elsewhere"), NamespaceMesh::Unknown);
    assert!(index.is_empty());
}

/// Polls `f` (real time: the watches run on their own) until it holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The cache lists and watches the six kinds as metadata only, in every
/// namespace, keeps what matters and follows changes.
#[tokio::test]
async fn the_cache_follows_the_cluster_with_metadata_only_reads() {
    const COLLECTIONS: [&str; 6] = [
        "/apis/apps/v1/replicasets",
        "/apis/apps/v1/deployments",
        "/apis/apps/v1/statefulsets",
        "/apis/apps/v1/daemonsets",
        "/apis/batch/v1/jobs",
        "/apis/batch/v1/cronjobs",
    ];
    let fake = FakeApiServer::with(&[
        (
            "/apis/apps/v1/namespaces/shop/statefulsets/db",
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "db", "namespace": "shop", "annotations": {TAG: "beta"}},
                   "spec": {"template": {"spec": {"containers": [{"name": "db", "env": [
                       {"name": "PASSWORD", "value": "hunter2"}]}]}}}}),
        ),
        (
            "/apis/apps/v1/namespaces/kube-system/statefulsets/db",
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "db", "namespace": "kube-system",
                                "annotations": {TAG: "beta"}}}),
        ),
    ]);
    fake.require_metadata_only(&COLLECTIONS);
    let (client, _served) = fake.client();
    let (cache, watch) = cache(client, TAG.into(), NamespacePolicy::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch.run(stop.clone()));
    let sts = OwnerRef {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: "db".into(),
        uid: String::new(),
        controller: Some(true),
    };
    until("the first lists", || cache.is_synced()).await;
    assert_eq!(
        cache.owner_tag("shop", &sts).map(|t| t.value),
        Some("beta".into())
    );
    assert_eq!(
        cache.owner_tag("kube-system", &sts),
        None,
        "excluded namespace"
    );
    assert_eq!(cache.len(), 1);
    // The tag changes, then goes.
    fake.put(
        "/apis/apps/v1/namespaces/shop/statefulsets/db",
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "db", "namespace": "shop", "annotations": {TAG: "gamma"}}}),
    );
    until("the change", || {
        cache.owner_tag("shop", &sts).map(|t| t.value) == Some("gamma".into())
    })
    .await;
    fake.delete("/apis/apps/v1/namespaces/shop/statefulsets/db");
    until("the delete", || cache.owner_tag("shop", &sts).is_none()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(fake.full_reads(), Vec::<String>::new(), "metadata only");
}

/// A kind the apiserver does not serve (`batch/v1` CronJobs before 1.21)
/// counts as listed, so the cache still syncs.
#[tokio::test]
async fn a_kind_not_served_does_not_hold_up_the_sync() {
    let fake = FakeApiServer::default();
    fake.serve_group("batch", &[], &[]);
    let (client, _served) = fake.client();
    let (cache, watch) = cache(client, TAG.into(), NamespacePolicy::default());
    let stop = CancellationToken::new();
    tokio::spawn(watch.run(stop.clone()));
    for _ in 0..300 {
        if cache.is_synced() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cache.is_synced());
    stop.cancel();
}
