//! Test support shared by the unit tests of every module that calls the
//! Kubernetes API: a mock apiserver in kube-rs' tower-test pattern.
//!
//! The client under test talks to a [`MockApi`]; the test takes each request
//! with [`MockApi::next`] (method, path, query, content type and JSON body
//! already read), asserts on it and answers as an apiserver would: an
//! object, a list, a watch stream line, or a `Status` failure with its code.
//! A request that never comes times out in [`MockApi::next`]; a request that
//! should not come fails [`MockApi::expect_no_more`].
//!
//! Tests that care about state rather than the exact order of calls (the
//! controllers, backfill, the lease, `check`) use [`FakeApiServer`]: one
//! in-memory apiserver model (objects, lists, watches, patches,
//! preconditions, discovery) shared by every module, so what the fake gets
//! right or wrong about the apiserver it gets right or wrong once.

use std::collections::{BTreeMap, BTreeSet};
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
    /// When it came (tokio's clock, so paused-time tests can measure
    /// intervals between writes).
    pub at: tokio::time::Instant,
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

    /// `METHOD path`, for assertions on the order of calls.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn is_watch(&self) -> bool {
        self.method == Method::GET && self.query.get("watch").is_some_and(|w| w == "true")
    }
}

/// What a [`FakeApiServer`] does just before it handles a matching request.
#[derive(Debug, Clone)]
pub enum Hook {
    /// Answer with this status (a `Status` failure) instead.
    Fail(u16),
    /// Another writer changes the object first: new `resourceVersion` and
    /// a label `touched-by: someone-else` (watches see the change).
    Touch,
    /// Answer with this `Status` body (its `code` is the HTTP status):
    /// what a validation error or a policy looks like.
    Reject(Value),
}

/// An API group the server may or may not serve (a CRD's group).
struct Group {
    /// Versions served, preferred first; empty: the group is not served.
    versions: Vec<String>,
    /// (plural, kind) of every resource, in every version.
    resources: Vec<(String, String)>,
}

/// A watch: what it selects, from which version.
struct Watch {
    collection: String,
    query: BTreeMap<String, String>,
    /// Asked for `PartialObjectMetadata`: events carry metadata only.
    metadata_only: bool,
    /// The `resourceVersion` it watches from.
    since: u64,
}

/// A watch held open until an event it selects happens.
struct Parked {
    watch: Watch,
    reply: tower_test::mock::SendResponse<Response<Body>>,
}

