//! `serve` in process: real listeners and TLS, a mock apiserver where a
//! cluster is needed.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::testing::FakeApiServer;

struct Fixture {
    _dir: tempfile::TempDir,
    tls: CertPaths,
    ca_pem: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let dev = crate::certs::ensure_dev_cert(dir.path()).unwrap();
    let ca_pem = std::fs::read_to_string(&dev.ca).unwrap();
    Fixture {
        tls: CertPaths {
            cert: dev.cert,
            key: dev.key,
        },
        ca_pem,
        _dir: dir,
    }
}

fn options(f: &Fixture, cluster: ClusterAccess) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        tls: f.tls.clone(),
        cert_reload_interval: Duration::from_secs(1),
        shutdown_delay: Duration::from_millis(1500),
        limits: Limits::default(),
        floor_response: None,
        cluster,
    }
}

/// `GET path` over TLS (HTTP/1.1, verified against `ca_pem`); the status,
/// or `None` when the connection is refused.
async fn get(addr: SocketAddr, ca_pem: &str, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let response = exchange(addr, ca_pem, &request).await?;
    response.get(9..12)?.parse().ok()
}

/// `POST path` with a JSON body; the response body of a 200.
async fn post_json(addr: SocketAddr, ca_pem: &str, path: &str, body: &Value) -> Option<Value> {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = exchange(addr, ca_pem, &request).await?;
    if response.get(9..12)? != "200" {
        return None;
    }
    serde_json::from_str(&response[response.find("\r\n\r\n")? + 4..]).ok()
}

/// Sends `request` over TLS and reads the whole response.
async fn exchange(addr: SocketAddr, ca_pem: &str, request: &str) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await.ok()?;
    Some(response)
}

async fn poll(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_task_that_ends_stops_serving_and_names_itself() {
    let f = fixture();
    let mut app = App::bind(Config::default(), options(&f, ClusterAccess::Off))
        .await
        .unwrap();
    let (https, _) = app.local_addrs();
    app.supervise("doomed", |_stop| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Err("its watch broke".into())
    });
    let running = tokio::spawn(app.run(Shutdown::new()));
    poll("ready", async || {
        get(https, &f.ca_pem, "/readyz").await == Some(200)
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("run returns once a task ended")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, AppError::TaskEnded(ended) if ended.name == "doomed"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "critical task doomed failed: its watch broke"
    );
    assert_eq!(
        get(https, &f.ca_pem, "/healthz").await,
        None,
        "listener closed"
    );
}

#[tokio::test]
async fn shutdown_turns_unready_while_serving_then_closes_the_listener() {
    let f = fixture();
    let app = App::bind(Config::default(), options(&f, ClusterAccess::Off))
        .await
        .unwrap();
    let (https, _) = app.local_addrs();
    let shutdown = Shutdown::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    poll("ready", async || {
        get(https, &f.ca_pem, "/readyz").await == Some(200)
    })
    .await;
    shutdown.request();
    // During the shutdown delay: unready, but still answering.
    poll("unready", async || {
        get(https, &f.ca_pem, "/readyz").await == Some(503)
    })
    .await;
    assert_eq!(get(https, &f.ca_pem, "/healthz").await, Some(200));
    poll("the listener to close", async || {
        get(https, &f.ca_pem, "/healthz").await.is_none()
    })
    .await;
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// === with a cluster ===

const NS: &str = "canary-injector";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/canary-injector/leases/canary-injector";

fn cluster_config() -> Config {
    let mut cfg = Config::default();
    cfg.namespaces.own = Some(NS.into());
    cfg
}

fn source_json() -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "canary-injector-bootstrap", "namespace": NS, "resourceVersion": "5"},
        "data": {"envoy_bootstrap_tmpl.json": "{}"},
    })
}

const POD: &str = "/api/v1/namespaces/shop/pods/web-1";

