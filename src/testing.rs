//! Test support shared by the unit tests of every module that calls the
//! Kubernetes API: a mock apiserver in kube-rs' tower-test pattern.
//!
//! The client under test talks to a [`MockApi`]; the test takes each request
//! with [`MockApi::next`] (method, path, query, content type and JSON body
//! already read), asserts on it and answers as an apiserver would: an
//! object, a list, a watch stream line, or a `Status` failure with its code.
//! A request that never comes times out in [`MockApi::next`]; a request that
//! should not come fails [`MockApi::expect_no_more`].

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// Long enough for a slow CI machine, short enough to fail fast.
pub const WAIT: Duration = Duration::from_secs(5);

/// The test's side of the mock apiserver.
pub struct MockApi(tower_test::mock::Handle<Request<Body>, Response<Body>>);

/// A kube client wired to a fresh [`MockApi`]; the default namespace is
/// `default`.
pub fn mock_client() -> (Client, MockApi) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), MockApi(handle))
}

/// One request the client sent, read, with its responder.
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// URI path.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// `Content-Type`, empty when absent.
    pub content_type: String,
    /// `Accept`, empty when absent (metadata-only reads ask for
    /// `application/json;as=PartialObjectMetadata...`).
    pub accept: String,
    /// The JSON body; `Null` when empty.
    pub body: Value,
    reply: tower_test::mock::SendResponse<Response<Body>>,
}

impl MockApi {
    /// The next request, within [`WAIT`]. Panics when none comes.
    pub async fn next(&mut self) -> Call {
        let (request, reply) = tokio::time::timeout(WAIT, self.0.next_request())
            .await
            .expect("timed out waiting for the next API call")
            .expect("the client went away before the next API call");
        read_call(request, reply).await
    }

    /// The next request, which must be `method path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected API call"
        );
        call
    }

    /// Requires that no further call comes before every client is dropped.
    pub async fn expect_no_more(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!(
                "unexpected API call: {} {}",
                request.method(),
                request.uri()
            );
        }
    }

    /// The next request, or `None` when every client is gone.
    pub async fn next_or_end(&mut self) -> Option<Call> {
        let (request, reply) = self.0.next_request().await?;
        Some(read_call(request, reply).await)
    }
}

async fn read_call(
    request: Request<Body>,
    reply: tower_test::mock::SendResponse<Response<Body>>,
) -> Call {
    let query = form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let (content_type, accept) = {
        let header = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        (header(header::CONTENT_TYPE), header(header::ACCEPT))
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    Call {
        method,
        path,
        query,
        content_type,
        accept,
        body,
        reply,
    }
}

impl Call {
    /// A query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// True for a `?watch=true` request.
    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }

    /// Answers `200` with `body`.
    pub fn ok(self, body: &Value) {
        self.respond(StatusCode::OK, body);
    }

    /// Answers with `code` and a JSON `body`.
    pub fn respond(self, code: StatusCode, body: &Value) {
        let resp = Response::builder()
            .status(code)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.reply.send_response(resp);
    }

    /// Answers with a `Status` failure, as the apiserver does.
    pub fn fail(self, code: u16, reason: &str, message: &str) {
        let body = status(code, reason, message);
        self.respond(StatusCode::from_u16(code).unwrap(), &body);
    }

    /// Answers a watch with these events (one JSON line each), then ends
    /// the stream (the watcher re-watches).
    pub fn events(self, events: &[Value]) {
        let mut lines = Vec::new();
        for e in events {
            lines.extend(serde_json::to_vec(e).unwrap());
            lines.push(b'\n');
        }
        self.reply.send_response(Response::new(Body::from(lines)));
    }

    /// Keeps the request open without answering (a watch with no events);
    /// dropping the returned guard ends it.
    pub fn park(self) -> tower_test::mock::SendResponse<Response<Body>> {
        self.reply
    }
}

/// True when a scrape of `registry` has exactly this sample line, e.g.
/// `canary_injector_events_total{outcome="dropped"} 1`.
pub fn scraped(registry: &prometheus::Registry, line: &str) -> bool {
    String::from_utf8(crate::metrics::encode(registry))
        .unwrap()
        .lines()
        .any(|l| l == line)
}

/// A `Status` failure body.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// A list body (`<kind>List`) at `resource_version`.
pub fn list(kind: &str, resource_version: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1", "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": resource_version},
        "items": items,
    })
}

// === FakeApiServer: a stateful apiserver model ===

/// What a [`FakeApiServer`] saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: Method,
    /// URI path.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// `Content-Type`, empty when absent.
    pub content_type: String,
    /// `Accept`, empty when absent.
    pub accept: String,
    /// The JSON body; `Null` when empty.
    pub body: Value,
}

