//! The binary as users run it: `mutate -f` offline, and start-up errors of
//! `serve`, with their exit codes (0 ok, 1 refused document, 2 bad input).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_canary-injector");

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
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

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

#[test]
fn mutate_labels_manifests_like_kube_inject() {
    let out = run(
        &["mutate", "-f", &fixture_path("manifests/workloads.yaml")],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let docs = docs(&stdout(&out));
    assert_eq!(docs.len(), 4);

    let deployment = &docs[0];
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["stage"],
        "normal"
    );
    // Strings that look like other YAML types stay strings.
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["canary-injector.io/inject"],
        "true"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"][2],
        "--verbose=false"
    );
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"]["version"],
        "stable"
    );
    assert!(deployment["metadata"]["labels"].get("stage").is_none());

    let service = &docs[1];
    let original =
        &self::docs(&std::fs::read_to_string(fixture_path("manifests/workloads.yaml")).unwrap())[1];
    assert_eq!(service, original, "other kinds pass through unchanged");

    let rs = &docs[2];
    for labels in [
        &rs["metadata"]["labels"],
        &rs["spec"]["template"]["metadata"]["labels"],
    ] {
        assert_eq!(labels["canarytag"], "feature-login");
        assert_eq!(labels["stage"], "gray");
    }
    assert!(stderr(&out).contains("\"feature/login\" is not a valid label value"));

    let cron = &docs[3];
    assert_eq!(
        cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]["canarytag"],
        "nightly"
    );

    // Idempotent: mutating the output changes nothing.
    let again = run(&["mutate", "-f", "-", "--patch"], Some(&stdout(&out)));
    assert!(again.status.success());
    assert_eq!(stdout(&again), "[]\n[]\n[]\n[]\n");
}

#[test]
fn mutate_reads_json_from_stdin_and_prints_patches() {
    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("istio-pod.review.json")).unwrap(),
    )
    .unwrap();
    let pod = review["request"]["object"].to_string();
    let out = run(&["mutate", "-f", "-", "--patch"], Some(&pod));
    assert!(out.status.success(), "{}", stderr(&out));
    let patch: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // An `istioctl kube-inject`ed 1.5 pod: the label, plus the bootstrap
    // template volume and its mount on istio-proxy (containers[1]).
    let paths: Vec<&str> = patch
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/labels/stage",
            "/spec/volumes/-",
            "/spec/containers/1/volumeMounts/-"
        ]
    );
    assert_eq!(
        patch[2]["value"]["mountPath"],
        "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json"
    );
}

#[test]
fn mutate_handles_lists() {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}]}"#;
    let out = run(&["mutate", "-f", "-", "--patch"], Some(list));
    assert!(out.status.success(), "{}", stderr(&out));
    let patch: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(patch[0]["path"], "/items/0/metadata/labels");
}