/// An apiserver holding the bootstrap source, the opted-in namespace
/// `shop` with a pod created before the webhook, and the Lease `lease`
/// when given.
fn apiserver(lease: Option<Value>) -> FakeApiServer {
    let mut objects = vec![
        (
            "/api/v1/namespaces/canary-injector/configmaps/canary-injector-bootstrap",
            source_json(),
        ),
        (
            "/api/v1/namespaces/shop",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "shop", "labels": {"canary-injection": "enabled",
                                                           "istio-injection": "enabled"}}}),
        ),
        (
            POD,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
                   "spec": {"containers": [{"name": "web", "image": "nginx"}]}}),
        ),
    ];
    if let Some(l) = lease {
        objects.push((LEASE, l));
    }
    FakeApiServer::with(&objects)
}

/// Every call so far as `METHOD path` (`?watch` appended for watches,
/// ` (metadata)` for reads of metadata only, such as the owner cache's).
fn calls(api: &FakeApiServer) -> Vec<String> {
    api.seen()
        .iter()
        .map(|c| {
            let watch = if c.query.get("watch").is_some_and(|w| w == "true") {
                "?watch"
            } else {
                ""
            };
            let metadata = if c.accept.contains("as=PartialObjectMetadata") {
                " (metadata)"
            } else {
                ""
            };
            format!("{} {}{watch}{metadata}", c.method, c.path)
        })
        .collect()
}

fn position(calls: &[String], prefix: &str) -> Option<usize> {
    calls.iter().position(|c| c.starts_with(prefix))
}

/// `serve` with the cluster config against `api`, once ready: its HTTPS
/// address, the shutdown handle and the running task.
async fn serve_ready(
    f: &Fixture,
    api: &FakeApiServer,
) -> (
    SocketAddr,
    Shutdown,
    tokio::task::JoinHandle<Result<(), AppError>>,
) {
    serve_ready_with(f, api, cluster_config()).await
}

/// [`serve_ready`] with `cfg`.
async fn serve_ready_with(
    f: &Fixture,
    api: &FakeApiServer,
    cfg: Config,
) -> (
    SocketAddr,
    Shutdown,
    tokio::task::JoinHandle<Result<(), AppError>>,
) {
    let (client, served) = api.client();
    // Serves until every client is dropped (the app's, at its end).
    drop(served);
    let app = App::bind(cfg, options(f, ClusterAccess::Client(client)))
        .await
        .unwrap();
    let (https, _) = app.local_addrs();
    let shutdown = Shutdown::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    poll("ready", async || {
        get(https, &f.ca_pem, "/readyz").await == Some(200)
    })
    .await;
    (https, shutdown, running)
}

#[tokio::test]
async fn the_leader_copies_and_releases_its_lease_at_shutdown() {
    let f = fixture();
    let api = apiserver(None);
    let (_, shutdown, running) = serve_ready(&f, &api).await;
    poll("the copy in shop", async || {
        position(&calls(&api), "PATCH /api/v1/namespaces/shop/configmaps/").is_some()
    })
    .await;
    poll("the pod labelled", async || {
        api.get(POD).unwrap()["metadata"]["labels"]["stage"] == "normal"
    })
    .await;
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let calls = calls(&api);
    let acquired = position(&calls, "POST /apis/coordination.k8s.io").expect("lease created");
    let listed = calls
        .iter()
        .position(|c| c == "GET /api/v1/namespaces")
        .expect("namespaces listed");
    let copied = position(&calls, "PATCH /api/v1/namespaces/shop/configmaps/").unwrap();
    let labelled = position(&calls, &format!("PATCH {POD}")).unwrap();
    assert!(acquired < listed && listed < copied, "{calls:#?}");
    // The routes controller runs on the leader too (and idles: no Istio here).
    let routes = position(&calls, "GET /apis/networking.istio.io").expect("routes discovery");
    assert!(acquired < routes, "{calls:#?}");
    assert!(listed < labelled, "{calls:#?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| *c == "GET /api/v1/namespaces")
            .count(),
        1,
        "the copier and the backfill share one namespace watch: {calls:#?}"
    );
    let released = calls
        .iter()
        .rposition(|c| c.starts_with("PUT /apis/coordination.k8s.io"));
    assert!(
        released.is_some_and(|r| r > copied),
        "released at shutdown: {calls:#?}"
    );
}