impl Seen {
    /// True for anything but a read.
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

/// What a [`FakeApiServer`] does just before it handles a matching request.
#[derive(Debug, Clone)]
pub enum Hook {
    /// Answer with this status (a `Status` failure) instead.
    Fail(u16),
    /// Another writer changes the object first: new `resourceVersion` and
    /// a label `touched-by: someone-else`.
    Touch,
    /// Answer with this `Status` body (its `code` is the HTTP status):
    /// what a validation error or a policy looks like.
    Reject(Value),
}

#[derive(Default)]
struct FakeState {
    objects: BTreeMap<String, Value>,
    version: u64,
    calls: Vec<Seen>,
    hooks: Vec<(Method, String, Hook)>,
    /// While set, every request gets this status (an outage).
    outage: Option<u16>,
    parked: Vec<tower_test::mock::SendResponse<Response<Body>>>,
}

/// An in-memory apiserver that keeps objects by URL path and answers as the
/// real one does, for tests that care about state and exact calls:
/// - `GET` of an object (200, or a 404 `Status`); of a collection (a list,
///   filtered by equality `labelSelector` and `metadata.name`/
///   `metadata.namespace` `fieldSelector`; `/api/v1/pods` lists every
///   namespace; paged by `limit`, with a `continue` token while more
///   remain); a `watch=true` request is held open with no events;
/// - an `Accept` of `as=PartialObjectMetadata(List)` (kube's
///   `*_metadata` calls) gets metadata only;
/// - `POST` to a collection: create (409 `AlreadyExists`);
/// - `PUT`: replace (404 when absent, 409 when the `resourceVersion` is not
///   the stored one);
/// - `PATCH` server-side apply (`application/apply-patch+yaml`:
///   `fieldManager` required; creates when absent, ignoring a
///   `resourceVersion`; else 409 on a `resourceVersion` mismatch, 422 on a
///   `type` change; merges maps key by key), RFC 6902 JSON Patch (a failed
///   `test` or path gives 422) and merge patch (RFC 7386);
/// - `DELETE` (200 with the object, or 404).
///
/// Every write bumps a cluster-wide `resourceVersion`. Every request is
/// recorded ([`FakeApiServer::calls`]); failures and concurrent writers can
/// be injected ([`FakeApiServer::hook`]). Not modelled: managed-fields
/// ownership (which keys an apply may remove), list merge keys, admission.
#[derive(Clone, Default)]
pub struct FakeApiServer(std::sync::Arc<std::sync::Mutex<FakeState>>);

const APPLY: &str = "application/apply-patch+yaml";
const JSON_PATCH: &str = "application/json-patch+json";
const MERGE_PATCH: &str = "application/merge-patch+json";

impl FakeApiServer {
    /// A server holding `objects` (path, object).
    pub fn with(objects: &[(&str, Value)]) -> Self {
        let server = Self::default();
        for (path, object) in objects {
            server.put(path, object.clone());
        }
        server
    }

    /// Stores `object` at `path` as a write would (new `resourceVersion`).
    pub fn put(&self, path: &str, mut object: Value) {
        let mut s = self.0.lock().unwrap();
        s.version += 1;
        object["metadata"]["resourceVersion"] = json!(s.version.to_string());
        s.objects.insert(path.to_owned(), object);
    }

    /// The object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// Injects `hook` before the next `method path` request.
    pub fn hook(&self, method: Method, path: &str, hook: Hook) {
        self.0
            .lock()
            .unwrap()
            .hooks
            .push((method, path.to_owned(), hook));
    }

    /// Answers every request with `code` from now on (`None`: healthy again).
    pub fn outage(&self, code: Option<u16>) {
        self.0.lock().unwrap().outage = code;
    }

    /// The requests recorded so far, keeping them.
    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().calls.clone()
    }

