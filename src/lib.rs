//! canary-injector: a Kubernetes mutating admission webhook that gives Pods
//! and ReplicaSets the `canarytag` / `stage` labels Istio canary routing
//! selects on, and gives Istio sidecars a keepalive that notices a dead
//! istiod within ~45 s, in the form their version understands (a patched
//! Envoy bootstrap template below 1.8, the agent's gRPC keepalive env from
//! 1.18).
//!
//! ```text
//!  pure core (no I/O)                     adapters (I/O), which call it
//!  ------------------                     ---------------------------------------------
//!  mutate: labels, kinds, policy,   <---  admission (review JSON) <-- server (hyper+rustls)
//!    bootstrap/keepalive decision   <---  offline (`mutate -f`)
//!  routes: live tags, subsets,      <---  routes::controller (leader), routes::offline
//!    routes, make-before-break plan
//!  backfill::plan                   <---  backfill (leader: labels what predates the webhook)
//!  check, check::routing            <---  check::cluster (reads a cluster), check::manifests (-f)
//!  certs::plan, certs::ca           <---  certs (files, Secrets, caBundle)
//!  envoy_template                   <---  cli bootstrap-template
//!  policy: the native admission     <---  cli policy, check (compares the cluster's)
//!    policy, from the same config
//!                                         copier (ConfigMap cache: every replica; copies: leader)
//!                                         istio (injector version: every replica)
//!                                         cluster (client, Lease, shared watches, events)
//!                                         app (serve's supervised tasks), metrics, config
//!  duration: Go durations (checked)  <--- server (`?timeout=`), certs (`--validity`)
//!  limits: the server's limits       <--- server (enforces), config (reads `server:`)
//!  task: a long-running task's error <--- cluster, copier, istio, owners, app (runs them)
//! ```
//! Adapters depend on the pure core, never the reverse, and no import goes
//! round in a circle: what several modules share lives in the lowest of them
//! (`tests/layering.rs` checks both). [`app`] wires the adapters for `serve`
//! and nothing below it imports it; the binary's `cli/` only parses flags
//! and calls the library.

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
pub mod limits;
pub mod metrics;
pub mod mutate;
pub mod offline;
pub mod owners;
pub mod policy;
pub mod routes;
pub mod server;
pub mod task;

#[cfg(test)]
mod testing;