#[tokio::test]
async fn a_follower_serves_from_its_cache_and_writes_nothing() {
    let f = fixture();
    // Another replica holds the lease for an hour.
    let held = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "canary-injector", "namespace": NS, "resourceVersion": "7"},
        "spec": {"holderIdentity": "canary-injector-other", "leaseDurationSeconds": 3600},
    });
    let api = apiserver(Some(held));
    let (_, shutdown, running) = serve_ready(&f, &api).await;
    // Two election rounds at least.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let calls = calls(&api);
    assert!(
        position(&calls, "GET /api/v1/configmaps").is_some(),
        "every replica caches"
    );
    assert!(
        position(&calls, ISTIO_CONFIGMAPS).is_some(),
        "every replica learns the injector version"
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.starts_with("GET /apis/coordination"))
            .count()
            >= 2,
        "{calls:#?}"
    );
    for write in ["PATCH", "PUT", "POST", "GET /apis/networking.istio.io"] {
        assert_eq!(
            position(&calls, write),
            None,
            "a follower never {write}: {calls:#?}"
        );
    }
    // Only the owner cache's metadata-only watch of the opted-in
    // namespaces (every replica keeps it), never a namespace's pods.
    assert!(
        !calls.iter().any(|c| c.starts_with("GET /api/v1/namespaces")
            && !c.starts_with(ISTIO_CONFIGMAPS)
            && !c.ends_with("(metadata)")),
        "a follower never watches namespaces nor lists their pods: {calls:#?}"
    );
}

const ISTIO_CONFIGMAPS: &str = "GET /api/v1/namespaces/istio-system/configmaps";

/// The injector version read from a recorded istio-system reaches the
/// review path: a 1.20 pod not injected yet gets the agent keepalive in
/// `proxy.istio.io/config`, though the config names no version. The
/// webhook turns ready only once the version is known.
#[tokio::test]
async fn the_detected_injector_version_reaches_admission() {
    let f = fixture();
    let api = apiserver(None);
    let recorded: Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/istio-system/istio-1.20-with-1-22-revision.json"
    ))
    .unwrap();
    for item in recorded["items"].as_array().unwrap() {
        if item["kind"] == "ConfigMap" {
            let name = item["metadata"]["name"].as_str().unwrap();
            api.put(
                &format!("/api/v1/namespaces/istio-system/configmaps/{name}"),
                item.clone(),
            );
        }
    }
    let (https, shutdown, running) = serve_ready(&f, &api).await;
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop", "operation": "CREATE",
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"generateName": "web-", "labels": {"app": "web"}},
                       "spec": {"containers": [{"name": "web", "image": "nginx"}]}},
        },
    });
    let answer = post_json(https, &f.ca_pem, "/mutate", &review)
        .await
        .expect("a review answer");
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(
        patch,
        json!([
            {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
            {"op": "add", "path": "/metadata/annotations", "value": {
                "proxy.istio.io/config":
                    r#"{"proxyMetadata":{"GRPC_KEEPALIVE_INTERVAL":"30s","GRPC_KEEPALIVE_TIMEOUT":"15s"}}"#
            }},
        ])
    );
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let calls = calls(&api);
    assert!(
        calls.iter().any(|c| c == ISTIO_CONFIGMAPS),
        "listed by name: {calls:#?}"
    );
}