    /// Takes the requests recorded so far.
    pub fn calls(&self) -> Vec<Seen> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }

    /// A client served by this apiserver until every clone of it is dropped
    /// (then the returned task ends).
    pub fn client(&self) -> (Client, tokio::task::JoinHandle<()>) {
        let (client, mut api) = mock_client();
        let server = self.clone();
        let task = tokio::spawn(async move {
            while let Some(call) = api.next_or_end().await {
                let seen = Seen {
                    method: call.method.clone(),
                    path: call.path.clone(),
                    query: call.query.clone(),
                    content_type: call.content_type.clone(),
                    accept: call.accept.clone(),
                    body: call.body.clone(),
                };
                if seen.method == Method::GET && call.is_watch() {
                    server.0.lock().unwrap().calls.push(seen);
                    let parked = call.park();
                    server.0.lock().unwrap().parked.push(parked);
                    continue;
                }
                let metadata_only = seen.accept.contains("as=PartialObjectMetadata");
                let (code, body) = server.handle(seen);
                let body = if metadata_only && code.is_success() {
                    partial_metadata(body)
                } else {
                    body
                };
                call.respond(code, &body);
            }
        });
        (client, task)
    }

    fn handle(&self, call: Seen) -> (StatusCode, Value) {
        let mut s = self.0.lock().unwrap();
        s.calls.push(call.clone());
        if let Some(code) = s.outage {
            return failure(code, "InternalError", "etcdserver: request timed out");
        }
        let hook = s
            .hooks
            .iter()
            .position(|(m, p, _)| *m == call.method && *p == call.path)
            .map(|i| s.hooks.remove(i).2);
        match hook {
            Some(Hook::Fail(code)) => return failure(code, "InternalError", "injected failure"),
            Some(Hook::Reject(body)) => {
                let code = body["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                let code = code.and_then(|c| StatusCode::from_u16(c).ok());
                return (code.expect("a Status with its code"), body);
            }
            Some(Hook::Touch) => {
                s.version += 1;
                let v = s.version.to_string();
                let o = s
                    .objects
                    .get_mut(&call.path)
                    .expect("touch an existing object");
                o["metadata"]["resourceVersion"] = json!(v);
                o["metadata"]["labels"]["touched-by"] = json!("someone-else");
            }
            None => {}
        }
        let stored = s.objects.get(&call.path).cloned();
        let next_version = |s: &mut FakeState| {
            s.version += 1;
            json!(s.version.to_string())
        };
        match call.method.clone() {
            Method::GET => match stored {
                Some(o) => (StatusCode::OK, o),
                None if is_collection(&call.path) => {
                    let mut items: Vec<Value> = s
                        .objects
                        .iter()
                        .filter(|(p, o)| in_collection(p, &call.path) && selected(o, &call.query))
                        .map(|(_, o)| o.clone())
                        .collect();
                    // Paging: the token is the offset of the next item.
                    let param = |name: &str| call.query.get(name).map(|v| v.parse().unwrap());
                    let from: usize = param("continue").unwrap_or(0);
                    let limit: usize = param("limit").unwrap_or(usize::MAX);
                    items.drain(..from.min(items.len()));
                    let more = items.len() > limit;
                    items.truncate(limit);
                    let mut metadata = json!({"resourceVersion": s.version.to_string()});
                    if more {
                        metadata["continue"] = json!((from + limit).to_string());
                    }
                    (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "List",
                               "metadata": metadata, "items": items}),
                    )
                }
                None => failure(404, "NotFound", "not found"),
            },
            Method::POST => {
                let Some(name) = call.body["metadata"]["name"].as_str() else {
                    return failure(422, "Invalid", "metadata.name: Required value");
                };
                let path = format!("{}/{name}", call.path);
                if s.objects.contains_key(&path) {
                    return failure(409, "AlreadyExists", &format!("{name:?} already exists"));
                }
                let mut o = call.body.clone();
                o["metadata"]["resourceVersion"] = next_version(&mut s);
                o["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", s.version));
                s.objects.insert(path, o.clone());
                (StatusCode::CREATED, o)
            }
            Method::PUT => {
                let Some(o) = stored else {
                    return failure(404, "NotFound", "not found");
                };
                if call.body["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] {
                    return failure(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                let mut o = call.body.clone();
                o["metadata"]["resourceVersion"] = next_version(&mut s);
                s.objects.insert(call.path.clone(), o.clone());
                (StatusCode::OK, o)
            }
            Method::DELETE => match s.objects.remove(&call.path) {
                Some(o) => (StatusCode::OK, o),
                None => failure(404, "NotFound", "not found"),
            },
            Method::PATCH if call.content_type == APPLY => {
                assert!(
                    call.query.contains_key("fieldManager"),
                    "apply needs fieldManager"
                );
                let mut applied = call.body.clone();
                assert_eq!(
                    applied["metadata"]["name"].as_str(),
                    call.path.rsplit('/').next(),
                    "name in the body and the URL"
                );
                let (code, object) = match stored {
                    None => {
                        // Create: a resourceVersion in the applied object is ignored.
                        applied["metadata"]["resourceVersion"] = next_version(&mut s);
                        applied["metadata"]["uid"] =
                            json!(format!("00000000-0000-4000-8000-{:012}", s.version));
                        (StatusCode::CREATED, applied)
                    }
                    Some(mut o) => {
                        if let Some(rv) = applied["metadata"]["resourceVersion"].as_str()
                            && Some(rv) != o["metadata"]["resourceVersion"].as_str()
                        {
                            return failure(409, "Conflict", "the object has been modified");
                        }
                        if applied.get("type").is_some() && applied["type"] != o["type"] {
                            return failure(422, "Invalid", "type: field is immutable");
                        }
                        merge(&mut o, applied);
                        o["metadata"]["resourceVersion"] = next_version(&mut s);
                        (StatusCode::OK, o)
                    }
                };
                s.objects.insert(call.path.clone(), object.clone());
                (code, object)
            }
            Method::PATCH
                if call.content_type == JSON_PATCH || call.content_type == MERGE_PATCH =>
            {
                let Some(mut o) = stored else {
                    return failure(404, "NotFound", "not found");
                };
                if call.content_type == JSON_PATCH {
                    let ops: json_patch::Patch =
                        serde_json::from_value(call.body.clone()).expect("a JSON Patch array");
                    if json_patch::patch(&mut o, &ops).is_err() {
                        return failure(
                            422,
                            "Invalid",
                            "the server rejected our request due to an error in our request",
                        );
                    }
                } else {
                    json_patch::merge(&mut o, &call.body);
                }
                o["metadata"]["resourceVersion"] = next_version(&mut s);
                s.objects.insert(call.path.clone(), o.clone());
                (StatusCode::OK, o)
            }
            method => panic!(
                "unexpected request {method} {} ({})",
                call.path, call.content_type
            ),
        }
    }
}

