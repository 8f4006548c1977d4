//! The election against the in-memory apiserver of [`crate::testing`]
//! (create, read and replace with `resourceVersion` preconditions, as the
//! real one does), with tokio's clock paused so lease durations pass
//! instantly and exactly.

use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::testing::FakeApiServer;

const NS: &str = "canary-injector";
const NAME: &str = "canary-injector";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/canary-injector/leases/canary-injector";

fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings::new(NAME, identity, Duration::from_secs(15))
}

// === decide ===

fn lease(holder: Option<&str>, rv: &str, transitions: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(Into::into),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}

fn spec_of(step: &Step) -> &LeaseSpec {
    match step {
        Step::Create(l) | Step::Replace(l) => l.spec.as_ref().unwrap(),
        Step::Wait { .. } => panic!("no write: {step:?}"),
    }
}

#[test]
fn a_missing_lease_is_created_held_by_us() {
    let s = settings("pod-a");
    let step = decide(None, &mut None, &s, Instant::now(), Timestamp::now());
    assert!(matches!(step, Step::Create(_)));
    let spec = spec_of(&step);
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));
}

#[test]
fn another_holder_is_waited_for_until_its_record_stops_changing_for_its_duration() {
    let s = settings("pod-a");
    let mut observed = None;
    let t0 = Instant::now();
    let wall = Timestamp::now();
    let held = lease(Some("pod-b"), "10", 3);
    let wait = Step::Wait {
        holder: "pod-b".into(),
    };
    assert_eq!(decide(Some(&held), &mut observed, &s, t0, wall), wait);
    let t14 = t0 + Duration::from_secs(14);
    assert_eq!(decide(Some(&held), &mut observed, &s, t14, wall), wait);
    // The holder renews (new resourceVersion): its 15 s start again.
    let renewed = lease(Some("pod-b"), "11", 3);
    assert_eq!(decide(Some(&renewed), &mut observed, &s, t14, wall), wait);
    let t28 = t0 + Duration::from_secs(28);
    assert_eq!(decide(Some(&renewed), &mut observed, &s, t28, wall), wait);
    // Unchanged for 15 s on our clock: expired, taken with a precondition.
    let t29 = t14 + Duration::from_secs(15);
    let step = decide(Some(&renewed), &mut observed, &s, t29, wall);
    let Step::Replace(taken) = &step else {
        panic!("{step:?}")
    };
    assert_eq!(taken.metadata.resource_version.as_deref(), Some("11"));
    let spec = spec_of(&step);
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_transitions, Some(4));
    assert_eq!(spec.acquire_time, Some(MicroTime(wall)));
}

#[test]
fn renewing_keeps_acquire_time_and_transitions() {
    let s = settings("pod-a");
    let ours = lease(Some("pod-a"), "7", 2);
    let wall = Timestamp::now();
    let step = decide(Some(&ours), &mut None, &s, Instant::now(), wall);
    let spec = spec_of(&step);
    assert_eq!(spec.lease_transitions, Some(2));
    assert_eq!(spec.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
    assert_eq!(spec.renew_time, Some(MicroTime(wall)));
}

#[test]
fn a_released_lease_is_taken_at_once() {
    let s = settings("pod-a");
    for holder in [None, Some("")] {
        let free = lease(holder, "9", 1);
        let step = decide(Some(&free), &mut None, &s, Instant::now(), Timestamp::now());
        assert_eq!(spec_of(&step).holder_identity.as_deref(), Some("pod-a"));
        assert_eq!(spec_of(&step).lease_transitions, Some(2));
    }
}

#[test]
fn settings_follow_client_go_proportions() {
    let s = settings("x");
    assert_eq!(s.renew_deadline, Duration::from_secs(10));
    assert_eq!(s.retry_period, Duration::from_secs(2));
}

// === against the in-memory apiserver ===

fn holder(lease: &Value) -> String {
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or("-")
        .to_owned()
}

struct Candidate {
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::task::TaskError>>,
}

fn start(identity: &str, world: &FakeApiServer) -> Candidate {
    let (client, _served) = world.client();
    let elector = Elector::new(Api::namespaced(client, NS), settings(identity));
    let (tx, leader) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(elector, tx, shutdown.clone(), std::future::ready(())));
    Candidate {
        leader,
        shutdown,
        task,
    }
}

impl Candidate {
    async fn becomes(&mut self, leading: bool) {
        tokio::time::timeout(
            Duration::from_secs(120),
            self.leader.wait_for(|l| *l == leading),
        )
        .await
        .unwrap_or_else(|_| panic!("never became leader={leading}"))
        .unwrap();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        assert!(!*self.leader.borrow(), "false is published at shutdown");
    }
}

fn stored(world: &FakeApiServer) -> Value {
    world.get(LEASE).expect("a lease exists")
}

/// Writes the Lease as another replica would (holder `who`, renewed now).
fn write_as(world: &FakeApiServer, who: &str) {
    world.put(
        LEASE,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": who, "leaseDurationSeconds": 15, "leaseTransitions": 5,
                     "renewTime": Timestamp::now().to_string()},
        }),
    );
}

