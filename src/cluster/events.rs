//! Kubernetes Events from code that must never wait for the API server (the
//! admission path): [`EventSink::emit`] only queues (a bounded channel,
//! never blocking; a full queue drops and counts), and one task
//! ([`publish`]) drains the queue into a [`Recorder`], which aggregates
//! repeats of the same event into a series. The task is paced by a token
//! bucket, so a storm of warnings cannot flood the API server.
//!
//! Dry-run reviews must not emit (the webhook declares
//! `sideEffects: NoneOnDryRun`); callers check before [`EventSink::emit`].

use std::collections::HashMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{EventType, Reporter};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::task::TaskError;

/// Events waiting to be published at most; beyond this they are dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// One event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRequest {
    /// The object the event is about (shown by `kubectl describe`).
    pub regarding: ObjectReference,
    /// `Normal` or `Warning`.
    pub type_: EventType,
    /// Short PascalCase reason, e.g. `CanaryTagRewritten`.
    pub reason: String,
    /// What was done, PascalCase, e.g. `Admit`.
    pub action: String,
    /// The human-readable message (at most 1 kB is kept).
    pub note: String,
}

/// Event counters by outcome (`published`, `dropped`, `failed`).
#[derive(Clone)]
pub struct EventMetrics {
    events: IntCounterVec,
}

impl EventMetrics {
    /// Creates and registers `events_total{outcome}`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new(
                "events_total",
                "Kubernetes Events by outcome: published, dropped (queue full, over the \
                 rate, or the namespace is being deleted), failed (the API refused them).",
            ),
            &["outcome"],
        )?;
        for outcome in ["published", "dropped", "failed"] {
            events.with_label_values(&[outcome]);
        }
        registry.register(Box::new(events.clone()))?;
        Ok(Self { events })
    }

    fn count(&self, outcome: &str) {
        self.events.with_label_values(&[outcome]).inc();
    }
}

/// The sending side; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<EventRequest>>,
    metrics: Option<EventMetrics>,
}

/// The receiving side, for [`publish`].
pub struct EventQueue {
    rx: mpsc::Receiver<EventRequest>,
}

#[cfg(test)]
impl EventQueue {
    /// Every queued event, without waiting (tests read what a sink was
    /// given).
    pub(crate) fn drain(&mut self) -> Vec<EventRequest> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
    }
}

impl EventSink {
    /// A sink that discards everything (no cluster).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            metrics: None,
        }
    }

    /// A sink and its queue holding up to `capacity` events.
    pub fn channel(capacity: usize, metrics: EventMetrics) -> (Self, EventQueue) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx: Some(tx),
                metrics: Some(metrics),
            },
            EventQueue { rx },
        )
    }

    /// Queues `event` without waiting; false when it was dropped (queue
    /// full, or no publisher).
    pub fn emit(&self, event: EventRequest) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let queued = tx.try_send(event).is_ok();
        if !queued && let Some(m) = &self.metrics {
            m.count("dropped");
        }
        queued
    }
}

/// Publishing pace: `per_second` on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Average events per second.
    pub per_second: u32,
    /// Events allowed at once after a quiet spell.
    pub burst: u32,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            per_second: 5,
            burst: 25,
        }
    }
}

const MAX_NOTE_BYTES: usize = 1024;

/// How long a repeat joins the series of an earlier Event (as client-go and
/// kube-runtime do).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// What makes two Events one series: the same object, type, reason, action
/// and note. Unlike kube-runtime's recorder the note is part of it, so two
/// different notes about one object (a route added for tag `a`, then one
/// for tag `b`) are two Events, never one series that shows only the first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    type_: &'static str,
    reason: String,
    action: String,
    note: String,
}

/// Publishes `events.k8s.io/v1` Events for one reporting controller: the
/// first of a series is created, a repeat within six minutes bumps the
/// series (`count`, `lastObservedTime`) of the Event already there.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: HashMap<SeriesKey, K8sEvent>,
}

impl Recorder {
    /// A recorder writing with `client` as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            series: HashMap::new(),
        }
    }

    /// Creates the Event of `request`, or bumps its series.
    pub async fn publish(&mut self, request: &EventRequest) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        self.series.retain(|_, e| {
            let last = e
                .series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or(e.event_time.as_ref().map(|t| t.0));
            last.is_some_and(|t| t + SERIES_TTL > now)
        });
        let r = &request.regarding;
        let type_ = match request.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let note = truncate(&request.note);
        let key = SeriesKey {
            regarding: (
                r.kind.clone(),
                r.namespace.clone(),
                r.name.clone(),
                r.uid.clone(),
            ),
            type_,
            reason: request.reason.clone(),
            action: request.action.clone(),
            note: note.clone(),
        };
        let namespace = r.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let event = match self.series.get(&key) {
            Some(first) => {
                let mut event = first.clone();
                event.series = Some(EventSeries {
                    count: first.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                let name = event.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&event))
                    .await?;
                event
            }
            None => {
                let event = K8sEvent {
                    metadata: ObjectMeta {
                        namespace: Some(namespace.to_owned()),
                        name: Some(format!(
                            "{}.{:x}",
                            r.name.as_deref().unwrap_or(&self.reporter.controller),
                            now.as_nanosecond()
                        )),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(now)),
                    type_: Some(type_.into()),
                    reason: Some(request.reason.clone()),
                    action: Some(request.action.clone()),
                    note: Some(note),
                    regarding: Some(r.clone()),
                    reporting_controller: Some(self.reporter.controller.clone()),
                    reporting_instance: Some(
                        self.reporter
                            .instance
                            .clone()
                            .unwrap_or_else(|| self.reporter.controller.clone()),
                    ),
                    ..K8sEvent::default()
                };
                api.create(&PostParams::default(), &event).await?;
                event
            }
        };
        self.series.insert(key, event);
        Ok(())
    }
}

