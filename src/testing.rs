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
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
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
