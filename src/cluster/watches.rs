//! Shared watches: one watch per kind, fanned out to every controller that
//! needs it (kube-runtime's shared reflectors), instead of one watch per
//! controller. The leader's writers of one leadership term share them.
//!
//! Every subscriber must keep reading its stream: the fan-out buffer is
//! bounded, and a subscriber that stops reading stalls the watch for all.
//! Dropping a subscriber is fine.

use std::fmt::Debug;
use std::hash::Hash;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::task::TaskError;

/// Events buffered per subscriber before the watch waits for it.
const BUFFER: usize = 256;

/// A watch of one kind whose objects are kept in a [`Store`] and fanned out
/// to subscribers. Create it, take [`Shared::store`] and
/// [`Shared::subscribe`] handles, then [`Shared::run`] it.
pub struct Shared<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    writer: Writer<K>,
}

impl<K> Shared<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    /// A watch not yet started.
    pub fn new() -> Self {
        let (_, writer) = reflector::store_shared(BUFFER);
        Self { writer }
    }

    /// A read handle on the objects (complete once the first list is done:
    /// see [`Store::wait_until_ready`]).
    pub fn store(&self) -> Store<K> {
        self.writer.as_reader()
    }

    /// A stream of changed objects for one controller
    /// (`Controller::for_shared_stream`).
    pub fn subscribe(&self) -> ReflectHandle<K> {
        self.writer
            .subscribe()
            .expect("a shared writer always has a dispatcher")
    }

    /// Watches `api` with `config` until `shutdown`, filling the store and
    /// feeding subscribers. Errors (apiserver down, RBAC) are retried with
    /// backoff and logged; they never end the task.
    pub async fn run(
        self,
        api: Api<K>,
        config: watcher::Config,
        name: &'static str,
        shutdown: CancellationToken,
    ) -> Result<(), TaskError> {
        self.run_stream(watcher(api, config), name, shutdown).await
    }

    /// Like [`Shared::run`], for any watcher stream (e.g.
    /// `kube::runtime::metadata_watcher` for a `Shared<PartialObjectMeta<Pod>>`,
    /// which caches metadata only).
    pub async fn run_stream<S>(
        self,
        events: S,
        name: &'static str,
        shutdown: CancellationToken,
    ) -> Result<(), TaskError>
    where
        S: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
    {
        let stream = events
            .default_backoff()
            .modify(|o| {
                // Never read; keeps the cache small.
                o.meta_mut().managed_fields = None;
            })
            .reflect_shared(self.writer);
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            match event {
                None => break,
                Some(Ok(watcher::Event::InitDone)) => {
                    if failing {
                        info!(watch = name, "watch recovered");
                    }
                    failing = false;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    if !failing {
                        warn!(watch = name, %error, "watch failed; retrying with backoff");
                    }
                    failing = true;
                }
            }
        }
        debug!(watch = name, "watch stopped");
        Ok(())
    }
}

impl<K> Default for Shared<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn default() -> Self {
        Self::new()
    }
}