#[derive(Default)]
struct FakeState {
    objects: BTreeMap<String, Value>,
    version: u64,
    /// Every change: (resourceVersion, path, old, new).
    log: Vec<(u64, String, Option<Value>, Option<Value>)>,
    calls: Vec<Seen>,
    hooks: Vec<(Method, String, Hook)>,
    /// Mutating admission: a merge patch applied to every object written
    /// to a path.
    admission: Vec<(String, Value)>,
    /// While set, every request gets this status (an outage).
    outage: Option<u16>,
    parked: Vec<Parked>,
    /// Groups whose serving a test controls, by name.
    groups: BTreeMap<String, Group>,
    /// Collections that must be read as `PartialObjectMetadata`.
    metadata_only: Vec<String>,
    /// Reads of those collections that asked for whole objects.
    full_reads: Vec<String>,
    /// Watch paths whose events are held back (a lagging watch cache).
    held: Vec<String>,
    /// The fields each field manager set on each object, by operation
    /// (`Apply`, or `Update` for a create or update that names one): the
    /// paths of the fields (through maps; a list or scalar is one field),
    /// what `managedFields` records.
    managed: BTreeMap<(String, String, &'static str), BTreeSet<Vec<String>>>,
}

/// An in-memory apiserver that keeps objects by URL path and answers as the
/// real one does, for tests that care about state and exact calls:
/// - `GET` of an object (200, or a 404 `Status`); of a collection (a list,
///   filtered by `labelSelector` and `metadata.name`/`metadata.namespace`
///   `fieldSelector`; `/api/v1/pods` lists every namespace; paged by
///   `limit`, with a `continue` token while more remain);
/// - `watch=true`: held open until something it selects changes after its
///   `resourceVersion`, then answered with those events (`ADDED`,
///   `MODIFIED`, `DELETED`; an object that stops matching the selector is
///   `DELETED` for that watch) and ended, so the watcher watches again;
///   [`FakeApiServer::hold_watch`] holds a collection's events back (the
///   watch cache lagging behind the writes, as under a burst);
/// - an `Accept` of `as=PartialObjectMetadata(List)` (kube's metadata
///   calls and `PartialObjectMeta` watches) gets metadata only;
///   [`FakeApiServer::require_metadata_only`] records reads of chosen
///   collections that did not ask for it;
/// - `POST` to a collection: create (409 `AlreadyExists`, 422 without a
///   name); the namespace comes from the URL; a create (by `POST` or by an
///   apply) in a namespace being deleted is refused with 403, as the
///   NamespaceLifecycle plugin does;
/// - `PUT`: replace (404 when absent, 409 when the `resourceVersion` is not
///   the stored one);
/// - `PATCH` server-side apply (`application/apply-patch+yaml`:
///   `fieldManager` required; creates when absent, ignoring a
///   `resourceVersion`; else 409 on a `resourceVersion` mismatch, 422 on a
///   `type` change; merges maps key by key), RFC 6902 JSON Patch (a failed
///   `test` or path gives 422) and merge patch (RFC 7386);
/// - `DELETE` (200 with the object, 404, or 409 when a `uid` or
///   `resourceVersion` precondition does not hold);
/// - the defaults the apiserver gives Services and HTTPRoutes (see
///   `defaults`), applied to every stored object;
/// - discovery of the groups a test declares ([`FakeApiServer::serve_group`]):
///   while a group is not served, its discovery and every path under it
///   are 404, as when a CRD is not installed.
///
/// Every write bumps a cluster-wide `resourceVersion`. Every request is
/// recorded ([`FakeApiServer::calls`]); failures and concurrent writers can
/// be injected ([`FakeApiServer::hook`]). Field ownership is modelled as
/// far as removal goes: an apply removes the fields its manager applied
/// before and leaves out now, unless another manager, or the same manager's
/// create (`POST` with `fieldManager`: operation `Update`, a separate entry
/// in `managedFields`), set them too. Not modelled: list merge keys (lists
/// are replaced whole), conflicts between managers, admission other than
/// NamespaceLifecycle.
#[derive(Clone, Default)]
pub struct FakeApiServer(std::sync::Arc<std::sync::Mutex<FakeState>>);

const APPLY: &str = "application/apply-patch+yaml";
const APPLY_OPERATION: &str = "Apply";
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

    /// Stores `object` at `path` as another writer would (new
    /// `resourceVersion`, a `uid` when it has none); watches see it.
    pub fn put(&self, path: &str, object: Value) {
        self.0.lock().unwrap().store(path, Some(object));
    }

    /// Another writer deletes the object at `path`; watches see it.
    pub fn delete(&self, path: &str) {
        self.0.lock().unwrap().store(path, None);
    }