#[test]
fn missing_file_is_exit_2() {
    let out = run(&["mutate", "-f", "/nonexistent/manifest.yaml"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/manifest.yaml"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn invalid_yaml_is_exit_2() {
    for input in ["kind: Pod\nmetadata: [unclosed\n", "- just\n- a list\n"] {
        let out = run(&["mutate", "-f", "-"], Some(input));
        assert_eq!(out.status.code(), Some(2), "{input}");
        assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn unusable_tag_is_exit_1_naming_the_document() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n    canary-injector.io/tag: '///'\n";
    let out = run(&["mutate", "-f", "-"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("document 1 (Pod web)"), "{err}");
    assert!(err.contains("canary-injector.io/tag"), "{err}");
}

#[test]
fn config_file_changes_the_labels_and_bad_config_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "labels: {stage: example.com/stage, normalStage: stable}\n",
    )
    .unwrap();
    let out = run(
        &[
            "mutate",
            "-f",
            "-",
            "--patch",
            "--config",
            good.to_str().unwrap(),
        ],
        Some("kind: Pod\nmetadata: {name: a, labels: {app: a}}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        r#"[{"op":"add","path":"/metadata/labels/example.com~1stage","value":"stable"}]"#
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "stageLabels: x\n").unwrap();
    for cmd in ["mutate", "serve"] {
        let mut args = vec![cmd, "--config", bad.to_str().unwrap()];
        if cmd == "mutate" {
            args.extend(["-f", "-"]);
        }
        let out = run(&args, Some(""));
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(
            stderr(&out).contains("stageLabels"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn serve_refuses_bad_limits_and_an_unwritable_dev_cert_dir() {
    for flag in ["--max-connections", "--cert-reload-seconds"] {
        let out = run(&["serve", flag, "0"], None);
        assert_eq!(out.status.code(), Some(2), "{flag} 0");
        assert!(stderr(&out).contains(flag), "{flag}: {}", stderr(&out));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = run(
        &[
            "serve",
            "--dev-cert-dir",
            file.join("dev").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("cannot create the development certificate; pass --tls-cert and --tls-key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_refuses_bad_tls_flags() {
    let out = run(&["serve", "--tls-cert", "/tmp/x.crt"], None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cert without key is a usage error"
    );

    let out = run(
        &[
            "serve",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/tls.crt"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bootstrap_template_patches_and_refuses_with_exit_2() {
    let out = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.5.tmpl.json"),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected =
        std::fs::read_to_string(fixture_path("bootstrap/istio-1.5.expected.json")).unwrap();
    assert_eq!(stdout(&out), expected);

    // Idempotent through the binary too.
    let again = run(&["bootstrap-template", "-f", "-"], Some(&expected));
    assert!(again.status.success());
    assert_eq!(stdout(&again), expected);
    assert!(stderr(&again).contains("unchanged"));

    for (fixture, message) in [
        ("bootstrap/istio-1.12.tmpl.json", "Istio >= 1.8"),
        (
            "bootstrap/istio-1.12.tmpl.json",
            "for Istio 1.18 and newer the webhook sets GRPC_KEEPALIVE_INTERVAL",
        ),
        ("bootstrap/two-xds.tmpl.json", "found 2 clusters"),
        (
            "bootstrap/not-a-template.json",
            "not an envoy bootstrap template",
        ),
        ("bootstrap/missing.json", "cannot read"),
    ] {
        let out = run(&["bootstrap-template", "-f", &fixture_path(fixture)], None);
        assert_eq!(out.status.code(), Some(2), "{fixture}");
        assert!(
            stderr(&out).contains(message),
            "{fixture}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{fixture}");
    }
}

#[test]
fn bootstrap_template_custom_values_and_configmap_manifest() {
    let out = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time",
            "20",
            "--keepalive-probes",
            "4",
            "--keepalive-interval",
            "6",
            "--configmap",
            "canary-injector-bootstrap",
            "--namespace",
            "mesh-tools",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cm: Value = serde_saphyr::from_str(&stdout(&out)).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "canary-injector-bootstrap");
    assert_eq!(cm["metadata"]["namespace"], "mesh-tools");
    let template = cm["data"]["envoy_bootstrap_tmpl.json"].as_str().unwrap();
    // The YAML block holds the template byte for byte.
    let direct = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time=20",
            "--keepalive-probes=4",
            "--keepalive-interval=6",
        ],
        None,
    );
    assert_eq!(template, stdout(&direct));
    assert!(template.contains("\"keepalive_time\": 20"));
    assert!(template.contains("\"keepalive_probes\": 4"));
    assert!(template.contains("\"keepalive_interval\": 6"));

    let zero = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time",
            "0",
        ],
        None,
    );
    assert_eq!(zero.status.code(), Some(2));
}

#[test]
fn mutate_mounts_the_bootstrap_template_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "istio:\n  proxyVersion: '1.5'\n").unwrap();
    let manifests = fixture_path("manifests/workloads.yaml");
    let out = run(
        &[
            "mutate",
            "-f",
            &manifests,
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let with = docs(&stdout(&out));
    let annotations = &with[0]["spec"]["template"]["metadata"]["annotations"];
    assert!(
        annotations["sidecar.istio.io/userVolumeMount"]
            .as_str()
            .unwrap()
            .contains("/var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
    );

    let out = run(
        &[
            "mutate",
            "-f",
            &manifests,
            "--config",
            cfg.to_str().unwrap(),
            "--no-bootstrap",
        ],
        None,
    );
    let docs = docs(&stdout(&out));
    assert!(
        docs[0]["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none()
    );
}

/// `check` without a reachable cluster: exit 2 and a reason, not a report.
#[test]
fn check_without_a_cluster_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig whose API server refuses connections.
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: dead\n\
         clusters: [{name: dead, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         contexts: [{name: dead, context: {cluster: dead, user: u}}]\n\
         users: [{name: u, user: {token: t}}]\n",
    )
    .unwrap();
    for (config, reason) in [
        (
            dir.path().join("missing").display().to_string(),
            "cannot configure the Kubernetes client",
        ),
        (
            kubeconfig.display().to_string(),
            "the Kubernetes API did not answer GET /version",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["check", "-o", "json"])
            .env("KUBECONFIG", &config)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(reason), "{}", stderr(&out));
        assert!(stdout(&out).is_empty(), "no report without a cluster");
    }
    let out = run(&["check", "-o", "yaml"], None);
    assert_eq!(out.status.code(), Some(2), "bad usage");
}

// === `check` against a recorded cluster, end to end ===

/// Where the apiserver serves a recorded item (an object, or a discovery
/// document).
fn api_path(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap();
    match kind {
        "APIGroup" => return format!("/apis/{}", object["name"].as_str().unwrap()),
        "APIResourceList" => {
            return format!("/apis/{}", object["groupVersion"].as_str().unwrap());
        }
        _ => {}
    }
    let api = match object["apiVersion"].as_str().unwrap() {
        "v1" => "/api/v1".to_owned(),
        group_version => format!("/apis/{group_version}"),
    };
    let plural = format!("{}s", kind.to_lowercase());
    let name = object["metadata"]["name"].as_str().unwrap();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{api}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{api}/{plural}/{name}"),
    }
}

/// A list path: `/api/v1/namespaces`, `/api/v1/namespaces/ns/pods`,
/// `/apis/apps/v1/namespaces/ns/replicasets`.
fn is_collection(path: &str) -> bool {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| {
            path.strip_prefix("/apis/")
                .and_then(|r| r.splitn(3, '/').nth(2))
        })
        .unwrap_or("");
    let segments = rest.split('/').filter(|s| !s.is_empty()).count();
    segments == 1 || (segments == 3 && rest.starts_with("namespaces/"))
}

/// Equality (`k=v`, `k==v`) and inequality (`k!=v`) label selectors.
fn selects(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k].as_str() == Some(v)
        } else {
            labels.get(term).is_some()
        }
    })
}

/// What the recorded apiserver answers a `GET` of `target` (path and
/// query): `GET /version`, an object, a list (label selector applied), or
/// a 404 `Status`.
fn answer(objects: &std::collections::BTreeMap<String, Value>, target: &str) -> (u16, Value) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/version" {
        return (
            200,
            serde_json::json!({"major": "1", "minor": "33", "gitVersion": "v1.33.1",
                "gitCommit": "8adc0f041b8e7ad1d30e29cc59c6ae7a15e19828", "gitTreeState": "clean",
                "buildDate": "2025-05-15T08:19:08Z", "goVersion": "go1.24.2",
                "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    if let Some(object) = objects.get(path) {
        return (200, object.clone());
    }
    if is_collection(path) {
        let selector = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "labelSelector")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let items: Vec<&Value> = objects
            .iter()
            .filter(|(p, o)| {
                p.rsplit_once('/').is_some_and(|(parent, _)| parent == path)
                    && selects(&selector, o)
            })
            .map(|(_, o)| o)
            .collect();
        return (
            200,
            serde_json::json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": "4711"}, "items": items}),
        );
    }
    (
        404,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("{path} not found"),
            "reason": "NotFound", "code": 404}),
    )
}

/// Serves a recorded cluster state (`kind: List` files) over plain HTTP on
/// loopback, read-only, one request per connection, until the test ends;
/// returns a kubeconfig that points at it.
fn serve_recorded(dir: &std::path::Path, lists: &[&str]) -> std::path::PathBuf {
    use std::io::{BufRead, BufReader};
    let mut objects = std::collections::BTreeMap::new();
    for name in lists {
        let text = std::fs::read_to_string(fixture_path(&format!("check/cluster/{name}"))).unwrap();
        let list: Value = serde_json::from_str(&text).unwrap();
        for item in list["items"].as_array().unwrap() {
            objects.insert(api_path(item), item.clone());
        }
    }
    let objects = std::sync::Arc::new(objects);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let objects = objects.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                // The rest of the head (a GET has no body).
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let mut parts = request_line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (code, body) = if method == "GET" {
                    answer(&objects, target)
                } else {
                    (405, serde_json::json!({"kind": "Status", "code": 405}))
                };
                let body = body.to_string();
                let mut out = &stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: recorded\n\
             clusters: [{{name: recorded, cluster: {{server: 'http://{addr}'}}}}]\n\
             contexts: [{{name: recorded, context: {{cluster: recorded, user: u}}}}]\n\
             users: [{{name: u, user: {{}}}}]\n"
        ),
    )
    .unwrap();
    kubeconfig
}

