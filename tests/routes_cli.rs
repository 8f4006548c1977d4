//! `canary-injector routes -f` as users run it, on a realistic namespace
//! (tests/fixtures/routes/shop.yaml): the printed objects are the golden
//! file, they route exactly the canaries the label rules make, and bad
//! input gets the documented exit codes. `BLESS=1` rewrites the golden
//! file; review the diff.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Output, Stdio};

use canary_injector::config::Config;
use canary_injector::mutate::labels::is_dns_label;
use canary_injector::offline;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_canary-injector");
const INPUT: &str = "tests/fixtures/routes/shop.yaml";
const GOLDEN: &str = "tests/fixtures/routes/shop.routes.yaml";

fn path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn routes_prints_the_golden_objects_for_a_namespace() {
    let out = run(&["routes", "-f", &path(INPUT)], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(path(GOLDEN), &printed).unwrap();
    }
    let golden = std::fs::read_to_string(path(GOLDEN)).unwrap();
    assert_eq!(
        printed, golden,
        "BLESS=1 cargo test --test routes_cli rewrites it"
    );
    assert_eq!(
        text(&out.stderr),
        "warning: document 4 (ReplicaSet checkout-gray-feature-login): annotation \
         canary-injector.io/tag: \"feature/Login_v2\" is not a valid label value; using \
         \"feature-Login_v2\"\n"
    );
    // Same from stdin.
    let input = std::fs::read_to_string(path(INPUT)).unwrap();
    let again = run(&["routes", "-f", "-"], Some(&input));
    assert!(again.status.success());
    assert_eq!(text(&again.stdout), golden);
}

/// The printed objects route exactly the canaries in the input: after the
/// label rules, each workload a routed Service selects falls into exactly
/// one subset; each gray one has a header route to its subset and the
/// normal ones get the default route.
#[test]
fn routes_match_the_labels_the_rules_write() {
    let out = run(&["routes", "-f", &path(INPUT)], None);
    let objects = docs(&text(&out.stdout));
    let input = std::fs::read_to_string(path(INPUT)).unwrap();
    let mutated = offline::mutate_documents(&input, INPUT, &Config::default(), false).unwrap();
    let workloads = docs(&mutated.text);

    let kinds: Vec<(&str, &str)> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("DestinationRule", "cart"),
            ("VirtualService", "cart"),
            ("DestinationRule", "checkout"),
            ("VirtualService", "checkout"),
        ],
        "routed Services only, in name order"
    );

    let pod_labels = |name: &str| -> BTreeMap<String, String> {
        let w = workloads
            .iter()
            .find(|w| w["metadata"]["name"] == name && w["kind"] != "Service")
            .unwrap();
        let l = if w["kind"] == "Pod" {
            &w["metadata"]["labels"]
        } else {
            &w["spec"]["template"]["metadata"]["labels"]
        };
        labels(l)
    };
    for (service, header, normal, gray) in [
        (
            "checkout",
            "x-canary-tag",
            vec!["checkout"],
            vec![
                ("checkout-gray-feature-login", "feature-Login_v2"),
                ("checkout-gray-release", "release.2024.06"),
                ("checkout-hotfix-42", "hotfix-42"),
            ],
        ),
        (
            "cart",
            "x-cart-version",
            vec!["cart"],
            vec![("cart-gray", "V2")],
        ),
    ] {
        let dr = objects
            .iter()
            .find(|o| o["kind"] == "DestinationRule" && o["metadata"]["name"] == service)
            .unwrap();
        let vs = objects
            .iter()
            .find(|o| o["kind"] == "VirtualService" && o["metadata"]["name"] == service)
            .unwrap();
        assert_eq!(dr["apiVersion"], "networking.istio.io/v1beta1");
        assert_eq!(
            dr["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "canary-injector"
        );
        let subsets: Vec<(String, BTreeMap<String, String>)> = dr["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_owned(), labels(&s["labels"])))
            .collect();
        let names: BTreeSet<&str> = subsets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), subsets.len(), "unique subset names");
        assert!(names.iter().all(|n| is_dns_label(n)), "{names:?}");
        assert_eq!(subsets.len(), gray.len() + 1);
        let matching = |pod: &BTreeMap<String, String>| -> Vec<&str> {
            subsets
                .iter()
                .filter(|(_, sel)| sel.iter().all(|(k, v)| pod.get(k) == Some(v)))
                .map(|(n, _)| n.as_str())
                .collect()
        };
        let http = vs["spec"]["http"].as_array().unwrap();
        let last = http.last().unwrap();
        for workload in normal {
            assert_eq!(matching(&pod_labels(workload)), ["normal"], "{workload}");
        }
        assert_eq!(last["route"][0]["destination"]["subset"], "normal");
        assert!(last.get("match").is_none());
        for (workload, tag) in gray {
            let subset = matching(&pod_labels(workload));
            assert_eq!(subset.len(), 1, "{workload}: {subset:?}");
            let route = http
                .iter()
                .find(|r| r["match"][0]["headers"][header]["exact"] == tag)
                .unwrap_or_else(|| panic!("no route for {tag}"));
            assert_eq!(route["route"][0]["destination"]["subset"], subset[0]);
            assert_eq!(route["route"][0]["destination"]["host"], service);
            assert!(route["route"][0]["destination"].get("port").is_none());
        }
        assert_eq!(http.len(), subsets.len());
    }
}