    /// The paths of every object held.
    pub fn paths(&self) -> Vec<String> {
        self.0.lock().unwrap().objects.keys().cloned().collect()
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

    /// A mutating admission webhook, from now on: every object written to
    /// `path` is stored with `merge` merged into it (RFC 7386), so what is
    /// read back is not what was sent.
    pub fn mutate_writes(&self, path: &str, merge: Value) {
        self.0
            .lock()
            .unwrap()
            .admission
            .push((path.to_owned(), merge));
    }

    /// Answers every request with `code` from now on (`None`: healthy again).
    pub fn outage(&self, code: Option<u16>) {
        self.0.lock().unwrap().outage = code;
    }

    /// Declares `group` with these versions served (preferred first) and
    /// resources (plural, kind); no versions: the group is not served.
    pub fn serve_group(&self, group: &str, versions: &[&str], resources: &[(&str, &str)]) {
        let group_state = Group {
            versions: versions.iter().map(|v| (*v).to_owned()).collect(),
            resources: resources
                .iter()
                .map(|(p, k)| ((*p).to_owned(), (*k).to_owned()))
                .collect(),
        };
        self.0
            .lock()
            .unwrap()
            .groups
            .insert(group.to_owned(), group_state);
    }

    /// Holds back the events of watches on `collection` (e.g.
    /// `/apis/networking.istio.io/v1/destinationrules`): the apiserver's
    /// watch cache lagging behind etcd under load, so a watcher sees its
    /// own writes late. Writes, reads and lists are answered as usual.
    pub fn hold_watch(&self, collection: &str) {
        self.0.lock().unwrap().held.push(collection.to_owned());
    }

    /// Delivers the events held back by [`FakeApiServer::hold_watch`], in
    /// order, and stops holding.
    pub fn release_watch(&self, collection: &str) {
        let mut s = self.0.lock().unwrap();
        s.held.retain(|c| c != collection);
        s.flush();
    }

    /// Requires reads of these collections (`/api/v1/pods`, ...) to ask for
    /// metadata only; see [`FakeApiServer::full_reads`].
    pub fn require_metadata_only(&self, collections: &[&str]) {
        self.0.lock().unwrap().metadata_only =
            collections.iter().map(|c| (*c).to_owned()).collect();
    }

    /// The reads of [`FakeApiServer::require_metadata_only`] collections
    /// that asked for whole objects.
    pub fn full_reads(&self) -> Vec<String> {
        self.0.lock().unwrap().full_reads.clone()
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
                    at: tokio::time::Instant::now(),
                    method: call.method.clone(),
                    path: call.path.clone(),
                    query: call.query.clone(),
                    content_type: call.content_type.clone(),
                    accept: call.accept.clone(),
                    body: call.body.clone(),
                };
                let mut s = server.0.lock().unwrap();
                match s.handle(seen) {
                    Answer::Now(code, body) => {
                        drop(s);
                        call.respond(code, &body);
                    }
                    Answer::Watch(watch) => {
                        let reply = call.park();
                        s.parked.push(Parked { watch, reply });
                        s.flush();
                    }
                }
            }
        });
        (client, task)
    }
}

/// How a request is answered: now, or (a watch) when events come.
enum Answer {
    Now(StatusCode, Value),
    Watch(Watch),
}

