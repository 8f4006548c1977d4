//! Named, supervised tasks. Every task is expected to run until it is told
//! to stop; one that ends on its own (returns, fails or panics) is reported
//! with its name, so the process stops with a clear message instead of
//! running on without, say, certificate rotation.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

use crate::task::TaskError;

/// How a task ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskExit {
    /// Returned `Ok(())` although nobody asked it to stop.
    #[error("ended unexpectedly")]
    Returned,
    /// Returned an error.
    #[error("failed: {0}")]
    Failed(#[source] TaskError),
    /// Panicked.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// A task that ended, and how.
#[derive(Debug, thiserror::Error)]
#[error("task {name} {exit}")]
pub struct Ended {
    /// The name given at [`Supervisor::spawn`].
    pub name: &'static str,
    /// How it ended.
    #[source]
    pub exit: TaskExit,
}

/// A set of named tasks; see the module docs.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<Result<(), TaskError>>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` under `name`. It must run until its own stop signal (a
    /// cancellation token it was given); ending earlier is reported by
    /// [`Supervisor::next_ended`].
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The names of the tasks still running, sorted.
    pub fn running(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }

    /// Waits for the next task to end and says which and how. Pending
    /// forever when no task runs (so it can sit in a `select!`).
    pub async fn next_ended(&mut self) -> Ended {
        loop {
            let Some(joined) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, exit) = match joined {
                Ok((id, Ok(()))) => (id, TaskExit::Returned),
                Ok((id, Err(e))) => (id, TaskExit::Failed(e)),
                Err(e) if e.is_panic() => (e.id(), TaskExit::Panicked(panic_text(e.into_panic()))),
                // Only `abort`, which nothing here calls.
                Err(_) => continue,
            };
            let name = self.names.remove(&id).unwrap_or("unknown");
            return Ended { name, exit };
        }
    }

    /// Waits up to `limit` for the tasks called `names` to end (after their
    /// stop signals were given); returns those still running. Other tasks
    /// that end meanwhile are reaped too.
    pub async fn wait_for(&mut self, names: &[&str], limit: Duration) -> Vec<&'static str> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let pending: Vec<_> = self
                .running()
                .into_iter()
                .filter(|n| names.contains(n))
                .collect();
            if pending.is_empty() {
                return pending;
            }
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((id, _)))) => {
                    self.names.remove(&id);
                }
                Ok(Some(Err(e))) => {
                    self.names.remove(&e.id());
                }
                Ok(None) => return Vec::new(),
                Err(_) => return pending,
            }
        }
    }

    /// Waits up to `limit` for every task to end (after their stop signals
    /// were given); aborts the rest and returns their names.
    pub async fn join_all(mut self, limit: Duration) -> Vec<&'static str> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((id, _)))) => {
                    self.names.remove(&id);
                }
                Ok(Some(Err(e))) => {
                    self.names.remove(&e.id());
                }
                Ok(None) => break,
                Err(_) => {
                    let stuck = self.running();
                    self.tasks.abort_all();
                    return stuck;
                }
            }
        }
        Vec::new()
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name() {
        let mut s = Supervisor::new();
        let stop = CancellationToken::new();
        let token = stop.clone();
        s.spawn("quiet", async move {
            token.cancelled().await;
            Ok(())
        });
        s.spawn("cert-reloader", async { panic!("boom") });
        let ended = s.next_ended().await;
        assert_eq!(ended.name, "cert-reloader");
        assert!(matches!(&ended.exit, TaskExit::Panicked(m) if m == "boom"));
        assert_eq!(ended.to_string(), "task cert-reloader panicked: boom");
        assert_eq!(s.running(), vec!["quiet"]);
        stop.cancel();
        assert!(s.join_all(Duration::from_secs(5)).await.is_empty());
    }

    #[tokio::test]
    async fn failing_and_returning_tasks_say_how_they_ended() {
        let mut s = Supervisor::new();
        s.spawn("watch", async { Err("apiserver gone".into()) });
        let ended = s.next_ended().await;
        assert_eq!(ended.to_string(), "task watch failed: apiserver gone");
        s.spawn("metrics", async { Ok(()) });
        let ended = s.next_ended().await;
        assert_eq!(ended.name, "metrics");
        assert!(matches!(ended.exit, TaskExit::Returned));
    }

    #[tokio::test(start_paused = true)]
    async fn join_all_aborts_and_names_tasks_that_do_not_stop() {
        let mut s = Supervisor::new();
        s.spawn("stuck", std::future::pending());
        s.spawn("done", async { Ok(()) });
        let stuck = s.join_all(Duration::from_secs(1)).await;
        assert_eq!(stuck, vec!["stuck"]);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_waits_only_for_the_named_tasks() {
        let mut s = Supervisor::new();
        let (first, rest) = (CancellationToken::new(), CancellationToken::new());
        for (name, token) in [
            ("webhook-server", first.clone()),
            ("metrics-server", rest.clone()),
        ] {
            s.spawn(name, async move {
                token.cancelled().await;
                Ok(())
            });
        }
        first.cancel();
        assert!(
            s.wait_for(&["webhook-server"], Duration::from_secs(1))
                .await
                .is_empty()
        );
        assert_eq!(s.running(), vec!["metrics-server"]);
        let late = s
            .wait_for(&["metrics-server"], Duration::from_secs(1))
            .await;
        assert_eq!(late, vec!["metrics-server"]);
        rest.cancel();
        assert!(s.join_all(Duration::from_secs(1)).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_tasks_next_ended_waits() {
        let mut s = Supervisor::new();
        let waited = tokio::time::timeout(Duration::from_secs(60), s.next_ended()).await;
        assert!(waited.is_err());
    }
}