/// The calls so far as (method, holder in the body or "-").
fn calls(world: &FakeApiServer) -> Vec<(Method, String)> {
    world
        .seen()
        .into_iter()
        .map(|c| (c.method, holder(&c.body)))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn acquires_a_missing_lease_then_renews_it() {
    let world = FakeApiServer::default();
    let mut a = start("pod-a", &world);
    a.becomes(true).await;
    let first = stored(&world);
    assert_eq!(holder(&first), "pod-a");
    assert_eq!(first["spec"]["leaseTransitions"], 0);
    // Two retry periods later it has renewed: same acquireTime, later renewTime.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let renewed = stored(&world);
    assert_eq!(holder(&renewed), "pod-a");
    assert_eq!(renewed["spec"]["acquireTime"], first["spec"]["acquireTime"]);
    assert_ne!(
        renewed["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );
    let calls = calls(&world);
    assert_eq!(calls[0].0, Method::GET);
    assert_eq!(calls[1], (Method::POST, "pod-a".into()));
    assert!(
        calls
            .iter()
            .skip(2)
            .any(|c| *c == (Method::PUT, "pod-a".into()))
    );
    assert!(*a.leader.borrow());
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waits_while_another_replica_renews_and_takes_over_when_it_stops() {
    let world = FakeApiServer::default();
    write_as(&world, "pod-b");
    let mut a = start("pod-a", &world);
    // pod-b keeps renewing for a minute: pod-a never leads meanwhile.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !*a.leader.borrow(),
            "pod-a must not lead while pod-b renews"
        );
        write_as(&world, "pod-b");
    }
    let stopped_at = Instant::now();
    a.becomes(true).await;
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(15),
        "took over after {:?}, before pod-b's lease could expire",
        stopped_at.elapsed()
    );
    let taken = stored(&world);
    assert_eq!(holder(&taken), "pod-a");
    assert_eq!(taken["spec"]["leaseTransitions"], 6);
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn steps_down_when_another_replica_holds_the_lease() {
    let world = FakeApiServer::default();
    let mut a = start("pod-a", &world);
    a.becomes(true).await;
    write_as(&world, "pod-b");
    a.becomes(false).await;
    // It does not write over pod-b's fresh record.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&stored(&world)), "pod-b");
    a.stop().await;
    assert_eq!(
        holder(&stored(&world)),
        "pod-b",
        "release never clears another holder"
    );
}

#[tokio::test(start_paused = true)]
async fn steps_down_when_it_cannot_renew_before_the_deadline() {
    let world = FakeApiServer::default();
    let mut a = start("pod-a", &world);
    a.becomes(true).await;
    let lost_at = Instant::now();
    world.outage(Some(500));
    a.becomes(false).await;
    let after = lost_at.elapsed();
    // Stepped down within the renew deadline (10 s) plus one retry period,
    // so before a successor may take over (15 s after the last renewal).
    assert!(
        after <= Duration::from_secs(13),
        "stepped down after {after:?}"
    );
    // The API recovers; nobody else took the lease: it leads again.
    world.outage(None);
    a.becomes(true).await;
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn releases_the_lease_on_shutdown_so_a_successor_takes_over_at_once() {
    let world = FakeApiServer::default();
    let mut a = start("pod-a", &world);
    a.becomes(true).await;
    let mut b = start("pod-b", &world);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!*b.leader.borrow());
    a.stop().await;
    let released = stored(&world);
    assert!(released["spec"]["holderIdentity"].is_null(), "{released}");
    let handover = Instant::now();
    b.becomes(true).await;
    assert!(
        handover.elapsed() < Duration::from_secs(5),
        "{:?}",
        handover.elapsed()
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_released_only_after_the_writers_stopped() {
    let world = FakeApiServer::default();
    let (client, _served) = world.client();
    let elector = Elector::new(Api::namespaced(client, NS), settings("pod-a"));
    let (tx, mut leader) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(elector, tx, shutdown.clone(), async {
        let _ = stopped_rx.await;
    }));
    leader.wait_for(|l| *l).await.unwrap();
    shutdown.cancel();
    leader.wait_for(|l| !*l).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stored(&world)["spec"]["holderIdentity"],
        "pod-a",
        "held while the writers still run"
    );
    assert!(!task.is_finished());
    stopped_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(stored(&world)["spec"]["holderIdentity"].is_null());
}

#[tokio::test(start_paused = true)]
async fn writers_that_never_stop_keep_the_lease_until_it_expires() {
    let world = FakeApiServer::default();
    let (client, _served) = world.client();
    let elector = Elector::new(Api::namespaced(client, NS), settings("pod-a"));
    let (tx, mut leader) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(elector, tx, shutdown.clone(), std::future::pending()));
    leader.wait_for(|l| *l).await.unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(stored(&world)["spec"]["holderIdentity"], "pod-a");
}

#[tokio::test(start_paused = true)]
async fn two_candidates_never_lead_at_the_same_time() {
    let world = FakeApiServer::default();
    let a = start("pod-a", &world);
    let b = start("pod-b", &world);
    let mut leaders = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let both = *a.leader.borrow() && *b.leader.borrow();
        assert!(!both, "two leaders at once");
        if *a.leader.borrow() {
            leaders.push("pod-a");
        } else if *b.leader.borrow() {
            leaders.push("pod-b");
        }
    }
    assert!(!leaders.is_empty(), "somebody leads");
    leaders.dedup();
    assert_eq!(leaders.len(), 1, "leadership is stable: {leaders:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_follower_writes_nothing_on_shutdown() {
    let world = FakeApiServer::default();
    write_as(&world, "pod-b");
    let a = start("pod-a", &world);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.stop().await;
    let calls = calls(&world);
    assert!(calls.iter().all(|(m, _)| *m == Method::GET), "{calls:?}");
}