impl FakeState {
    /// Stores (or deletes, with `None`) an object under a new
    /// `resourceVersion`, logs the change and answers the watches it
    /// concerns. Returns what is stored.
    fn store(&mut self, path: &str, object: Option<Value>) -> Option<Value> {
        self.version += 1;
        let version = self.version;
        let old = self.objects.get(path).cloned();
        let admission: Vec<Value> = self
            .admission
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, m)| m.clone())
            .collect();
        let new = object.map(|mut o| {
            for m in &admission {
                json_patch::merge(&mut o, m);
            }
            defaults(path, &mut o, version);
            o["metadata"]["resourceVersion"] = json!(version.to_string());
            if o["metadata"].get("uid").is_none() {
                o["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{version:012}"));
            }
            o
        });
        match &new {
            Some(o) => self.objects.insert(path.to_owned(), o.clone()),
            None => {
                self.managed.retain(|k, _| k.0 != path);
                self.objects.remove(path)
            }
        };
        self.log.push((version, path.to_owned(), old, new.clone()));
        self.flush();
        new
    }

    /// Answers every parked watch that has events past its version.
    fn flush(&mut self) {
        for p in std::mem::take(&mut self.parked) {
            let w = &p.watch;
            if self.held.contains(&w.collection) {
                self.parked.push(p);
                continue;
            }
            let shape = |o: Value| {
                if w.metadata_only {
                    partial_metadata(o)
                } else {
                    o
                }
            };
            let mut body = Vec::new();
            for (rv, path, old, new) in &self.log {
                if *rv <= w.since || !in_collection(path, &w.collection) {
                    continue;
                }
                let matches = |o: &Option<Value>| o.as_ref().is_some_and(|o| selected(o, &w.query));
                let event = match (matches(old), matches(new)) {
                    (false, true) => {
                        json!({"type": "ADDED", "object": shape(new.clone().unwrap())})
                    }
                    (true, true) => {
                        json!({"type": "MODIFIED", "object": shape(new.clone().unwrap())})
                    }
                    (true, false) => {
                        // Deleted, or no longer selected: the last state, at
                        // the version of the change.
                        let mut gone = old.clone().unwrap();
                        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
                        json!({"type": "DELETED", "object": shape(gone)})
                    }
                    (false, false) => continue,
                };
                body.extend(serde_json::to_vec(&event).unwrap());
                body.push(b'\n');
            }
            if body.is_empty() {
                self.parked.push(p);
            } else {
                p.reply.send_response(Response::new(Body::from(body)));
            }
        }
    }

    /// Whether `path` is served: false under a declared group that is not
    /// served, or in a version it does not serve.
    fn serves(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix("/apis/") else {
            return true;
        };
        let mut parts = rest.split('/');
        let group = parts.next().unwrap_or("");
        let version = parts.next();
        self.groups.get(group).is_none_or(|g| {
            !g.versions.is_empty() && version.is_none_or(|v| g.versions.iter().any(|s| s == v))
        })
    }

    /// Discovery of a declared group (`/apis/<group>`, `/apis/<group>/<v>`).
    fn discovery(&self, path: &str) -> Option<Value> {
        let rest = path.strip_prefix("/apis/")?;
        let (name, version) = match rest.split_once('/') {
            Some((g, v)) if !v.contains('/') => (g, Some(v)),
            Some(_) => return None,
            None => (rest, None),
        };
        let group = self.groups.get(name)?;
        let entry = |v: &str| json!({"groupVersion": format!("{name}/{v}"), "version": v});
        Some(match version {
            None => json!({
                "kind": "APIGroup", "apiVersion": "v1", "name": name,
                "versions": group.versions.iter().map(|v| entry(v)).collect::<Vec<_>>(),
                "preferredVersion": entry(&group.versions[0]),
            }),
            Some(v) => json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("{name}/{v}"),
                "resources": group.resources.iter().map(|(plural, kind)| json!({
                    "name": plural, "singularName": "", "namespaced": true, "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                })).collect::<Vec<_>>(),
            }),
        })
    }

    /// Whether a read asks for metadata only; a read of a collection that
    /// must ([`FakeApiServer::require_metadata_only`]) and does not is
    /// recorded.
    fn metadata_read(&mut self, call: &Seen, collection: bool) -> bool {
        let metadata_only = call.accept.contains("as=PartialObjectMetadata");
        let wanted = if !collection || call.is_watch() {
            METADATA_ACCEPT
        } else {
            METADATA_LIST_ACCEPT
        };
        // canary-injector's own version Services are read whole, selected
        // by its label: the only whole reads of Services it makes.
        let ours = call
            .query
            .get("labelSelector")
            .is_some_and(|l| l.contains("canary-injector.io/route-of"));
        if collection && self.metadata_only.contains(&call.path) && call.accept != wanted && !ours {
            self.full_reads.push(format!(
                "{} {}{} with Accept {:?}",
                call.method,
                call.path,
                if call.is_watch() { "?watch" } else { "" },
                call.accept
            ));
        }
        metadata_only
    }

    fn handle(&mut self, call: Seen) -> Answer {
        self.calls.push(call.clone());
        let now = |(code, body)| Answer::Now(code, body);
        if let Some(code) = self.outage {
            return now(failure(
                code,
                "InternalError",
                "etcdserver: request timed out",
            ));
        }
        let hook = self
            .hooks
            .iter()
            .position(|(m, p, _)| *m == call.method && *p == call.path)
            .map(|i| self.hooks.remove(i).2);
        match hook {
            Some(Hook::Fail(code)) => {
                return now(failure(code, "InternalError", "injected failure"));
            }
            Some(Hook::Reject(body)) => {
                let code = body["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                let code = code.and_then(|c| StatusCode::from_u16(c).ok());
                return Answer::Now(code.expect("a Status with its code"), body);
            }
            Some(Hook::Touch) => {
                let mut o = self
                    .objects
                    .get(&call.path)
                    .cloned()
                    .expect("touch an existing object");
                o["metadata"]["labels"]["touched-by"] = json!("someone-else");
                self.store(&call.path, Some(o));
            }
            None => {}
        }
        if !self.serves(&call.path) {
            return now(failure(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        if call.method == Method::GET
            && let Some(discovery) = self.discovery(&call.path)
        {
            return Answer::Now(StatusCode::OK, discovery);
        }
        if call.is_watch() {
            let metadata_only = self.metadata_read(&call, true);
            return Answer::Watch(Watch {
                since: call
                    .query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                collection: call.path,
                query: call.query,
                metadata_only,
            });
        }
        let metadata_only =
            call.method == Method::GET && self.metadata_read(&call, is_collection(&call.path));
        let (code, body) = self.respond(call);
        let body = if metadata_only && code.is_success() {
            partial_metadata(body)
        } else {
            body
        };
        Answer::Now(code, body)
    }

    /// The NamespaceLifecycle admission plugin: a create in a namespace
    /// being deleted (its Namespace carries a `deletionTimestamp`) is
    /// refused with 403; updates and deletes go through.
    fn terminating(&self, path: &str, name: &str) -> Option<(StatusCode, Value)> {
        let namespace = namespace_of(path)?;
        let ns = self
            .objects
            .get(&format!("/api/v1/namespaces/{namespace}"))?;
        if ns["metadata"]["deletionTimestamp"].is_null() {
            return None;
        }
        let resource = path
            .trim_end_matches(&format!("/{name}"))
            .rsplit('/')
            .next()?;
        Some(failure(
            403,
            "Forbidden",
            &format!(
                "{resource} {name:?} is forbidden: unable to create new content in namespace \
                 {namespace} because it is being terminated"
            ),
        ))
    }

    fn respond(&mut self, call: Seen) -> (StatusCode, Value) {
        let stored = self.objects.get(&call.path).cloned();
        match call.method.clone() {
            Method::GET => match stored {
                Some(o) => (StatusCode::OK, o),
                None if is_collection(&call.path) => {
                    let mut items: Vec<Value> = self
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
                    let mut metadata = json!({"resourceVersion": self.version.to_string()});
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
                if let Some(refused) = self.terminating(&call.path, name) {
                    return refused;
                }
                let path = format!("{}/{name}", call.path);
                if self.objects.contains_key(&path) {
                    return failure(409, "AlreadyExists", &format!("{name:?} already exists"));
                }
                let mut o = call.body.clone();
                if let Some(namespace) = namespace_of(&call.path) {
                    o["metadata"]["namespace"] = json!(namespace);
                }
                if let Some(manager) = call.query.get("fieldManager") {
                    self.managed
                        .insert((path.clone(), manager.clone(), "Update"), field_paths(&o));
                }
                (StatusCode::CREATED, self.store(&path, Some(o)).unwrap())
            }
            Method::PUT => {
                let Some(o) = stored else {
                    return failure(404, "NotFound", "not found");
                };
                if call.body["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] {
                    return failure(409, "Conflict", CONFLICT);
                }
                (
                    StatusCode::OK,
                    self.store(&call.path, Some(call.body)).unwrap(),
                )
            }
            Method::DELETE => {
                let Some(o) = stored else {
                    return failure(404, "NotFound", "not found");
                };
                let pre = &call.body["preconditions"];
                for field in ["uid", "resourceVersion"] {
                    if !pre[field].is_null() && pre[field] != o["metadata"][field] {
                        return failure(
                            409,
                            "Conflict",
                            &format!(
                                "Precondition failed: {field} in precondition: {}, {field} in object meta: {}",
                                pre[field], o["metadata"][field]
                            ),
                        );
                    }
                }
                self.store(&call.path, None);
                (StatusCode::OK, o)
            }
            Method::PATCH if call.content_type == APPLY => {
                assert!(
                    call.query.contains_key("fieldManager"),
                    "apply needs fieldManager"
                );
                let applied = call.body.clone();
                assert_eq!(
                    applied["metadata"]["name"].as_str(),
                    call.path.rsplit('/').next(),
                    "name in the body and the URL"
                );
                match stored {
                    // Create: a resourceVersion in the applied object is ignored.
                    None => {
                        let name = call.path.rsplit('/').next().unwrap_or_default();
                        if let Some(refused) = self.terminating(&call.path, name) {
                            return refused;
                        }
                        let manager = call.query["fieldManager"].clone();
                        self.managed.insert(
                            (call.path.clone(), manager, APPLY_OPERATION),
                            field_paths(&applied),
                        );
                        (
                            StatusCode::CREATED,
                            self.store(&call.path, Some(applied)).unwrap(),
                        )
                    }
                    Some(mut o) => {
                        if let Some(rv) = applied["metadata"]["resourceVersion"].as_str()
                            && Some(rv) != o["metadata"]["resourceVersion"].as_str()
                        {
                            return failure(409, "Conflict", CONFLICT);
                        }
                        if applied.get("type").is_some() && applied["type"] != o["type"] {
                            return failure(422, "Invalid", "type: field is immutable");
                        }
                        // Fields this manager applied before and leaves
                        // out now are removed, unless another manager (or
                        // this one's create) set them too.
                        let manager = call.query["fieldManager"].clone();
                        let key = (call.path.clone(), manager, APPLY_OPERATION);
                        let now = field_paths(&applied);
                        let before = self.managed.get(&key).cloned().unwrap_or_default();
                        for gone in before.difference(&now) {
                            let shared = self.managed.iter().any(|(k, fields)| {
                                k.0 == call.path && *k != key && fields.contains(gone)
                            });
                            if !shared {
                                remove_field(&mut o, gone);
                            }
                        }
                        self.managed.insert(key, now);
                        merge(&mut o, applied);
                        (StatusCode::OK, self.store(&call.path, Some(o)).unwrap())
                    }
                }
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
                (StatusCode::OK, self.store(&call.path, Some(o)).unwrap())
            }
            method => panic!(
                "unexpected request {method} {} ({})",
                call.path, call.content_type
            ),
        }
    }
}

/// The defaults the apiserver gives the kinds the routes controller writes
/// (what a read then shows, so a writer that compares what it wrote with
/// what it reads must write them out): a Service's `type`, `clusterIP`,
/// `sessionAffinity` and ports' `protocol` and `targetPort`; an
/// HTTPRoute's (the Gateway API CRD's schema defaults) parentRef and
/// backendRef `group` and `kind`, backendRef `weight`, the `/` path prefix
/// of every match (and a rule without matches gets one), header match
/// `type`.
fn defaults(path: &str, o: &mut Value, version: u64) {
    let kind = path.rsplit('/').nth(1).unwrap_or_default();
    let set = |v: &mut Value, key: &str, default: Value| {
        if v.get(key).is_none_or(Value::is_null) {
            v[key] = default;
        }
    };
    // The items of an array field; never adds the field (`IndexMut` would
    // add a `null`, which the apiserver never stores).
    fn each<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
        v.get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
    }
    let Some(spec) = o.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    match kind {
        "services" if path.starts_with("/api/v1/namespaces/") => {
            set(spec, "type", json!("ClusterIP"));
            if spec["type"] != "ExternalName" {
                set(
                    spec,
                    "clusterIP",
                    json!(format!(
                        "10.96.{}.{}",
                        version / 250 % 250,
                        version % 250 + 1
                    )),
                );
                set(spec, "sessionAffinity", json!("None"));
            }
            for port in each(spec, "ports") {
                set(port, "protocol", json!("TCP"));
                let number = port["port"].clone();
                set(port, "targetPort", number);
            }
        }
        "httproutes" => {
            for parent in each(spec, "parentRefs") {
                set(parent, "group", json!("gateway.networking.k8s.io"));
                set(parent, "kind", json!("Gateway"));
            }
            set(
                spec,
                "rules",
                json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]),
            );
            for rule in each(spec, "rules") {
                set(
                    rule,
                    "matches",
                    json!([{"path": {"type": "PathPrefix", "value": "/"}}]),
                );
                for m in each(rule, "matches") {
                    set(m, "path", json!({"type": "PathPrefix", "value": "/"}));
                    set(&mut m["path"], "type", json!("PathPrefix"));
                    set(&mut m["path"], "value", json!("/"));
                    for h in each(m, "headers") {
                        set(h, "type", json!("Exact"));
                    }
                }
                for b in each(rule, "backendRefs") {
                    set(b, "group", json!(""));
                    set(b, "kind", json!("Service"));
                    set(b, "weight", json!(1));
                }
            }
        }
        _ => {}
    }
}

/// The apiserver's message for a stale `resourceVersion`.
const CONFLICT: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The namespace of a namespaced collection or object path.
fn namespace_of(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/namespaces/")?;
    let (namespace, _) = rest.split_once('/')?;
    Some(namespace)
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

/// The paths of the fields an applied object sets: through maps, down to
/// a list or scalar (one field each). `apiVersion`, `kind` and the name,
/// namespace and `resourceVersion` identify the object and are left out.
fn field_paths(object: &Value) -> BTreeSet<Vec<String>> {
    fn walk(v: &Value, at: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    at.push(k.clone());
                    walk(v, at, out);
                    at.pop();
                }
            }
            _ => {
                out.insert(at.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(object, &mut Vec::new(), &mut out);
    out.retain(|p| {
        let p: Vec<&str> = p.iter().map(String::as_str).collect();
        !matches!(
            p.as_slice(),
            ["apiVersion"] | ["kind"] | ["metadata", "name" | "namespace" | "resourceVersion"]
        )
    });
    out
}

/// Removes the field at `path` (and maps it leaves empty).
fn remove_field(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = &mut *object;
    for key in parents {
        match at.get_mut(key) {
            Some(next) => at = next,
            None => return,
        }
    }
    if let Some(m) = at.as_object_mut() {
        m.remove(last);
    }
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

    #[tokio::test]
    async fn watches_see_later_changes_through_their_selector() {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, WatchEvent, WatchParams};
        let pod = |name: &str, stage: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "shop",
                                "labels": {"stage": stage}},
                   "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
        };
        let fake = FakeApiServer::with(&[("/api/v1/namespaces/shop/pods/a", pod("a", "gray"))]);
        let (client, task) = fake.client();
        let api: Api<Pod> = Api::namespaced(client, "shop");
        let rv = api
            .list(&Default::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        // The watch is parked (no answer yet) until something its selector
        // sees changes after `rv`.
        let watching = tokio::spawn(async move {
            let params = WatchParams::default().labels("stage=gray");
            let mut events = api.watch(&params, &rv).await.unwrap().boxed();
            let first = events.next().await;
            (first, events.next().await)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watching.is_finished());
        fake.put("/api/v1/namespaces/shop/pods/b", pod("b", "normal"));
        fake.put("/api/v1/namespaces/shop/pods/a", pod("a", "normal"));
        let (first, end) = tokio::time::timeout(WAIT, watching).await.unwrap().unwrap();
        match first {
            // Leaving the selector reads as a deletion to this watch; `b`
            // never matched, so it is not an event at all.
            Some(Ok(WatchEvent::Deleted(p))) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
            other => panic!("expected DELETED a, got {other:?}"),
        }
        // Then the watch ends and the watcher would watch again.
        assert!(end.is_none(), "{end:?}");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn unserved_groups_and_failed_preconditions_answer_as_the_apiserver() {
        use kube::api::{Api, DeleteParams, DynamicObject, Preconditions};
        use kube::discovery::ApiResource;
        let fake = FakeApiServer::with(&[(
            "/api/v1/namespaces/shop/configmaps/c",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "c", "namespace": "shop"}}),
        )]);
        fake.serve_group("networking.istio.io", &[], &[]);
        let (client, task) = fake.client();
        let resource = ApiResource {
            group: "networking.istio.io".into(),
            version: "v1beta1".into(),
            api_version: "networking.istio.io/v1beta1".into(),
            kind: "VirtualService".into(),
            plural: "virtualservices".into(),
        };
        let vs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &resource);
        match vs.list(&Default::default()).await {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 404),
            other => panic!("expected 404, got {other:?}"),
        }
        fake.serve_group(
            "networking.istio.io",
            &["v1beta1"],
            &[("virtualservices", "VirtualService")],
        );
        assert!(vs.list(&Default::default()).await.unwrap().items.is_empty());

        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, "shop");
        let stale = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some("not-its-uid".into()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match cms.delete("c", &stale).await {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 409),
            other => panic!("expected 409, got {other:?}"),
        }
        assert!(fake.get("/api/v1/namespaces/shop/configmaps/c").is_some());
        cms.delete("c", &DeleteParams::default()).await.unwrap();
        assert!(fake.get("/api/v1/namespaces/shop/configmaps/c").is_none());
        drop((vs, cms));
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