/// `Accept` of kube's metadata-only list (`PartialObjectMetadataList`).
pub const METADATA_LIST_ACCEPT: &str =
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// `Accept` of kube's metadata-only get and watch (`PartialObjectMetadata`).
pub const METADATA_ACCEPT: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

/// What the apiserver answers for `as=PartialObjectMetadata(List)`: the
/// objects' `metadata` only (a list's items, or one object).
pub(crate) fn partial_metadata(body: Value) -> Value {
    let one = |o: &Value| {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": o["metadata"]})
    };
    match body.get("items").and_then(Value::as_array) {
        Some(items) => json!({"apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList", "metadata": body["metadata"],
            "items": items.iter().map(one).collect::<Vec<_>>()}),
        None => one(&body),
    }
}

fn failure(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        status(code, reason, message),
    )
}

/// Merges `from` into `into` map by map (what an apply of a map does;
/// lists and scalars are replaced).
pub(crate) fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from,
    }
}

/// A collection path has an even number of segments after the group
/// prefix: `/api/v1/pods`, `/api/v1/namespaces/ns/pods`,
/// `/apis/apps/v1/namespaces/ns/replicasets`.
fn is_collection(path: &str) -> bool {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| {
            path.strip_prefix("/apis/")
                .and_then(|r| r.splitn(3, '/').nth(2))
        })
        .unwrap_or("");
    let segments = rest.split('/').filter(|s| !s.is_empty()).count();
    segments == 1 || (segments == 3 && rest.starts_with("namespaces/"))
}

/// Whether the object at `path` belongs to the list at `collection`
/// (`/api/v1/pods` also holds `/api/v1/namespaces/*/pods/*`).
fn in_collection(path: &str, collection: &str) -> bool {
    let Some((parent, _)) = path.rsplit_once('/') else {
        return false;
    };
    if parent == collection {
        return true;
    }
    let (prefix, resource) = collection.rsplit_once('/').unwrap_or(("", collection));
    parent
        .strip_prefix(&format!("{prefix}/namespaces/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, r)| r == resource)
}

/// Label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
/// `k notin (a,b)`) and name/namespace field selectors.
pub(crate) fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let meta = &object["metadata"];
    let labels = &meta["labels"];
    let label_ok = query.get("labelSelector").is_none_or(|sel| {
        selector_terms(sel).into_iter().all(|term| {
            let set = |rest: &str| -> Vec<String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'));
                let inner = inner.unwrap_or_else(|| panic!("label selector {term:?}: no set"));
                inner.split(',').map(|v| v.trim().to_owned()).collect()
            };
            let value = |k: &str| labels[k.trim()].as_str().map(str::to_owned);
            if let Some((k, rest)) = term.split_once(" notin ") {
                value(k).is_none_or(|v| !set(rest).contains(&v))
            } else if let Some((k, rest)) = term.split_once(" in ") {
                value(k).is_some_and(|v| set(rest).contains(&v))
            } else if let Some((k, v)) = term.split_once("!=") {
                labels[k].as_str() != Some(v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels[k].as_str() == Some(v)
            } else if let Some(k) = term.strip_prefix('!') {
                labels.get(k).is_none()
            } else {
                labels.get(term).is_some()
            }
        })
    });
    let field_ok = query.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => meta["name"].as_str() == Some(v),
            Some(("metadata.namespace", v)) => meta["namespace"].as_str() == Some(v),
            _ => panic!("field selector {term:?} is not modelled"),
        })
    });
    label_ok && field_ok
}

