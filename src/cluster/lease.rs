//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one
//! replica writes (the ConfigMap copier, the routes controller and the
//! backfill) while every replica keeps serving admission.
//!
//! The algorithm is client-go's `leaderelection`:
//! - a candidate reads the Lease every `retry_period`; it takes the Lease
//!   when it does not exist (create), has no holder, or its record has not
//!   changed for the holder's `leaseDurationSeconds` as measured on the
//!   candidate's own monotonic clock (so clock skew between nodes does not
//!   matter);
//! - every write is a replace carrying the `resourceVersion` read, so of two
//!   candidates only one wins (the other gets `409 Conflict`);
//! - the leader renews every `retry_period` and steps down when it has not
//!   renewed for `renew_deadline` (shorter than the lease duration, so it
//!   stops writing before anyone else may take over) or sees another holder;
//! - on shutdown the leader releases the Lease (holder cleared) once its
//!   writers have stopped, so a successor takes over at once instead of
//!   after the lease duration, and never while the old writers still write.
//!
//! Why not a crate: `kube-lease-manager` (the one that supports kube 5) keeps
//! reporting leadership while renewals fail, and expires leases by comparing
//! another node's `renewTime` with the local wall clock.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How to take part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Name of the Lease (in the webhook's namespace).
    pub name: String,
    /// This replica's identity, written as `holderIdentity` (the pod name).
    pub identity: String,
    /// How long a holder's claim is honoured without a renewal.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with client-go's proportions (15 s / 10 s / 2 s for a 15 s
    /// lease): renew deadline 2/3 of the duration, retry period 2/15.
    pub fn new(name: impl Into<String>, identity: impl Into<String>, duration: Duration) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            lease_duration: duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration * 2 / 15).max(Duration::from_millis(500)),
        }
    }
}

/// What a candidate last saw of the Lease, and when (its own clock).
#[derive(Debug, Clone)]
struct Observed {
    spec: LeaseSpec,
    resource_version: Option<String>,
    seen_at: Instant,
}

/// What to do after reading the Lease.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// No Lease yet: create it holding it.
    Create(Lease),
    /// Replace it (renew ours, or take an expired or free one).
    Replace(Lease),
    /// Another holder's claim is still valid.
    Wait { holder: String },
}

/// Decides the next write from the Lease read (`None`: it does not exist).
/// Pure: the clocks are arguments.
fn decide(
    current: Option<&Lease>,
    observed: &mut Option<Observed>,
    settings: &LeaseSettings,
    now: Instant,
    wall: Timestamp,
) -> Step {
    let duration_secs = i32::try_from(settings.lease_duration.as_secs())
        .unwrap_or(i32::MAX)
        .max(1);
    let Some(current) = current else {
        return Step::Create(Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(wall)),
                renew_time: Some(MicroTime(wall)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        });
    };
    let spec = current.spec.clone().unwrap_or_default();
    let rv = current.metadata.resource_version.clone();
    // The record counts as renewed when anything in it changed since we
    // last looked: then the holder's lease duration starts again from now.
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.spec != spec || o.resource_version != rv);
    if changed {
        *observed = Some(Observed {
            spec: spec.clone(),
            resource_version: rv.clone(),
            seen_at: now,
        });
    }
    let seen_at = observed.as_ref().map_or(now, |o| o.seen_at);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(settings.identity.as_str());
    if let Some(holder) = holder.clone()
        && !ours
    {
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(settings.lease_duration, Duration::from_secs);
        if now < seen_at + their_duration {
            return Step::Wait { holder };
        }
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    let next = LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(duration_secs),
        acquire_time: if ours {
            spec.acquire_time.clone()
        } else {
            Some(MicroTime(wall))
        },
        renew_time: Some(MicroTime(wall)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..spec
    };
    Step::Replace(Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            resource_version: rv,
            ..ObjectMeta::default()
        },
        spec: Some(next),
    })
}

/// Why one round with the Lease did not make us leader.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading or writing the Lease failed.
    #[error("lease API call failed: {0}")]
    Api(#[source] kube::Error),
    /// The round did not finish in time.
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

/// One replica's side of the election: reads and writes one Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
}

