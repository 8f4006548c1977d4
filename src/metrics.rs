//! Prometheus metrics, registered on a registry the caller owns (no global
//! state): the review path's [`Metrics`], the writers' [`ControllerMetrics`];
//! [`encode`] renders a scrape for the plain-HTTP `/metrics` listener
//! ([`crate::server::serve_metrics`]). Other modules register their own
//! (e.g. [`crate::cluster::events::EventMetrics`]) on the same registry.
//!
//! Label values are bounded: kinds admission does not act on (per
//! [`crate::mutate::KINDS`]) and operations outside a fixed set are reported
//! as `other`; controllers and reasons come from fixed lists; namespaces,
//! names, uids and error texts never appear.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Prefix of every metric name.
pub const NAMESPACE: &str = "canary_injector";

/// Latency buckets in seconds: sub-millisecond resolution where the webhook
/// lives, up to the apiserver's 5 s budget.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Every `reason` of `errors_total` the server reports: exported at 0 from
/// the start (so `rate()` sees the first one) and listed in docs/operations.md.
pub const ERROR_REASONS: [&str; 11] = [
    "not-found",
    "method",
    "content-type",
    "body-too-large",
    "body-timeout",
    "body-read",
    "body-budget",
    "connection-limit",
    "bad-request",
    "tls-handshake",
    "internal",
];