fn check_against(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("check")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", kubeconfig.parent().unwrap())
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// `check` on a recorded cluster, through the binary: the exact JSON
/// report, exit code 1 when something needs fixing, 0 when sound, 2 for a
/// namespace that does not exist.
#[test]
fn check_a_recorded_cluster_prints_the_report_and_exits_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let findings = serve_recorded(dir.path(), &["install.json", "findings.json"]);
    let out = check_against(&findings, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: 3 finding(s) need fixing\n");
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("check/cluster/findings.out.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report, expected);
    // The same for people.
    let out = check_against(&findings, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).ends_with(
            "needs fixing: 2 namespace(s) (pay, shop), 4 pod(s) checked: 3 error(s), 0 warning(s), \
             0 info\n"
        ),
        "{}",
        stdout(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let sound = serve_recorded(dir.path(), &["install.json", "sound.json"]);
    let out = check_against(&sound, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "{\"sound\":true,\"checked\":{\"namespaces\":1,\"namespaceNames\":[\"shop\"],\"pods\":2},\
         \"findings\":[]}\n"
    );
    // -n on a namespace that has not opted in: one finding, exit 1.
    let out = check_against(&sound, &["-n", "other", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["findings"][0]["code"], "namespace-not-opted-in");
    assert_eq!(
        report["findings"][0]["fix"],
        "kubectl label namespace other canary-injection=enabled"
    );
    // -n on a namespace that does not exist: exit 2, one line, no report.
    let out = check_against(&sound, &["-n", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: namespace \"nope\" not found\n");
    assert!(stdout(&out).is_empty());
}

#[test]
fn mutate_errors_name_the_file_and_empty_input_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("app.yaml");
    std::fs::write(&bad, "kind: Pod\nmetadata: [unclosed\n").unwrap();
    let bad = bad.to_str().unwrap();
    let out = run(&["mutate", "-f", bad], None);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: {bad}: invalid YAML/JSON: line 2 column 11"
        )),
        "{err}"
    );
    assert!(err.contains(&format!(" --> {bad}:2:11")), "{err}");
    assert!(!err.contains("<input>"), "{err}");
    assert!(stdout(&out).is_empty());

    let out = run(&["mutate", "-f", "-"], Some("metadata: {name: [\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: <stdin>: invalid YAML/JSON"));

    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing here yet\n---\n").unwrap();
    let empty = empty.to_str().unwrap();
    for (file, stdin, name) in [("-", Some(""), "<stdin>"), (empty, None, empty)] {
        let out = run(&["mutate", "-f", file], stdin);
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert_eq!(stderr(&out), format!("error: no documents in {name}\n"));
        assert!(stdout(&out).is_empty());
    }
}

/// A refused document does not cost the others: every document is
/// printed (the refused one unchanged), each refusal named on stderr, exit 1.
#[test]
fn mutate_prints_every_document_when_one_is_refused() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  annotations: {canary-injector.io/tag: '///'}\n---\n\
                 apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: c}\n\
                 spec: {template: {metadata: {labels: {app: c}}, spec: {containers: []}}}\n";
    let out = run(&["mutate", "-f", "-"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    let printed = docs(&stdout(&out));
    let original = docs(input);
    assert_eq!(printed.len(), 3);
    assert_eq!(printed[0]["metadata"]["labels"]["stage"], "normal");
    assert_eq!(printed[1], original[1], "the refused document, unchanged");
    assert_eq!(
        printed[2]["spec"]["template"]["metadata"]["labels"]["stage"],
        "normal"
    );
    let err = stderr(&out);
    assert!(
        err.contains("error: document 2 (Pod bad): annotation canary-injector.io/tag"),
        "{err}"
    );
    assert!(
        err.ends_with("error: 1 of 3 documents refused by the rules; printed unchanged\n"),
        "{err}"
    );
}

#[test]
fn mutate_answers_json_with_json() {
    let pod =
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"app": "a"}}}"#;
    let out = run(&["mutate", "-f", "-"], Some(pod));
    assert!(out.status.success(), "{}", stderr(&out));
    let back: Value = serde_json::from_str(&stdout(&out)).expect("JSON out");
    assert_eq!(
        back["metadata"]["labels"],
        serde_json::json!({"app": "a", "stage": "normal"})
    );
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n";
    let out = run(&["mutate", "-f", "-"], Some(yaml));
    assert!(serde_json::from_str::<Value>(&stdout(&out)).is_err());
    assert_eq!(
        docs(&stdout(&out))[0]["metadata"]["labels"]["stage"],
        "normal"
    );
}