/// The terms of a label selector: split at the commas outside `(...)`.
fn selector_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0_u32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms.into_iter().filter(|t| !t.is_empty()).collect()
}

#[cfg(test)]
mod fake_tests {
    use super::*;

    #[test]
    fn collections_and_membership() {
        assert!(is_collection("/api/v1/pods"));
        assert!(is_collection("/api/v1/namespaces/shop/pods"));
        assert!(is_collection("/apis/apps/v1/namespaces/shop/replicasets"));
        assert!(!is_collection("/api/v1/namespaces/shop/pods/web-1"));
        assert!(!is_collection("/api/v1/namespaces/shop"));
        assert!(in_collection(
            "/api/v1/namespaces/shop/pods/a",
            "/api/v1/pods"
        ));
        assert!(in_collection(
            "/api/v1/namespaces/shop/pods/a",
            "/api/v1/namespaces/shop/pods"
        ));
        assert!(!in_collection(
            "/api/v1/namespaces/shop/pods/a",
            "/api/v1/namespaces/other/pods"
        ));
        assert!(!in_collection(
            "/api/v1/namespaces/shop/secrets/a",
            "/api/v1/pods"
        ));
    }

    #[tokio::test]
    async fn lists_page_and_metadata_reads_get_metadata_only() {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, ListParams};
        let pod = |name: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "shop"},
                   "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
        };
        let fake = FakeApiServer::with(&[
            ("/api/v1/namespaces/shop/pods/a", pod("a")),
            ("/api/v1/namespaces/shop/pods/b", pod("b")),
            ("/api/v1/namespaces/shop/pods/c", pod("c")),
        ]);
        let (client, task) = fake.client();
        let api: Api<Pod> = Api::namespaced(client, "shop");
        let first = api
            .list_metadata(&ListParams::default().limit(2))
            .await
            .unwrap();
        let names: Vec<_> = first
            .items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let token = first.metadata.continue_.clone().unwrap();
        let rest = api
            .list_metadata(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(rest.items.len(), 1);
        assert!(rest.metadata.continue_.is_none_or(|c| c.is_empty()));
        let seen = fake.calls();
        assert!(seen[0].accept.contains("as=PartialObjectMetadataList"));
        // Full reads still get the whole object.
        let full = api.get("a").await.unwrap();
        assert_eq!(
            full.spec.unwrap().containers[0].image.as_deref(),
            Some("nginx")
        );
        drop(api);
        task.await.unwrap();
    }

    #[test]
    fn partial_metadata_keeps_only_metadata() {
        let list = json!({"kind": "List", "metadata": {"resourceVersion": "7"},
            "items": [{"kind": "Pod", "metadata": {"name": "a"}, "spec": {}}]});
        let out = partial_metadata(list);
        assert_eq!(out["kind"], "PartialObjectMetadataList");
        assert_eq!(
            out["items"][0],
            json!({"apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata", "metadata": {"name": "a"}})
        );
    }

    #[test]
    fn selectors() {
        let o =
            json!({"metadata": {"name": "a", "namespace": "shop", "labels": {"stage": "gray"}}});
        let q = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(selected(&o, &q("labelSelector", "stage=gray")));
        assert!(selected(&o, &q("labelSelector", "stage==gray,!canarytag")));
        assert!(!selected(&o, &q("labelSelector", "stage!=gray")));
        assert!(selected(&o, &q("labelSelector", "stage in (normal,gray)")));
        assert!(selected(
            &o,
            &q("labelSelector", "stage in (gray),!canarytag")
        ));
        assert!(!selected(&o, &q("labelSelector", "stage in (normal)")));
        assert!(!selected(&o, &q("labelSelector", "tier in (web)")));
        assert!(selected(&o, &q("labelSelector", "tier notin (web)")));
        assert!(!selected(&o, &q("labelSelector", "stage notin (gray,x)")));
        assert!(selected(&o, &q("fieldSelector", "metadata.name=a")));
        assert!(!selected(
            &o,
            &q("fieldSelector", "metadata.namespace=other")
        ));
    }
}