/// Handles to every metric. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    reviews: IntCounterVec,
    duration: HistogramVec,
    skips: IntCounterVec,
    bootstrap_skips: IntCounterVec,
    mutations: IntCounterVec,
    errors: IntCounterVec,
    tags_rewritten: IntCounter,
    /// Not-after of the serving certificate, unix seconds.
    pub certificate_expiry: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`. Names get the
    /// registry's prefix if it has one; build one with [`new_registry`].
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reviews = IntCounterVec::new(
            Opts::new(
                "admission_reviews_total",
                "Admission reviews answered, by kind, operation and outcome \
                 (patched, allowed, skipped, denied, invalid, error).",
            ),
            &["kind", "operation", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "admission_duration_seconds",
                "Time from request headers to response, by kind.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let skips = IntCounterVec::new(
            Opts::new("skips_total", "Objects left alone, by reason."),
            &["reason"],
        )?;
        let bootstrap_skips = IntCounterVec::new(
            Opts::new(
                "bootstrap_skips_total",
                "Pods whose sidecar keepalive was left alone (no template mount, no agent \
                 keepalive env), by reason.",
            ),
            &["reason"],
        )?;
        let mutations = IntCounterVec::new(
            Opts::new(
                "mutations_total",
                "Mutations applied, by type (labels, template-labels, \
                 bootstrap-annotations, bootstrap-volume, keepalive-proxy-config, \
                 keepalive-env).",
            ),
            &["type"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "errors_total",
                "Requests refused or failed before a review answer, by reason.",
            ),
            &["reason"],
        )?;
        for reason in ERROR_REASONS {
            errors.with_label_values(&[reason]);
        }
        let tags_rewritten = IntCounter::new(
            "tags_rewritten_total",
            "Canary tag annotations that were not valid label values and were rewritten, \
             once per object that carries the tag itself (at its CREATE, or an UPDATE that \
             changes a workload's tag), not for the ReplicaSets and Pods a controller creates \
             from its template; dry runs not counted.",
        )?;
        let certificate_expiry = IntGauge::new(
            "certificate_expiry_timestamp_seconds",
            "Not-after of the serving certificate in use, as a unix timestamp.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Build information; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(reviews.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(skips.clone()))?;
        registry.register(Box::new(bootstrap_skips.clone()))?;
        registry.register(Box::new(mutations.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(tags_rewritten.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        registry.register(Box::new(build_info))?;
        Ok(Self {
            reviews,
            duration,
            skips,
            bootstrap_skips,
            mutations,
            errors,
            tags_rewritten,
            certificate_expiry,
        })
    }

    /// Counts one answered review and its latency.
    pub fn review(&self, kind: &str, operation: &str, outcome: &str, seconds: f64) {
        let kind = bounded_kind(kind);
        self.reviews
            .with_label_values(&[kind, bounded_operation(operation), outcome])
            .inc();
        self.duration.with_label_values(&[kind]).observe(seconds);
    }

    /// Counts a skipped object.
    pub fn skip(&self, reason: &str) {
        self.skips.with_label_values(&[reason]).inc();
    }

    /// Counts a pod whose sidecar keepalive was left alone.
    pub fn bootstrap_skip(&self, reason: &str) {
        self.bootstrap_skips.with_label_values(&[reason]).inc();
    }

    /// Counts an applied mutation.
    pub fn mutation(&self, kind: &str) {
        self.mutations.with_label_values(&[kind]).inc();
    }

    /// Counts a failed or timed-out TLS handshake: in `errors_total`
    /// only, not as a review (a scanner or a health check speaking plain
    /// TCP is no failing admission review and must not trip its alert).
    pub fn tls_handshake_failed(&self) {
        self.errors.with_label_values(&["tls-handshake"]).inc();
    }

    /// Counts `n` rewritten canary tags.
    pub fn tags_rewritten(&self, n: u64) {
        self.tags_rewritten.inc_by(n);
    }

    /// Counts a request refused before a review answer (`reason` is one of a
    /// fixed set chosen by the server, [`ERROR_REASONS`]), also as an
    /// `invalid`/`error` review: a webhook configured with a wrong path
    /// (every call a 404) shows up as failing reviews.
    pub fn error(&self, reason: &'static str, server_fault: bool, seconds: f64) {
        debug_assert!(
            ERROR_REASONS.contains(&reason),
            "{reason} is missing from ERROR_REASONS (exported at 0 and documented)"
        );
        self.errors.with_label_values(&[reason]).inc();
        let outcome = if server_fault { "error" } else { "invalid" };
        self.review("", "", outcome, seconds);
    }
}

/// What every controller (writer) reports, labelled by `controller`: a
/// fixed set of names (`bootstrap-copier`, `routes`, `backfill`), never an
/// object's name. Cheap to clone.
#[derive(Clone)]
pub struct ControllerMetrics {
    applies: IntCounterVec,
    errors: IntCounterVec,
    /// 1 while this replica holds the Lease (runs the writers), else 0.
    pub leader: IntGauge,
    /// 1 while this replica has writers to run and so takes part in the
    /// leader election (with it off: runs them); 0 when no writing
    /// controller is enabled, so no leader is needed.
    pub leader_candidate: IntGauge,
}

impl ControllerMetrics {
    /// Creates and registers `reconcile_applies_total{controller}`,
    /// `reconcile_errors_total{controller,reason}`, `leader` and
    /// `leader_candidate`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let applies = IntCounterVec::new(
            Opts::new(
                "reconcile_applies_total",
                "Writes to the API server that succeeded, by controller.",
            ),
            &["controller"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Failed reconciles, by controller and reason.",
            ),
            &["controller", "reason"],
        )?;
        let leader = IntGauge::new(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers.",
        )?;
        registry.register(Box::new(applies.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let leader_candidate = IntGauge::new(
            "leader_candidate",
            "1 while this replica has controllers that write (routes, bootstrap copier, backfill) \
             and so takes part in the leader election; 0 when none is enabled and no leader is \
             needed.",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(leader_candidate.clone()))?;
        Ok(Self {
            applies,
            errors,
            leader,
            leader_candidate,
        })
    }

    /// Handles for one controller; every reason is exported at 0 from the
    /// start, so `rate()` sees the first error.
    pub fn controller(&self, name: &'static str, reasons: &[&'static str]) -> ControllerCounters {
        for reason in reasons {
            self.errors.with_label_values(&[name, reason]);
        }
        ControllerCounters {
            applies: self.applies.with_label_values(&[name]),
            errors: self.errors.clone(),
            name,
        }
    }
}

/// One controller's counters (see [`ControllerMetrics::controller`]).
#[derive(Clone)]
pub struct ControllerCounters {
    applies: IntCounter,
    errors: IntCounterVec,
    name: &'static str,
}

impl ControllerCounters {
    /// Counts a successful write.
    pub fn applied(&self) {
        self.applies.inc();
    }

    /// Counts a failed reconcile (`reason` from the controller's fixed set).
    pub fn error(&self, reason: &'static str) {
        self.errors.with_label_values(&[self.name, reason]).inc();
    }

    /// Successful writes so far.
    pub fn applies(&self) -> u64 {
        self.applies.get()
    }

    /// Errors with `reason` so far.
    pub fn errors(&self, reason: &str) -> u64 {
        self.errors.with_label_values(&[self.name, reason]).get()
    }
}

/// A registry whose metric names start with `canary_injector_`.
pub fn new_registry() -> Registry {
    Registry::new_custom(Some(NAMESPACE.into()), None).expect("static prefix is valid")
}

/// Renders `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec cannot fail for well-formed metric families.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    buf
}

