//! canary-injector: a Kubernetes mutating admission webhook that gives Pods
//! and ReplicaSets the `canarytag` / `stage` labels Istio canary routing
//! selects on.
//!
//! ```text
//!            +-------------------- adapters --------------------+
//!  apiserver | server (hyper+rustls) -> admission (JSON) --+    |
//!  kubectl   | offline (YAML docs) ---------------------------+--> mutate (pure core)
//!            | metrics, config, certs                            |
//!            +--------------------------------------------------+
//! ```
//! Adapters depend on the core ([`mutate`]), never the reverse.

pub mod admission;
pub mod certs;
pub mod config;
pub mod duration;
pub mod envoy_template;
pub mod metrics;
pub mod mutate;
pub mod offline;
pub mod reconcile;
pub mod server;
