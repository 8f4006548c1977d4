//! Access to the Kubernetes API: one client, leader election, shared
//! watches and the event sink. Adapters only; the decisions they act on
//! live in pure modules ([`crate::mutate`], [`crate::copier::desired_copy`]).
//!
//! ```text
//!  every replica:  caches the review path reads (bootstrap ConfigMaps)
//!  leader only:    writers (the ConfigMap copier, the routes controller, the backfill),
//!                  started by [`while_leading`] when [`lease`] says so,
//!                  cancelled when leadership is lost, sharing the watches
//!                  of one leadership term ([`watches::Shared`])
//! ```

pub mod events;
pub mod lease;
pub mod watches;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::task::TaskError;

/// The one kube client and what every controller needs to know about where
/// it runs. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    /// The client (in-cluster service account, else kubeconfig).
    pub client: kube::Client,
    /// The webhook's own namespace (Lease, source ConfigMap).
    pub namespace: String,
    /// This replica's name: the Lease holder identity and the Events'
    /// reporting instance.
    pub identity: String,
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No kubeconfig and not in a cluster, or the config is unusable.
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Outside a cluster the API server refused `GET /version`, or could
    /// not be reached.
    #[error("the Kubernetes API did not answer GET /version: {0}")]
    Unreachable(#[source] kube::Error),
    /// Outside a cluster the API server did not answer `GET /version`.
    #[error("no answer from the Kubernetes API within {0:?}")]
    Timeout(Duration),
}

/// A client for the cluster (in-cluster service account, else kubeconfig),
/// for `serve` and the subcommands that talk to the API (`check`, `certs
/// --secret`). In a cluster the API is there (and the watches retry on
/// their own), so no probe; elsewhere the API must answer `GET /version`
/// within `limit`: a laptop without a cluster then runs without one, and a
/// command fails at once with a reason instead of hanging on an address
/// that does not answer.
pub async fn connect(limit: Duration) -> Result<kube::Client, ConnectError> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    tokio::time::timeout(limit, async {
        let client = kube::Client::try_default()
            .await
            .map_err(ConnectError::Client)?;
        if !in_cluster {
            client
                .apiserver_version()
                .await
                .map_err(ConnectError::Unreachable)?;
        }
        Ok::<_, ConnectError>(client)
    })
    .await
    .map_err(|_| ConnectError::Timeout(limit))?
}

/// This replica's identity: `$POD_NAME` (downward API), else `$HOSTNAME`
/// (the pod name in Kubernetes), else the process id.
pub fn identity() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| format!("canary-injector-{}", std::process::id()))
}

/// How long writers may take to stop once leadership is lost or at shutdown.
const WRITERS_STOP_LIMIT: Duration = Duration::from_secs(10);

/// Runs the writers only while this replica leads: `start` is called with a
/// fresh token each time leadership is gained; the token is cancelled and the
/// writers awaited when it is lost, and for good at `shutdown`. Writers must
/// run until their token is cancelled; ending earlier is an error (the
/// supervisor stops the process).
pub async fn while_leading<F, Fut>(
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
    mut start: F,
) -> Result<(), TaskError>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let elected = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            elected = leader.wait_for(|l| *l) => elected.is_ok(),
        };
        if !elected {
            // The election ended: only at shutdown.
            shutdown.cancelled().await;
            return Ok(());
        }
        let term = shutdown.child_token();
        let writers = start(term.clone());
        tokio::pin!(writers);
        info!("leading: writers started");
        // Biased: at shutdown the writers' token (a child) ends them in the
        // same instant, which is not "ending on their own".
        let lost = tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            lost = leader.wait_for(|l| !*l) => lost.is_ok(),
            () = &mut writers => return Err("writers ended on their own".into()),
        };
        term.cancel();
        if tokio::time::timeout(WRITERS_STOP_LIMIT, writers)
            .await
            .is_err()
        {
            warn!("writers did not stop in time");
        }
        if !lost {
            return Ok(());
        }
        info!("no longer leading: writers stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn writers_run_only_while_leading_and_stop_at_shutdown() {
        let (tx, rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let running = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (r, s) = (running.clone(), started.clone());
        let gate = tokio::spawn(while_leading(rx, shutdown.clone(), move |term| {
            let (r, s) = (r.clone(), s.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                r.fetch_add(1, Ordering::SeqCst);
                term.cancelled().await;
                r.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        let settle = || tokio::time::sleep(Duration::from_millis(10));
        settle().await;
        assert_eq!(running.load(Ordering::SeqCst), 0, "not leader yet");
        tx.send_replace(true);
        settle().await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        tx.send_replace(false);
        settle().await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "stopped on losing the lease"
        );
        tx.send_replace(true);
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "a new term starts them again"
        );
        shutdown.cancel();
        gate.await.unwrap().unwrap();
        assert_eq!(running.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn writers_that_end_on_their_own_are_an_error() {
        let (_tx, rx) = watch::channel(true);
        let result = while_leading(rx, CancellationToken::new(), |_| async {}).await;
        assert!(result.is_err());
    }
}