/// A Deployment created before its namespace opted in, tagged on its own
/// metadata only: the next pod its old ReplicaSet creates (a pod deleted,
/// a node drained) is admitted a canary, though its template carries no
/// tag: every replica learns the owners from its cache, never from the API
/// on the review path.
#[tokio::test]
async fn a_new_pod_of_a_deployment_tagged_on_its_metadata_is_admitted_a_canary() {
    let f = fixture();
    let api = apiserver(None);
    api.put(
        "/apis/apps/v1/namespaces/shop/deployments/web",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "shop", "uid": "d-uid",
                            "annotations": {"canary-injector.io/tag": "beta",
                                            "deployment.kubernetes.io/revision": "4"}}}),
    );
    api.put(
        "/apis/apps/v1/namespaces/shop/replicasets/web-abc",
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
               "metadata": {"name": "web-abc", "namespace": "shop", "uid": "rs-uid",
                            "annotations": {"deployment.kubernetes.io/revision": "4"},
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                "name": "web", "uid": "d-uid", "controller": true}]}}),
    );
    let (https, shutdown, running) = serve_ready(&f, &api).await;
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-2", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop", "operation": "CREATE",
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"generateName": "web-abc-", "labels": {"app": "web"},
                                    "ownerReferences": [{"apiVersion": "apps/v1",
                                        "kind": "ReplicaSet", "name": "web-abc", "uid": "rs-uid",
                                        "controller": true}]},
                       "spec": {"containers": [{"name": "web", "image": "nginx"}]}},
        },
    });
    let reads_before = api.seen().len();
    let answer = post_json(https, &f.ca_pem, "/mutate", &review)
        .await
        .expect("a review answer");
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"app": "web", "canarytag": "beta", "stage": "gray"})
    );
    let review_calls: Vec<String> = calls(&api)[reads_before..]
        .iter()
        .filter(|c| c.contains("replicasets") || c.contains("deployments"))
        .filter(|c| !c.ends_with("?watch"))
        .cloned()
        .collect();
    assert_eq!(
        review_calls,
        Vec::<String>::new(),
        "no API call on the review path"
    );
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn with_leader_election_off_the_replica_copies_without_a_lease() {
    let f = fixture();
    let api = apiserver(None);
    let (client, _served) = api.client();
    let mut cfg = cluster_config();
    cfg.leader_election.enabled = false;
    let app = App::bind(cfg, options(&f, ClusterAccess::Client(client)))
        .await
        .unwrap();
    let shutdown = Shutdown::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    poll("the copy in shop", async || {
        position(&calls(&api), "PATCH /api/v1/namespaces/shop/").is_some()
    })
    .await;
    poll("the pod labelled", async || {
        api.get(POD).unwrap()["metadata"]["labels"]["stage"] == "normal"
    })
    .await;
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let calls = calls(&api);
    assert_eq!(
        position(&calls, "GET /apis/coordination"),
        None,
        "{calls:#?}"
    );
    assert_eq!(
        position(&calls, "POST /apis/coordination"),
        None,
        "{calls:#?}"
    );
}

#[tokio::test]
async fn with_backfill_off_running_pods_are_left_alone() {
    let f = fixture();
    let api = apiserver(None);
    let mut cfg = cluster_config();
    cfg.backfill.enabled = false;
    let (_, shutdown, running) = serve_ready_with(&f, &api, cfg).await;
    poll("the copy in shop", async || {
        position(&calls(&api), "PATCH /api/v1/namespaces/shop/").is_some()
    })
    .await;
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let calls = calls(&api);
    assert_eq!(
        position(&calls, "GET /api/v1/namespaces/shop/pods"),
        None,
        "{calls:#?}"
    );
    assert_eq!(
        api.get(POD).unwrap()["metadata"]["labels"],
        json!({"app": "web"})
    );
}

/// A plain `GET /metrics` of the metrics port.
async fn scrape(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// The no-leader alert needs to know whether anything wants a leader: a
/// replica with a writing controller is a candidate, one with none is not
/// (and runs no election).
#[tokio::test]
async fn only_a_replica_with_writers_is_a_leader_candidate() {
    let f = fixture();
    for writers in [true, false] {
        let api = apiserver(None);
        let mut cfg = cluster_config();
        if !writers {
            cfg.routes.enabled = false;
            cfg.backfill.enabled = false;
            cfg.bootstrap.reconcile = false;
        }
        let (client, _served) = api.client();
        let app = App::bind(cfg, options(&f, ClusterAccess::Client(client)))
            .await
            .unwrap();
        let (https, metrics) = app.local_addrs();
        let shutdown = Shutdown::new();
        let running = tokio::spawn(app.run(shutdown.clone()));
        poll("ready", async || {
            get(https, &f.ca_pem, "/readyz").await == Some(200)
        })
        .await;
        let want = format!("canary_injector_leader_candidate {}", u8::from(writers));
        poll("the candidate gauge", async || {
            scrape(metrics).await.lines().any(|l| l == want)
        })
        .await;
        if writers {
            poll("the lease", async || {
                scrape(metrics)
                    .await
                    .lines()
                    .any(|l| l == "canary_injector_leader 1")
            })
            .await;
        }
        shutdown.request();
        tokio::time::timeout(Duration::from_secs(20), running)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let election = position(&calls(&api), "GET /apis/coordination");
        assert_eq!(election.is_some(), writers, "{:#?}", calls(&api));
    }
}