/// The object of a golden review fixture, as a manifest.
fn fixture_pod(case: &str) -> String {
    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path(&format!("bootstrap-pods/{case}.review.json")))
            .unwrap(),
    )
    .unwrap();
    review["request"]["object"].to_string()
}

fn proxy(pod: &Value) -> &Value {
    ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .find(|c| c["name"] == "istio-proxy")
        .unwrap()
}

fn env_names(pod: &Value) -> Vec<String> {
    proxy(pod)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Offline, every Istio generation gets its keepalive fix, before and
/// after injection: 1.5 and 1.7 the template, 1.12 nothing, 1.18+ the
/// agent env (in proxyMetadata before injection), a user's own keepalive
/// kept; the output is a fixed point.
#[test]
fn mutate_gives_each_istio_version_its_keepalive_fix() {
    let mounted = |pod: &Value| {
        proxy(pod)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
    };
    let annotation = |pod: &Value, key: &str| pod["metadata"]["annotations"][key].clone();
    for (case, version, check) in [
        (
            "before-injection",
            Some("1.5"),
            &(|p: &Value| {
                assert!(annotation(p, "sidecar.istio.io/userVolumeMount").is_string());
                assert!(annotation(p, "proxy.istio.io/config").is_null());
            }) as &dyn Fn(&Value),
        ),
        ("before-injection", Some("1.7.8"), &|p: &Value| {
            assert!(annotation(p, "sidecar.istio.io/userVolume").is_string())
        }),
        ("injected-1.5", None, &|p: &Value| assert!(mounted(p))),
        ("injected-1.7", None, &|p: &Value| assert!(mounted(p))),
        ("before-injection", Some("1.12"), &|p: &Value| {
            assert!(p["metadata"].get("annotations").is_none())
        }),
        ("injected-1.12", None, &|p: &Value| {
            assert!(!mounted(p));
            assert!(!env_names(p).iter().any(|n| n.starts_with("GRPC_")));
        }),
        ("before-injection", Some("1.20"), &|p: &Value| {
            assert_eq!(
                annotation(p, "proxy.istio.io/config"),
                r#"{"proxyMetadata":{"GRPC_KEEPALIVE_INTERVAL":"30s","GRPC_KEEPALIVE_TIMEOUT":"15s"}}"#
            )
        }),
        (
            "before-injection-1.20-proxy-config",
            Some("1.20"),
            &|p: &Value| {
                let text = annotation(p, "proxy.istio.io/config");
                let config: Value = serde_saphyr::from_str(text.as_str().unwrap()).unwrap();
                assert_eq!(config["holdApplicationUntilProxyStarts"], true);
                assert_eq!(config["proxyMetadata"]["GRPC_KEEPALIVE_TIMEOUT"], "20s");
                assert_eq!(config["proxyMetadata"]["GRPC_KEEPALIVE_INTERVAL"], "30s");
            },
        ),
        ("injected-1.22", Some("1.5"), &|p: &Value| {
            let names = env_names(p);
            assert_eq!(
                &names[names.len() - 2..],
                ["GRPC_KEEPALIVE_INTERVAL", "GRPC_KEEPALIVE_TIMEOUT"],
                "the image tag beats --proxy-version"
            );
        }),
        ("injected-1.22-user-keepalive", None, &|p: &Value| {
            let env = proxy(p)["env"].as_array().unwrap();
            let value = |n: &str| env.iter().find(|e| e["name"] == n).unwrap()["value"].clone();
            assert_eq!(value("GRPC_KEEPALIVE_INTERVAL"), "20s");
            assert_eq!(value("GRPC_KEEPALIVE_TIMEOUT"), "10s");
            assert_eq!(env_names(p).len(), 19, "nothing added");
        }),
        ("native-sidecar-1.27", None, &|p: &Value| {
            assert_eq!(p["spec"]["initContainers"][1]["name"], "istio-proxy");
            assert!(env_names(p).contains(&"GRPC_KEEPALIVE_TIMEOUT".to_owned()));
        }),
    ] {
        let mut args = vec!["mutate", "-f", "-"];
        if let Some(v) = version {
            args.extend(["--proxy-version", v]);
        }
        let out = run(&args, Some(&fixture_pod(case)));
        assert!(out.status.success(), "{case}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{case}: {}", stderr(&out));
        let pod: Value = serde_json::from_str(&stdout(&out)).unwrap();
        check(&pod);
        assert_eq!(pod["metadata"]["labels"]["stage"], "normal", "{case}");
        args.push("--patch");
        let again = run(&args, Some(&stdout(&out)));
        assert_eq!(stdout(&again), "[]\n", "{case}: fixed point");
    }
}

/// Opting out: the pod annotation, or --no-bootstrap for the whole run.
#[test]
fn mutate_keepalive_opt_outs() {
    let mut pod: Value = serde_json::from_str(&fixture_pod("injected-1.22")).unwrap();
    pod["metadata"]["annotations"]["canary-injector.io/bootstrap"] = "false".into();
    let out = run(&["mutate", "-f", "-", "--patch"], Some(&pod.to_string()));
    assert_eq!(
        stdout(&out),
        "[{\"op\":\"add\",\"path\":\"/metadata/labels/stage\",\"value\":\"normal\"}]\n"
    );
    let out = run(
        &["mutate", "-f", "-", "--patch", "--no-bootstrap"],
        Some(&fixture_pod("injected-1.22")),
    );
    assert_eq!(
        stdout(&out),
        "[{\"op\":\"add\",\"path\":\"/metadata/labels/stage\",\"value\":\"normal\"}]\n"
    );
    let out = run(
        &["mutate", "-f", "-", "--proxy-version", "latest"],
        Some("kind: Pod\n"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--proxy-version"), "{}", stderr(&out));
}

#[test]
fn bootstrap_template_refuses_names_kubectl_would_reject() {
    let template = fixture_path("bootstrap/istio-1.5.tmpl.json");
    for (flags, message) in [
        (vec!["--configmap", "Bad_Name"], "--configmap \"Bad_Name\""),
        (vec!["--configmap=-x"], "--configmap \"-x\""),
        (vec!["--configmap", "a..b"], "--configmap \"a..b\""),
        (
            vec!["--configmap", "ok", "--namespace", "Mesh.Tools"],
            "--namespace \"Mesh.Tools\"",
        ),
    ] {
        let mut args = vec!["bootstrap-template", "-f", &template];
        args.extend(flags);
        let out = run(&args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
    let out = run(
        &[
            "bootstrap-template",
            "-f",
            &template,
            "--configmap",
            "istio.keepalive-v2",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `check -f`: the routing rules on manifests, with exact findings and exit codes.
#[test]
fn check_manifests_finds_routes_that_miss_the_workloads() {
    let out = run(&["check", "-f", &fixture_path("check/sound.yaml")], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "sound: 1 namespace(s) (shop), 2 workload(s) checked: 0 error(s), 0 warning(s), 0 info\n"
    );

    let out = run(
        &["check", "-o", "json", "-f", "-"],
        Some(&std::fs::read_to_string(fixture_path("check/broken.yaml")).unwrap()),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: 3 finding(s) need fixing\n");
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["sound"], false);
    assert_eq!(
        report["checked"],
        serde_json::json!({"namespaces": 1, "namespaceNames": ["shop"], "workloads": 2})
    );
    let found: Vec<(String, String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap().to_owned();
            (s("severity"), s("code"), s("place"))
        })
        .collect();
    let expect = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        found,
        [
            expect(
                "error",
                "subset-selects-no-pod",
                "shop/DestinationRule/checkout"
            ),
            expect(
                "error",
                "route-to-missing-subset",
                "shop/VirtualService/checkout"
            ),
            expect("warning", "live-tag-without-route", "shop/Service/checkout"),
        ]
    );
    assert!(
        report["findings"][2]["message"]
            .as_str()
            .unwrap()
            .starts_with("canary feature-Login has a pod (from the workloads in the files) behind Service checkout"),
        "{}",
        report["findings"][2]
    );

    // Unreadable input is exit 2; -n makes no sense with -f.
    let out = run(&["check", "-f", "-"], Some("kind: [\n"));
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["check", "-f", "x.yaml", "-n", "shop"], None);
    assert_eq!(out.status.code(), Some(2));
}
