//! canary-injector: a Kubernetes mutating admission webhook that gives Pods
//! and ReplicaSets the `canarytag` / `stage` labels Istio canary routing
//! selects on, and gives Istio sidecars a keepalive that notices a dead
//! istiod within ~45 s, in the form their version understands (a patched
//! Envoy bootstrap template below 1.8, the agent's gRPC keepalive env from
//! 1.18).
//!
//! ```text
//!                 +------------------------------ adapters ------------------------------+
//!   apiserver --> | server (hyper+rustls) --> admission (review JSON) --+                 |
//!   kubectl   --> | offline (`mutate -f` YAML) ------------------------+--> mutate        |
//!                 |                                                    |    (pure core)   |
//!                 | copier  (ConfigMap cache: every replica;           |                  |
//!                 |          copies: leader only) ----------------------+                  |
//!                 | routes::controller (leader only; DestinationRules, |                  |
//!                 |          VirtualServices) --------------------------+--> routes (pure) |
//!                 | istio   (injector version: every replica) ---------+                  |
//!                 | backfill (leader: labels what predates it) --------+                  |
//!                 | cluster (kube client, lease, shared watches, events)                  |
//!                 | app     (serve's supervised tasks)  metrics  config  certs            |
//!                 +-----------------------------------------------------------------------+
//!   envoy_template (pure): the bootstrap template scanner and patcher
//! ```
//! Adapters depend on the pure core ([`mutate`], [`envoy_template`], the
//! computation in [`routes`]), never the reverse; the core does no I/O.
//! [`app`] wires the adapters for `serve`; the binary's `cli/` only parses
//! flags and calls it.

pub mod admission;
pub mod app;
pub mod backfill;
pub mod certs;
pub mod check;
pub mod cluster;
pub mod config;
pub mod copier;
pub mod duration;
pub mod envoy_template;
pub mod istio;
pub mod metrics;
pub mod mutate;
pub mod offline;
pub mod routes;
pub mod server;

#[cfg(test)]
mod testing;
