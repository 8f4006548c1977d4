//! Metric label values as users meet them: every reason and type code is
//! kebab-case, documented in docs/operations.md, and the only kind the alerts,
//! dashboard and docs use; the 404 a misconfigured webhook path gets is
//! counted.

mod common;

use std::collections::BTreeSet;

use canary_injector::backfill::BackfillError;
use canary_injector::backfill::plan::Restart;
use canary_injector::config::Config;
use canary_injector::copier::CopyError;
use canary_injector::metrics::ERROR_REASONS;
use canary_injector::mutate::{BootstrapOutcome, BootstrapSkip, SkipReason, Warning};
use canary_injector::routes::controller::{RouteError, RouteMetrics};
use common::{Client, start};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every label value code, by the metric (or place) it belongs to.
fn codes() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "canary_injector_skips_total",
            SkipReason::ALL.iter().map(|r| r.as_str()).collect(),
        ),
        (
            "canary_injector_bootstrap_skips_total",
            BootstrapSkip::ALL.iter().map(|r| r.as_str()).collect(),
        ),
        ("canary_injector_errors_total", ERROR_REASONS.to_vec()),
        (
            "canary_injector_mutations_total",
            ["labels", "template-labels", "template-tag"]
                .into_iter()
                .chain(
                    [
                        BootstrapOutcome::Annotated,
                        BootstrapOutcome::Mounted,
                        BootstrapOutcome::ProxyConfig,
                        BootstrapOutcome::Env,
                    ]
                    .into_iter()
                    .filter_map(BootstrapOutcome::mutation),
                )
                .collect(),
        ),
        (
            "canary_injector_reconcile_errors_total",
            CopyError::REASONS
                .into_iter()
                .chain(RouteError::REASONS)
                .chain(BackfillError::REASONS)
                .collect(),
        ),
        (
            "canary_injector_routes_services",
            RouteMetrics::STATES.to_vec(),
        ),
        (
            "canary_injector_routes_changes_total",
            RouteMetrics::CHANGES.to_vec(),
        ),
        (
            "canary_injector_routes_watch_errors_total",
            RouteMetrics::WATCHES.to_vec(),
        ),
        (
            "canary_injector_backfill_restart_for_bootstrap_total",
            Restart::ALL.iter().map(|r| r.as_str()).collect(),
        ),
        ("warnings", Warning::REASONS.to_vec()),
    ]
}

fn kebab(code: &str) -> bool {
    !code.is_empty()
        && code
            .split('-')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Every page under docs/, as paths relative to the crate root.
fn doc_pages() -> Vec<String> {
    let mut pages: Vec<String> = std::fs::read_dir(format!("{ROOT}/docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 10, "docs/ has only {pages:?}");
    pages
}

/// The metrics table of docs/operations.md lists every code in its metric's row.
#[test]
fn every_code_is_kebab_case_and_in_the_docs_metrics_table() {
    let page = read("docs/operations.md");
    let table = &page[page.find("\n## Metrics\n").unwrap()..];
    let table = &table[..table[1..].find("\n## ").map_or(table.len(), |end| end + 1)];
    for (metric, codes) in codes() {
        for code in &codes {
            assert!(kebab(code), "{metric}: {code:?} is not kebab-case");
        }
        if metric == "warnings" {
            continue;
        }
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| `{metric}`")))
            .unwrap_or_else(|| {
                panic!("{metric} missing from the docs/operations.md metrics table")
            });
        for code in codes {
            assert!(
                row.contains(&format!("`{code}`")),
                "{metric}: {code} undocumented"
            );
        }
    }
}

/// Label matchers on `reason` and `type` in the alerts, the dashboard and
/// the docs name codes that exist; no snake_case spelling of a code is
/// left anywhere users read.
#[test]
fn docs_alerts_and_dashboards_use_the_codes_that_exist() {
    let known: BTreeSet<&str> = codes().into_iter().flat_map(|(_, c)| c).collect();
    let mut files: Vec<String> = ["README.md", "certs/README.md"].map(String::from).into();
    files.extend(doc_pages());
    files.extend(
        [
            "deploy/monitoring/prometheusrule.yaml",
            "deploy/monitoring/dashboard.json",
            "deploy/base/config.yaml",
        ]
        .map(String::from),
    );
    let mut matchers = 0;
    for file in &files {
        let text = read(file);
        for label in ["reason", "type"] {
            for op in ["=\"", "!=\"", "=~\"", "!~\"", "=\\\""] {
                let pattern = format!("{label}{op}");
                for (at, _) in text.match_indices(&pattern) {
                    let rest = &text[at + pattern.len()..];
                    let value = &rest[..rest.find(['"', '\\']).unwrap()];
                    for code in value.split('|').filter(|c| !c.is_empty()) {
                        matchers += 1;
                        assert!(
                            known.contains(code),
                            "{file}: {label}{op}{code} is not a code the webhook exports"
                        );
                    }
                }
            }
        }
        for code in &known {
            let snake = code.replace('-', "_");
            if snake != *code {
                assert!(
                    !text.contains(&format!("\"{snake}\""))
                        && !text.contains(&format!("`{snake}`")),
                    "{file}: snake_case {snake:?} (the code is {code:?})"
                );
            }
        }
    }
    assert!(matchers >= 5, "found only {matchers} matchers");
}

/// A webhook configured with a wrong path gets 404s: counted, by reason,
/// and as invalid reviews (so the admission error alert sees them).
#[tokio::test]
async fn not_found_is_counted() {
    let server = start(Config::default()).await;
    let text = || String::from_utf8(canary_injector::metrics::encode(&server.registry)).unwrap();
    // Every reason is exported at 0 before anything happened.
    let before = text();
    for reason in ERROR_REASONS {
        assert!(
            before.contains(&format!(
                "canary_injector_errors_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}\n{before}"
        );
    }
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    let r = c.post_json("/inject", "{}").await;
    assert_eq!(r.status(), 404);
    assert_eq!(c.get("/").await.status(), 404);
    let after = text();
    assert!(
        after.contains(r#"canary_injector_errors_total{reason="not-found"} 2"#),
        "{after}"
    );
    assert!(
        after.contains(
            r#"canary_injector_admission_reviews_total{kind="unknown",operation="unknown",outcome="invalid"} 2"#
        ),
        "{after}"
    );
    // Health checks are not errors.
    assert_eq!(c.get("/healthz").await.status(), 200);
    assert!(text().contains(r#"canary_injector_errors_total{reason="not-found"} 2"#));
}