/// The outcome of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// We hold the Lease (acquired or renewed).
    Leading,
    /// Someone else holds it (or won the race to it).
    Following(Option<String>),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// An elector for the Lease `settings.name` in `api`'s namespace.
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Self {
            api,
            settings,
            observed: None,
        }
    }

    /// Reads the Lease and acquires or renews it if we may.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Round, LeaseError> {
        let current = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(LeaseError::Api)?;
        let step = decide(
            current.as_ref(),
            &mut self.observed,
            &self.settings,
            Instant::now(),
            Timestamp::now(),
        );
        let written = match step {
            Step::Wait { holder } => return Ok(Round::Following(Some(holder))),
            Step::Create(lease) => self.api.create(&PostParams::default(), &lease).await,
            Step::Replace(lease) => {
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = Some(Observed {
                    spec: lease.spec.unwrap_or_default(),
                    resource_version: lease.metadata.resource_version,
                    seen_at: Instant::now(),
                });
                Ok(Round::Leading)
            }
            // Someone else wrote first (or created it): not ours this round.
            Err(e) if is_conflict(&e) => {
                self.observed = None;
                Ok(Round::Following(None))
            }
            Err(e) => Err(LeaseError::Api(e)),
        }
    }

    /// Gives the Lease up if we still hold it: holder cleared, so the next
    /// candidate takes it at once. Never overwrites another holder's record.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(observed) = self.observed.take() else {
            return Ok(());
        };
        if observed.spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                resource_version: observed.resource_version,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..observed.spec
            }),
        };
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Changed since: it is no longer ours to release.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(LeaseError::Api(e)),
        }
    }
}

/// Runs the election until `shutdown`, publishing leadership on `leader`
/// (true while this replica leads). On shutdown `false` is published, and
/// once `writers_stopped` resolves (the writers of this term have finished
/// their last call) the Lease is released: a successor never writes while
/// this replica's writers still do. Writers that do not stop within the
/// lease duration keep the Lease (it then expires on its own). API errors
/// are logged and retried; they never end the task.
pub async fn run(
    mut elector: Elector,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
    writers_stopped: impl std::future::Future<Output = ()>,
) -> Result<(), crate::task::TaskError> {
    let retry = elector.settings.retry_period;
    let deadline = elector.settings.renew_deadline;
    let mut last_renewal: Option<Instant> = None;
    let mut errors_logged = false;
    loop {
        // A hung call must not keep a leader past its renew deadline: the
        // round gets what is left of it (a candidate, the whole deadline).
        let budget = match last_renewal {
            Some(t) if *leader.borrow() => deadline.saturating_sub(t.elapsed()),
            _ => deadline,
        };
        let round = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            round = tokio::time::timeout(budget, elector.try_acquire_or_renew()) => {
                round.unwrap_or(Err(LeaseError::Timeout(budget)))
            }
        };
        let now = Instant::now();
        match round {
            Ok(Round::Leading) => {
                errors_logged = false;
                last_renewal = Some(now);
                if !*leader.borrow() {
                    info!(lease = %elector.settings.name, identity = %elector.settings.identity, "became leader");
                    leader.send_replace(true);
                }
            }
            Ok(Round::Following(holder)) => {
                errors_logged = false;
                if *leader.borrow() {
                    warn!(lease = %elector.settings.name, holder = holder.as_deref().unwrap_or("-"), "lost the lease to another replica; stepping down");
                    leader.send_replace(false);
                    last_renewal = None;
                } else {
                    debug!(holder = holder.as_deref().unwrap_or("-"), "following");
                }
            }
            Err(error) => {
                if !errors_logged {
                    warn!(%error, lease = %elector.settings.name, "cannot read or write the lease; retrying");
                    errors_logged = true;
                }
            }
        }
        if *leader.borrow() && last_renewal.is_some_and(|t| now.duration_since(t) >= deadline) {
            warn!(lease = %elector.settings.name, "could not renew the lease in time; stepping down");
            leader.send_replace(false);
            last_renewal = None;
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(jittered(retry, &elector.settings.identity)) => {}
        }
    }
    let was_leader = leader.send_replace(false);
    if was_leader {
        let limit = elector.settings.lease_duration;
        if tokio::time::timeout(limit, writers_stopped).await.is_err() {
            warn!(lease = %elector.settings.name, "writers still running; the lease is kept until it expires");
            return Ok(());
        }
        match elector.release().await {
            Ok(()) => info!(lease = %elector.settings.name, "lease released"),
            Err(error) => warn!(%error, "cannot release the lease; it expires on its own"),
        }
    }
    Ok(())
}

/// `base` plus up to 20%, varied per identity and call, so replicas that
/// started together do not keep colliding.
fn jittered(base: Duration, identity: &str) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(identity.as_bytes());
    let fraction = (h.finish() % 1000) as u32;
    base + base / 5 * fraction / 1000
}

#[cfg(test)]
mod tests;