/// True for the apiserver's refusal to create anything in a namespace
/// being deleted (403 `... because it is being terminated`): nothing to
/// report there, and no fault of ours.
pub fn is_namespace_terminating(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s)
        if s.code == 403 && s.message.contains("because it is being terminated"))
}

fn truncate(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_owned();
    }
    let mut end = MAX_NOTE_BYTES - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

/// Publishes queued events through `recorder` at `pace` until `shutdown`.
/// A refused event is counted and logged (once until one succeeds again);
/// it never ends the task.
pub async fn publish(
    mut queue: EventQueue,
    mut recorder: Recorder,
    pace: Pace,
    metrics: EventMetrics,
    shutdown: CancellationToken,
) -> Result<(), TaskError> {
    let per_token = Duration::from_secs(1) / pace.per_second.max(1);
    let burst = f64::from(pace.burst.max(1));
    let mut tokens = burst;
    let mut last = Instant::now();
    let mut failing = false;
    loop {
        let request = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = queue.rx.recv() => match r { Some(r) => r, None => break },
        };
        let now = Instant::now();
        tokens =
            (tokens + now.duration_since(last).as_secs_f64() / per_token.as_secs_f64()).min(burst);
        last = now;
        if tokens < 1.0 {
            let wait = per_token.mul_f64(1.0 - tokens);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            tokens = 1.0;
            last = Instant::now();
        }
        tokens -= 1.0;
        // A publish stuck on an unanswering API server must not hold up the
        // shutdown; one that has finished still counts.
        let published = tokio::select! {
            biased;
            published = recorder.publish(&request) => published,
            () = shutdown.cancelled() => break,
        };
        match published {
            Ok(()) => {
                metrics.count("published");
                failing = false;
                debug!(reason = %request.reason, "event published");
            }
            // The namespace is being deleted with everything in it: the
            // Event would go with it. Dropped quietly.
            Err(error) if is_namespace_terminating(&error) => {
                metrics.count("dropped");
                debug!(reason = %request.reason, "namespace terminating; event dropped");
            }
            Err(error) => {
                metrics.count("failed");
                if !failing {
                    warn!(%error, reason = %request.reason, "cannot publish an event");
                }
                failing = true;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mock_client;
    use http::{Method, StatusCode};
    use serde_json::Value;

    fn metrics() -> (Registry, EventMetrics) {
        let registry = Registry::new();
        let m = EventMetrics::register(&registry).unwrap();
        (registry, m)
    }

    fn count(m: &EventMetrics, outcome: &str) -> u64 {
        m.events.with_label_values(&[outcome]).get()
    }

    fn request(name: &str) -> EventRequest {
        EventRequest {
            regarding: ObjectReference {
                api_version: Some("apps/v1".into()),
                kind: Some("Deployment".into()),
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some("8f8c9a3e-0000-4000-8000-000000000001".into()),
                ..ObjectReference::default()
            },
            type_: EventType::Warning,
            reason: "CanaryTagRewritten".into(),
            action: "Admit".into(),
            note: "annotation canary-injector.io/tag: \"feature/x\" is not a valid label value; using \"feature-x\"".into(),
        }
    }

    fn reporter() -> Reporter {
        Reporter {
            controller: "canary-injector".into(),
            instance: Some("canary-injector-7d9f-abcde".into()),
        }
    }

    /// A publisher on a mock apiserver, its sink and what stops it.
    #[allow(clippy::type_complexity)]
    fn publisher(
        capacity: usize,
        pace: Pace,
    ) -> (
        EventSink,
        crate::testing::MockApi,
        EventMetrics,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), TaskError>>,
    ) {
        let (client, api) = mock_client();
        let (_, m) = metrics();
        let (sink, queue) = EventSink::channel(capacity, m.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(publish(
            queue,
            Recorder::new(client, reporter()),
            pace,
            m.clone(),
            shutdown.clone(),
        ));
        (sink, api, m, shutdown, task)
    }

    #[tokio::test]
    async fn a_queued_event_is_created_on_the_object() {
        let (sink, mut api, m, shutdown, task) = publisher(8, Pace::default());
        assert!(sink.emit(request("checkout")));
        let call = api
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events",
            )
            .await;
        let body = call.body.clone();
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["reason"], "CanaryTagRewritten");
        assert_eq!(body["action"], "Admit");
        assert_eq!(body["regarding"]["kind"], "Deployment");
        assert_eq!(body["regarding"]["name"], "checkout");
        assert_eq!(body["reportingController"], "canary-injector");
        assert_eq!(body["reportingInstance"], "canary-injector-7d9f-abcde");
        assert!(body["note"].as_str().unwrap().contains("feature-x"));
        call.respond(StatusCode::CREATED, &body);
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(count(&m, "published"), 1);
    }

    #[tokio::test]
    async fn a_repeat_joins_the_series_and_another_note_is_an_event_of_its_own() {
        let (sink, mut api, m, shutdown, task) = publisher(8, Pace::default());
        let path = "/apis/events.k8s.io/v1/namespaces/shop/events";
        let mut other = request("checkout");
        other.note = "annotation canary-injector.io/tag: \"feature/y\" is not a valid label value; using \"feature-y\"".into();
        sink.emit(request("checkout"));
        sink.emit(request("checkout"));
        sink.emit(other);
        let first = api.expect(Method::POST, path).await;
        let name = first.body["metadata"]["name"].as_str().unwrap().to_owned();
        let body = first.body.clone();
        first.respond(StatusCode::CREATED, &body);
        // The same note again: the series of the first Event.
        let repeat = api.expect(Method::PATCH, &format!("{path}/{name}")).await;
        assert_eq!(repeat.body["series"]["count"], 2);
        assert!(repeat.body["note"].as_str().unwrap().contains("feature-x"));
        let body = repeat.body.clone();
        repeat.respond(StatusCode::OK, &body);
        // Another note about the same object: an Event of its own, so
        // `kubectl describe` shows both.
        let second = api.expect(Method::POST, path).await;
        assert!(second.body["note"].as_str().unwrap().contains("feature-y"));
        assert_eq!(second.body["series"], Value::Null);
        let body = second.body.clone();
        second.respond(StatusCode::CREATED, &body);
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(count(&m, "published"), 3);
    }

    #[tokio::test]
    async fn an_event_in_a_terminating_namespace_is_dropped_quietly() {
        let (sink, mut api, m, shutdown, task) = publisher(8, Pace::default());
        sink.emit(request("checkout"));
        api.expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        )
        .await
        .fail(
            403,
            "Forbidden",
            "events.events.k8s.io \"checkout.1\" is forbidden: unable to create new content in \
             namespace shop because it is being terminated",
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(count(&m, "failed"), 0);
        assert_eq!(count(&m, "dropped"), 1);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (_, m) = metrics();
        let (sink, _queue) = EventSink::channel(2, m.clone());
        assert!(sink.emit(request("a")));
        assert!(sink.emit(request("b")));
        // Nobody drains the queue: the third is dropped at once.
        assert!(!sink.emit(request("c")));
        assert_eq!(count(&m, "dropped"), 1);
        assert!(!EventSink::disabled().emit(request("d")));
    }

    #[tokio::test]
    async fn a_refused_event_is_counted_and_the_next_one_still_goes_out() {
        let (sink, mut api, m, shutdown, task) = publisher(8, Pace::default());
        sink.emit(request("first"));
        sink.emit(request("second"));
        let path = "/apis/events.k8s.io/v1/namespaces/shop/events";
        api.expect(Method::POST, path).await.fail(
            403,
            "Forbidden",
            "events.events.k8s.io is forbidden: User cannot create resource",
        );
        let call = api.expect(Method::POST, path).await;
        assert_eq!(call.body["regarding"]["name"], "second");
        let body = call.body.clone();
        call.respond(StatusCode::CREATED, &body);
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(count(&m, "failed"), 1);
        assert_eq!(count(&m, "published"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn publishing_is_paced_after_the_burst() {
        let pace = Pace {
            per_second: 2,
            burst: 3,
        };
        let (sink, mut api, m, shutdown, task) = publisher(64, pace);
        for i in 0..7 {
            assert!(sink.emit(request(&format!("obj-{i}"))));
        }
        let start = Instant::now();
        for _ in 0..7 {
            let call = api.next().await;
            let body = call.body.clone();
            call.respond(StatusCode::CREATED, &body);
        }
        // 3 at once, then 4 more at 2/s: about 2 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(took <= Duration::from_millis(2600), "{took:?}");
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(count(&m, "published"), 7);
    }

    #[tokio::test]
    async fn a_publish_stuck_on_the_api_does_not_hold_up_shutdown() {
        let (sink, mut api, _m, shutdown, task) = publisher(8, Pace::default());
        sink.emit(request("stuck"));
        // The API server takes the request and never answers.
        let _held = api.next().await.park();
        shutdown.cancel();
        tokio::time::timeout(crate::testing::WAIT, task)
            .await
            .expect("the publisher stops at shutdown")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(800);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES);
        assert!(cut.ends_with("..."));
        assert_eq!(truncate("short"), "short");
    }
}