/// The kinds admission acts on, by name (from the kinds table); else
/// `unknown` or `other`.
fn bounded_kind(kind: &str) -> &'static str {
    crate::mutate::Kind::metric_label(kind)
}

fn bounded_operation(op: &str) -> &'static str {
    match op {
        "CREATE" => "CREATE",
        "UPDATE" => "UPDATE",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "" => "unknown",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_labels_bounded() {
        let registry = new_registry();
        let m = Metrics::register(&registry).unwrap();
        m.review("Pod", "CREATE", "patched", 0.0002);
        m.review("EvilKind-1234", "HACK", "allowed", 0.0002);
        m.skip("namespace");
        m.error("body-too-large", false, 0.0);
        let text = String::from_utf8(encode(&registry)).unwrap();
        assert!(text.contains(
            r#"canary_injector_admission_reviews_total{kind="Pod",operation="CREATE",outcome="patched"} 1"#
        ), "{text}");
        assert!(text.contains(r#"kind="other",operation="other""#), "{text}");
        assert!(!text.contains("EvilKind"));
        assert!(text.contains(r#"canary_injector_skips_total{reason="namespace"} 1"#));
        assert!(text.contains(r#"canary_injector_errors_total{reason="body-too-large"} 1"#));
        assert!(text.contains(r#"outcome="invalid"} 1"#));
        assert!(text.contains(
            r#"canary_injector_admission_duration_seconds_bucket{kind="Pod",le="0.00025"} 1"#
        ));
        assert!(text.contains("canary_injector_build_info{version="));
    }

    #[test]
    fn controller_counters_carry_the_controller_label() {
        let registry = new_registry();
        let m = ControllerMetrics::register(&registry).unwrap();
        let copier = m.controller("bootstrap-copier", &["apply", "source-missing"]);
        copier.applied();
        copier.error("apply");
        let text = String::from_utf8(encode(&registry)).unwrap();
        assert!(text.contains("canary_injector_leader 0"), "{text}");
        assert!(
            text.contains("canary_injector_leader_candidate 0"),
            "{text}"
        );
        m.leader.set(1);
        let text = String::from_utf8(encode(&registry)).unwrap();
        assert!(
            text.contains(
                r#"canary_injector_reconcile_applies_total{controller="bootstrap-copier"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"canary_injector_reconcile_errors_total{controller="bootstrap-copier",reason="apply"} 1"#
        ));
        assert!(text.contains(
            r#"canary_injector_reconcile_errors_total{controller="bootstrap-copier",reason="source-missing"} 0"#
        ));
        assert!(text.contains("canary_injector_leader 1"));
        assert_eq!(copier.applies(), 1);
        assert_eq!(copier.errors("apply"), 1);
    }

    #[test]
    fn registering_twice_on_one_registry_fails_cleanly() {
        let registry = new_registry();
        Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err());
    }
}