#[test]
fn routes_writes_the_istio_version_asked_for() {
    let out = run(
        &["routes", "-f", &path(INPUT), "--istio-api-version", "v1"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for o in docs(&text(&out.stdout)) {
        assert_eq!(o["apiVersion"], "networking.istio.io/v1");
    }
    let bad = run(
        &["routes", "-f", &path(INPUT), "--istio-api-version", "v2"],
        None,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("v1beta1"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn routes_uses_the_configured_labels_and_header() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "labels: {canaryTag: example.com/canary, grayStage: canary}\nroutes: {header: x-version}\n",
    )
    .unwrap();
    let input = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations: \
                 {canary-injector.io/routes: \"true\"}\nspec:\n  selector: {app: web}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  labels: {app: web}\n  \
                 annotations: {canary-injector.io/tag: beta}\n";
    let out = run(
        &["routes", "-f", "-", "--config", cfg.to_str().unwrap()],
        Some(input),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let objects = docs(&text(&out.stdout));
    assert_eq!(
        objects[0]["spec"]["subsets"][1]["labels"],
        serde_json::json!({"example.com/canary": "beta", "stage": "canary"})
    );
    assert_eq!(
        objects[1]["spec"]["http"][0]["match"][0]["headers"]["x-version"]["exact"],
        "beta"
    );
    assert!(objects[0]["metadata"].get("namespace").is_none());
}

#[test]
fn routes_refuses_bad_input_with_the_documented_exit_codes() {
    let missing = run(&["routes", "-f", "/nonexistent.yaml"], None);
    assert_eq!(missing.status.code(), Some(2));
    let garbage = run(&["routes", "-f", "-"], Some("a: [unclosed\n"));
    assert_eq!(garbage.status.code(), Some(2));
    // A tag with nothing usable in it: the label rules refuse the document.
    let denied = run(
        &["routes", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {canary-injector.io/tag: '///'}\n",
        ),
    );
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied.stderr).contains("document 1 (Pod p)"),
        "{}",
        text(&denied.stderr)
    );
    let header = run(
        &["routes", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    \
              canary-injector.io/routes: \"true\"\n    canary-injector.io/route-header: 'X Y'\n",
        ),
    );
    assert_eq!(header.status.code(), Some(2));
    assert!(
        text(&header.stderr).contains("route-header"),
        "{}",
        text(&header.stderr)
    );
    assert!(text(&header.stdout).is_empty(), "nothing printed on error");
}

/// `--api gateway-api`: for every routed Service of the namespace, its
/// version Services (valid DNS-1035 names, each selecting the Service's
/// selector plus one version's labels) and an HTTPRoute with the Service as
/// its parent whose rules name only those Services; the configuration's
/// `routes.api` does the same; an unknown API is a usage error.
#[test]
fn routes_prints_gateway_api_objects_when_asked() {
    let out = run(
        &["routes", "-f", &path(INPUT), "--api", "gateway-api"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let objects = docs(&text(&out.stdout));
    let routes: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "HTTPRoute")
        .collect();
    let services: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Service").collect();
    assert!(!routes.is_empty());
    assert_eq!(routes.len() + services.len(), objects.len(), "nothing else");
    for s in &services {
        let name = s["metadata"]["name"].as_str().unwrap();
        assert!(
            is_dns_label(name) && name.len() <= 63 && name.contains("--"),
            "{name}"
        );
        assert_eq!(
            s["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "canary-injector"
        );
        assert!(s["metadata"]["labels"]["canary-injector.io/route-of"].is_string());
    }
    for r in &routes {
        let parent = r["spec"]["parentRefs"][0]["name"].as_str().unwrap();
        let backends: BTreeSet<&str> = r["spec"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["backendRefs"].as_array().unwrap())
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        for b in backends {
            let ours = services.iter().any(|s| {
                s["metadata"]["name"] == b
                    && s["metadata"]["labels"]["canary-injector.io/route-of"] == parent
            });
            assert!(
                ours || b == parent,
                "{b} is neither a version Service of {parent} nor it"
            );
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "routes: {api: gateway-api}\n").unwrap();
    let configured = run(
        &[
            "routes",
            "-f",
            &path(INPUT),
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
    );
    assert!(configured.status.success(), "{}", text(&configured.stderr));
    assert_eq!(configured.stdout, out.stdout);

    let bad = run(&["routes", "-f", &path(INPUT), "--api", "linkerd"], None);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("gateway-api"),
        "{}",
        text(&bad.stderr)
    );
    assert!(bad.stdout.is_empty());
}
